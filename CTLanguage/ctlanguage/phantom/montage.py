"""PNG montage of a case: axial / coronal / sagittal planes through the findings, HU window,
finding masks outlined in colour.  Pillow only (no matplotlib).

Display convention (radiological): axial and coronal show the patient's right on the image left,
anterior / superior at the top; sagittal shows anterior on the left.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


COLORS = [
    (255, 64, 64), (64, 200, 255), (255, 210, 0), (80, 255, 80), (255, 120, 255), (255, 150, 40),
    (150, 120, 255), (0, 255, 200), (255, 255, 255), (200, 255, 120),
]


DIFFUSE = {"steatosis", "hepatomegaly", "splenomegaly", "cardiomegaly", "emphysema", "ascites",
           "arterial_calcification"}


def to_canonical(array: np.ndarray, ijk_to_ras: np.ndarray):
    """Permute/flip an axis-aligned [k, j, i] array to [S, A, R] order (z, y, x increasing).

    Returns the array view and the (sx, sy, sz) spacing.  Only for grids whose axes are aligned
    with RAS (what the phantom produces); raises ValueError otherwise.
    """
    m = np.asarray(ijk_to_ras, float)[:3, :3]
    ras_axis = np.argmax(np.abs(m), axis=0)  # for array index axis i, j, k -> RAS axis
    if sorted(ras_axis.tolist()) != [0, 1, 2]:
        raise ValueError("grid is not axis-aligned")
    spacing = np.zeros(3)
    a = array
    # array axes are (k, j, i) = index axes (2, 1, 0)
    order = [None, None, None]  # order[r] = array axis holding RAS axis r
    for idx_axis in range(3):
        r = ras_axis[idx_axis]
        arr_axis = 2 - idx_axis
        order[r] = arr_axis
        spacing[r] = abs(m[r, idx_axis])
        if m[r, idx_axis] < 0:
            a = np.flip(a, axis=arr_axis)
    a = np.transpose(a, (order[2], order[1], order[0]))  # -> [z, y, x]
    return a, spacing


def _window(img: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2.0
    return np.clip((img - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def _outline(m: np.ndarray) -> np.ndarray:
    if not m.any():
        return m
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _panel(gray: np.ndarray, masks: list[tuple[np.ndarray, tuple]], sx: float, sy: float, scale: float) -> Image.Image:
    """gray [rows, cols] uint8 with pixel size (sx along cols, sy along rows) -> RGB image."""
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for m, col in masks:
        e = _outline(m)
        rgb[e] = col
    im = Image.fromarray(rgb, "RGB")
    w = max(1, int(round(gray.shape[1] * sx * scale)))
    h = max(1, int(round(gray.shape[0] * sy * scale)))
    return im.resize((w, h), Image.NEAREST)


def render_montage(volume: np.ndarray, ijk_to_ras: np.ndarray, findings=(), title: str = "",
                   point_ras=None, scale: float = 1.0, windows=((40, 400), (-600, 1500))) -> Image.Image:
    """Two rows (soft-tissue and lung window) x three planes, through the largest finding (or
    through ``point_ras``, a RAS point in mm, when given).

    ``findings`` is a sequence of objects with ``mask`` (same grid as ``volume``) and ``name``.
    """
    vol, sp = to_canonical(volume, ijk_to_ras)
    fms = []
    for n, f in enumerate(findings):
        fm, _ = to_canonical(f.mask, ijk_to_ras)
        fms.append((fm.astype(bool), COLORS[n % len(COLORS)], f))
    nz, ny, nx = vol.shape
    if point_ras is not None:
        ijk = np.linalg.solve(np.asarray(ijk_to_ras, float), np.append(np.asarray(point_ras, float), 1.0))[:3]
        ijk = np.clip(np.rint(ijk).astype(int), 0, np.array(volume.shape[::-1]) - 1)
        pm = np.zeros(volume.shape, bool)
        pm[ijk[2], ijk[1], ijk[0]] = True
        c = np.argwhere(to_canonical(pm, ijk_to_ras)[0])[0]
    elif fms:
        # centre on the largest focal finding (diffuse/organ-wide ones only if nothing else)
        focal = [t for t in fms if t[2].name not in DIFFUSE] or fms
        big = max(focal, key=lambda t: int(t[0].sum()))
        idx = np.argwhere(big[0])
        c = idx[len(idx) // 2] if len(idx) else np.array([nz // 2, ny // 2, nx // 2])
    else:
        c = np.array([int(nz * 0.55), ny // 2, nx // 2])
    kz, jy, ix = (int(v) for v in c)
    rows = []
    for center, width in windows:
        ax = _window(vol[kz], center, width)[::-1, ::-1]
        co = _window(vol[:, jy, :], center, width)[::-1, ::-1]
        sa = _window(vol[:, :, ix], center, width)[::-1, ::-1]
        pa = _panel(ax, [(m[kz][::-1, ::-1], col) for m, col, _ in fms], sp[0], sp[1], scale)
        pc = _panel(co, [(m[:, jy, :][::-1, ::-1], col) for m, col, _ in fms], sp[0], sp[2], scale)
        ps = _panel(sa, [(m[:, :, ix][::-1, ::-1], col) for m, col, _ in fms], sp[1], sp[2], scale)
        rows.append([pa, pc, ps])
    gap = 4
    legend_h = 16 * (1 + len(fms))
    W = max(sum(p.width for p in r) + gap * 2 for r in rows)
    H = sum(max(p.height for p in r) for r in rows) + gap + legend_h
    out = Image.new("RGB", (W, H), (0, 0, 0))
    y = 0
    for r in rows:
        x = 0
        for p in r:
            out.paste(p, (x, y))
            x += p.width + gap
        y += max(p.height for p in r) + gap
    d = ImageDraw.Draw(out)
    d.text((4, y), title, fill=(255, 255, 255))
    for n, (_, col, f) in enumerate(fms):
        side = getattr(f, "laterality", None)
        d.text((4, y + 16 * (n + 1)), f"{f.name}{' ' + side if side else ''}", fill=col)
    return out


def save_png(img: Image.Image, path: str) -> None:
    """Atomic PNG write (``ctlanguage.io.atomic_write``)."""
    from ..io import atomic_write

    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False), suffix=".png")
