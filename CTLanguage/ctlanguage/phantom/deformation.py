"""Smooth random deformation of a whole case: one displacement field warps the label map, the HU
volume and every finding mask together (before the scanner model).

Pull-back with nearest-neighbour lookup: output voxel p takes label, HU and finding membership of the
source voxel nearest to p + u(p).  Each output voxel therefore has exactly one label (no overlaps,
no unlabelled holes), and a finding voxel keeps the label it had, so every mask stays inside its
anatomy.  The field is a sum of separable cosine products (two bands: 100-220 mm for bending whole
regions, 40-80 mm for reshaping single organs), scaled to the requested peak displacement unless a
partial derivative of the displacement would exceed 0.3 (evaluated every 4 mm over the case, so at
most ~0.315): the Jacobian I + du/dx then has row sums of |du/dx| < 1, so the map is invertible
(no folding).  Nearest-neighbour lookup can
open a one-voxel structure where the map compresses; the one-voxel pleural shell is re-derived from
the warped lungs afterwards (``repair_pleura``).
"""

from __future__ import annotations

import numpy as np
from . import anatomy as an
from .anatomy import LABEL

MAX_GRADIENT = 0.3
BANDS = (((100.0, 220.0), 3, 1.0), ((40.0, 80.0), 3, 0.3))  # (wavelengths mm, terms, relative amplitude)


class _Field:
    """u_c(x, y, z) = sum_t a_ct cos(kx x + px) cos(ky y + py) cos(kz z + pz), c = x, y, z."""

    def __init__(self, rng: np.random.Generator, peak_mm: float, box_mm):
        amp, k, ph = [], [], []
        for (lo, hi), n, rel in BANDS:
            amp.append(rel * rng.uniform(0.5, 1.0, (3, n)) * rng.choice([-1.0, 1.0], (3, n)))
            k.append(2 * np.pi / rng.uniform(lo, hi, (3, n, 3)))
            ph.append(rng.uniform(0, 2 * np.pi, (3, n, 3)))
        self.amp, self.k, self.ph = np.concatenate(amp, 1), np.concatenate(k, 1), np.concatenate(ph, 1)
        # scale on the field's actual values over the case (sampled every 4 mm, which misses a peak
        # of the 40 mm band by < 5 %): peak |u| = peak_mm unless a partial derivative would exceed
        # MAX_GRADIENT
        axes = [np.arange(a, b + 4.0, 4.0) for a, b in box_mm]  # x, y, z
        peak, grad = 1e-9, 1e-9
        for c in range(3):
            peak = max(peak, float(np.abs(self.component(c, *axes)).max()))
            for d in range(3):
                grad = max(grad, float(np.abs(self.component(c, *axes, deriv=d)).max()))
        self.scale = float(min(peak_mm / peak, MAX_GRADIENT / grad)) if peak_mm > 0 else 0.0
        self.amp = self.amp * self.scale

    def component(self, c: int, x: np.ndarray, y: np.ndarray, z: np.ndarray, deriv: int | None = None) -> np.ndarray:
        """u_c (or its derivative along axis ``deriv``, 0 = x) on the grid x (ni,), y (nj,), z (nk,) as a
        (nk, nj, ni) float32 array (one matmul)."""
        k, ph, a = self.k[c], self.ph[c].copy(), self.amp[c]
        if deriv is not None:  # d/dx cos(kx + p) = k cos(kx + p + pi/2)
            a = a * k[:, deriv]
            ph[:, deriv] += np.pi / 2
        f32 = np.float32
        fx = np.cos(k[:, None, 0] * x[None] + ph[:, None, 0]).astype(f32)               # (t, ni)
        fy = np.cos(k[:, None, 1] * y[None] + ph[:, None, 1]).astype(f32)               # (t, nj)
        fz = (np.cos(k[:, None, 2] * z[None] + ph[:, None, 2]) * a[:, None]).astype(f32)  # (t, nk)
        zy = (fz[:, :, None] * fy[:, None, :]).reshape(len(a), -1)                      # (t, nk*nj)
        return (zy.T @ fx).reshape(len(z), len(y), len(x))


def warp(A, findings: list, peak_mm: float, rng: np.random.Generator, extra: dict | None = None) -> dict:
    """Warp ``A.lab``, ``A.hu``, the findings' masks and the arrays in ``extra`` ({name: full-grid
    array}, replaced in the dict) in place; returns what was applied."""
    g = A.grid
    body = A.lab > 0
    if peak_mm <= 0 or not body.any():
        return dict(peak_mm=0.0, moved_fraction=0.0)
    reach = np.ceil((peak_mm + 1) / g.spacing[::-1]).astype(int)  # k, j, i
    occ = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    lo = [max(0, int(occ[d][0]) - reach[d]) for d in range(3)]
    hi = [min(g.shape[d], int(occ[d][-1]) + 1 + reach[d]) for d in range(3)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    xs, ys, zs = (g.x[sl[2]].astype(np.float64), g.y[sl[1]].astype(np.float64), g.z[sl[0]].astype(np.float64))
    f = _Field(rng, peak_mm, [(v[0], v[-1]) for v in (xs, ys, zs)])
    flat = None
    peak = 0.0
    for c, axis in enumerate((2, 1, 0)):  # x, y, z displacement -> source index along i, j, k
        u = f.component(c, xs, ys, zs)
        peak = max(peak, float(np.abs(u).max()))
        u /= np.float32(g.spacing[c])
        u += np.arange(lo[axis], hi[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        np.rint(u, out=u)
        np.clip(u, 0, g.shape[axis] - 1, out=u)
        src = u.astype(np.int32)  # < 2**31 voxels (cases are capped at 120 M)
        if flat is None:
            flat = src
        else:  # flat = (k * nj + j) * ni + i, accumulated as i, then j, then k
            stride = g.shape[2] if axis == 1 else g.shape[1] * g.shape[2]
            src *= np.int32(stride)
            flat += src
    old = A.lab[sl].copy()
    A.lab[sl] = A.lab.reshape(-1)[flat]
    A.hu[sl] = A.hu.reshape(-1)[flat]
    for fd in findings:
        fd.mask = _warp_sparse(fd.mask, flat, sl, reach)
    for name, arr in (extra or {}).items():
        extra[name] = _warp_sparse(arr, flat, sl, reach)
    was = old > 0
    moved = np.count_nonzero(was & (old != A.lab[sl])) / max(1, np.count_nonzero(was))
    return dict(peak_mm=round(peak, 3), moved_fraction=round(float(moved), 4))


def _warp_sparse(arr: np.ndarray, flat: np.ndarray, sl: tuple, reach) -> np.ndarray:
    """``arr`` (a mask) pulled back through ``flat`` (the source indices of the voxels in ``sl``),
    evaluated only around the mask's own bounding box (grown by ``reach`` voxels)."""
    new = np.zeros_like(arr)
    occ = [np.flatnonzero(arr.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    if any(o.size == 0 for o in occ):
        return new
    box = []
    for d in range(3):
        a = max(int(occ[d][0]) - int(reach[d]), sl[d].start)
        b = min(int(occ[d][-1]) + 1 + int(reach[d]), sl[d].stop)
        if b <= a:
            return new
        box.append((a, b))
    sub = tuple(slice(a - sl[d].start, b - sl[d].start) for d, (a, b) in enumerate(box))
    new[tuple(slice(a, b) for a, b in box)] = arr.reshape(-1)[flat[sub]]
    return new


def repair_pleura(A) -> int:
    """Re-close each side's one-voxel pleural shell on the warped label map: lobe voxels that touch
    (6-neighbourhood) anything but their own lung space or the airway become pleural space (the
    intrapulmonary bronchi stay inside the lobes, as in the unwarped phantom).  Returns the number
    of voxels relabelled."""
    n = 0
    for side in ("left", "right"):
        lobes = an.anatomy_labels(f"lung_{side}")
        pl = LABEL[f"pleural_space_{side}"]
        region = an.isin(A.lab, lobes + [pl])
        occ = [np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
        if any(o.size == 0 for o in occ):
            continue
        sl = tuple(slice(max(int(o[0]) - 1, 0), min(int(o[-1]) + 2, n_d)) for o, n_d in zip(occ, A.lab.shape))
        lab = A.lab[sl]
        inner = region[sl] | (lab == LABEL["trachea"])
        core = inner.copy()  # 6-neighbourhood erosion; beyond the grid edge counts as outside
        for d in range(3):
            lo_, hi_ = [slice(None)] * 3, [slice(None)] * 3
            lo_[d], hi_[d] = slice(1, None), slice(None, -1)
            core[tuple(hi_)] &= inner[tuple(lo_)]
            core[tuple(lo_)] &= inner[tuple(hi_)]
            edge = [slice(None)] * 3
            for e in (0, -1):
                edge[d] = e
                core[tuple(edge)] = False
        fix = ~core & an.isin(lab, lobes)
        lab[fix] = pl
        n += int(np.count_nonzero(fix))
    return n


def refresh_findings(A, findings: list) -> list:
    """After the warp: clip each mask to its anatomy in the final label map, drop emptied findings,
    and re-measure (PCA extents, volume, centroid; per-lesion sizes scaled by the cube root of the
    volume change; aneurysm diameter re-read from the mask)."""
    from . import findings as fd

    out = []
    for f in findings:
        m = f.mask.astype(bool) & an.anatomy_mask(A.lab, f.anatomy)
        if not m.any():
            continue
        old_ml = max(float(f.volume_ml), 1e-9)
        f.mask = m.astype(np.uint8)
        meas = fd.measure(m, A.grid)
        f.volume_ml = float(meas["volume_ml"])
        ratio = (f.volume_ml / old_ml) ** (1 / 3)
        for key in ("largest_mm", "short_axis_mm"):
            if key in f.info:
                f.info[key] = float(f.info[key]) * ratio
        if f.name == "aortic_aneurysm":
            f.info["diameter_mm"] = fd._aorta_max_diameter(A, m)
        f.info.update({k: v for k, v in meas.items() if k != "centroid"})
        f.info["centroid"] = [float(v) for v in meas["centroid"]]
        f.info["volume_ml"] = f.volume_ml
        out.append(f)
    return out
