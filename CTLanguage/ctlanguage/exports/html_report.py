"""Self-contained HTML report: probability table + key axial/coronal images with mask overlays.

Images are embedded as base64 PNG (one file, opens offline). Key slices are shown in the
radiological convention (patient right on the image's left, anterior/superior up), whatever the
voxel order of the source volume, with square pixels in millimetres.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..volume import voxel_spacing
from . import finding_color

RESEARCH_NOTICE = (
    "Not a medical device; not for diagnosis or treatment decisions. Every number is a model "
    "output and can be wrong; the table says which model produced it and how it was calibrated."
)

_LUNG_WORDS = ("lung", "emphysema", "nodule", "consolidation", "atelectasis", "pleural")


def _ras_axes(ijk_to_ras: np.ndarray) -> list[tuple[int, int, float]]:
    """(array dim, sign, voxel size) of the S, A and R axes: nearest axis permutation."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    spacing_ijk = tuple(float(s) for s in voxel_spacing(ijk_to_ras))
    # array dimension for voxel axis i, j, k is 2, 1, 0
    dim_of_axis = {0: 2, 1: 1, 2: 0}
    order = [None, None, None]  # ras axis -> (array dim, sign, spacing)
    used = set()
    for ras_axis in np.argsort(-np.abs(m).max(axis=1)):  # most decisive first
        cands = [a for a in range(3) if a not in used]
        a = max(cands, key=lambda c: abs(m[ras_axis, c]) / max(spacing_ijk[c], 1e-9))
        used.add(a)
        order[int(ras_axis)] = (dim_of_axis[a], 1 if m[ras_axis, a] >= 0 else -1, spacing_ijk[a])
    return [order[2], order[1], order[0]]  # type: ignore[list-item]


def ras_view(array: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A *view* of a [k, j, i] array reordered to [S, A, R] with increasing index = +S/+A/+R,
    plus the voxel size along (S, A, R). Nearest axis permutation; no resampling, no copy."""
    s_, a_, r_ = _ras_axes(ijk_to_ras)
    view = np.transpose(array, (s_[0], a_[0], r_[0]))
    sl = tuple(slice(None, None, sign) for _, sign, _ in (s_, a_, r_))
    return view[sl], (s_[2], a_[2], r_[2])


def _largest_sections(mask: np.ndarray, ijk_to_ras: np.ndarray, extent) -> tuple[int, int] | None:
    """(S index, A index) in ``ras_view`` order of the mask's largest axial and coronal sections,
    summing only inside its bounding box; None for an empty mask."""
    if extent is None or extent.box is None:
        return None
    crop = mask[extent.box]
    s_, a_, r_ = _ras_axes(ijk_to_ras)
    kept = [d for d in range(3) if d != r_[0]]           # array dims of S and A, in array order
    proj = crop.sum(axis=r_[0], dtype=np.int64)          # one pass: counts over (S, A) planes
    out = []
    for dim, sign, _ in (s_, a_):
        prof = np.zeros(mask.shape[dim], np.int64)
        prof[extent.box[dim]] = proj.sum(axis=1 - kept.index(dim))
        out.append(int(np.argmax(prof[::sign])))
    return out[0], out[1]


def _window(ct: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2.0
    g = (ct.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(g, 0, 255).astype(np.uint8)


def _edges(m: np.ndarray) -> np.ndarray:
    e = np.zeros_like(m)
    e[1:, :] |= m[1:, :] != m[:-1, :]
    e[:-1, :] |= m[1:, :] != m[:-1, :]
    e[:, 1:] |= m[:, 1:] != m[:, :-1]
    e[:, :-1] |= m[:, 1:] != m[:, :-1]
    return e & m


def render_overlay(ct2d: np.ndarray, mask2d: np.ndarray | None, color, row_mm: float, col_mm: float,
                   level: float, width: float, size: int = 320) -> Image.Image:
    """Windowed slice with the mask blended in and its outline drawn, ``size`` pixels on the long
    side with square pixels in mm. Scaled first and drawn at display resolution: a mask pixel is
    shown where it covers at least a quarter of a display pixel, so small findings never vanish."""
    h_mm, w_mm = ct2d.shape[0] * row_mm, ct2d.shape[1] * col_mm
    scale = size / max(h_mm, w_mm)
    new = (max(int(round(w_mm * scale)), 1), max(int(round(h_mm * scale)), 1))
    gray = np.asarray(Image.fromarray(_window(ct2d, level, width), "L").resize(new, Image.BILINEAR))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if mask2d is not None:
        cover = Image.fromarray((np.asarray(mask2d) != 0).astype(np.uint8) * np.uint8(255), "L")
        m = np.asarray(cover.resize(new, Image.BOX)) >= 64  # area coverage
        col = np.asarray(color, dtype=np.float32) * 255.0
        rgb[m] = np.clip(rgb[m] * np.float32(0.55) + col * np.float32(0.45), 0, 255)
        rgb[_edges(m)] = np.clip(col, 0, 255)
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def _label(img: Image.Image, left: str, right: str, top: str, bottom: str) -> Image.Image:
    """Orientation letters at the edges and the window in the bottom-left corner."""
    d = ImageDraw.Draw(img)
    w, h = img.size

    def text(xy, t):
        x, y = xy
        d.text((x + 1, y + 1), t, fill=(0, 0, 0))
        d.text((x, y), t, fill=(255, 230, 0))

    text((3, h // 2 - 5), left)
    text((w - 10, h // 2 - 5), right)
    text((w // 2 - 3, 2), top)
    text((3, h - 13), bottom)
    return img


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)  # 2-3x faster than 6, as small
    return base64.b64encode(buf.getvalue()).decode("ascii")


def key_images(volume: Any, finding: Any, index: int = 0, size: int = 320,
               extent=None) -> dict[str, str]:
    """{'axial': b64png, 'coronal': b64png} through the largest cross-sections of the mask
    (``extent``: the mask's ``MaskExtent``, computed when not given)."""
    from .extent import mask_extent

    ct, (ds, da, dr) = ras_view(volume.array, volume.ijk_to_ras)
    mask = getattr(finding, "mask", None)
    mv = ras_view(mask, volume.ijk_to_ras)[0] if mask is not None else None
    words = " ".join(str(getattr(finding, k, "") or "") for k in ("anatomy", "finding", "prompt")).lower()
    level, width = (-600.0, 1500.0) if any(w in words for w in _LUNG_WORDS) else (40.0, 400.0)
    if mask is not None and extent is None:
        extent = mask_extent(mask)
    sections = _largest_sections(mask, volume.ijk_to_ras, extent) if mask is not None else None
    s_idx, a_idx = sections if sections is not None else (ct.shape[0] // 2, ct.shape[1] // 2)
    color = finding_color(finding, index)
    # axial: rows = A (anterior up -> reverse), cols = R (patient right on the left -> reverse)
    ax_ct = ct[s_idx, ::-1, ::-1]
    ax_m = mv[s_idx, ::-1, ::-1] if mv is not None else None
    # coronal: rows = S (superior up -> reverse), cols = R reversed
    co_ct = ct[::-1, a_idx, ::-1]
    co_m = mv[::-1, a_idx, ::-1] if mv is not None else None
    win = f"W {width:g} / L {level:g}"
    axial = _label(render_overlay(ax_ct, ax_m, color, da, dr, level, width, size), "R", "L", "A", win)
    coronal = _label(render_overlay(co_ct, co_m, color, ds, dr, level, width, size), "R", "L", "S", win)
    return {"axial": _png_b64(axial), "coronal": _png_b64(coronal), "window": win}


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "—"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return html.escape(str(v))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} .meta{color:#555;font-size:.9em}
.notice{background:#fff4e5;border:1px solid #f0a030;padding:.6em 1em;margin:1em 0;border-radius:4px}
table{border-collapse:collapse;margin:1em 0} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.7em;background:#3a7bd5;vertical-align:middle;margin-left:.4em}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #555;vertical-align:middle;margin-right:.3em}
figure{display:inline-block;margin:.4em;text-align:center} figcaption{font-size:.85em;color:#444}
.finding{margin:1.2em 0;border-top:1px solid #ddd;padding-top:.6em}
"""


def build_html(volume: Any, findings: Sequence[Any], *, model: dict, input_info: dict,
               mask_paths: Sequence[str | None] | None = None, extra: dict | None = None,
               images: bool = True, progress=None, extents=None) -> str:
    esc = html.escape
    created = (extra or {}).get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for idx, f in enumerate(findings):
        r, g, b = finding_color(f, idx)
        sw = f'<span class="swatch" style="background:rgb({int(r*255)},{int(g*255)},{int(b*255)})"></span>'
        p = getattr(f, "probability", None)
        bar = f'<span class="bar" style="width:{int(round(float(p) * 80))}px"></span>' if p is not None else ""
        rows.append(
            "<tr>"
            f"<td>{sw}{esc(str(f.prompt))}{_prompt_note(f)}</td>"
            f"<td>{esc(str(getattr(f, 'anatomy', None) or '—'))}</td>"
            f"<td>{esc(str(getattr(f, 'finding', None) or '—'))}</td>"
            f"<td>{esc(str(getattr(f, 'laterality', None) or '—'))}</td>"
            f"<td class=num>{_fmt(p, '.3f')}{bar}</td>"
            f"<td>{esc(getattr(f, 'score_label', None) or '—')}</td>"
            f"<td class=num>{_fmt(getattr(f, 'prompt_confidence', None), '.2f')}</td>"
            f"<td class=num>{_fmt(getattr(f, 'volume_ml', None), '.2f')}</td>"
            f"<td>{esc(mask_paths[idx]) if mask_paths and mask_paths[idx] else '—'}</td>"
            f"<td>{esc(_models(f))}</td>"
            "</tr>"
        )
    sections = []
    if images:
        from .extent import extents_for

        extents = extents_for(findings, extents)
        n = max(len(findings), 1)
        for idx, f in enumerate(findings):
            mask = getattr(f, "mask", None)
            if mask is None or extents[idx].empty:
                why = ("the prompt was not understood" if not getattr(f, "understood", True) else
                       "the finding was judged absent (no mask drawn)" if getattr(f, "mask_suppressed", False)
                       else "no voxels above the mask threshold")
                sections.append(
                    f'<div class="finding"><h3>{esc(str(f.prompt))}</h3><p>Nothing to show: '
                    f"{why}.</p></div>"
                )
            else:
                imgs = key_images(volume, f, idx, extent=extents[idx])
                sections.append(
                    f'<div class="finding"><h3>{esc(str(f.prompt))}</h3>'
                    f'<figure><img alt="axial key image: {esc(str(f.prompt))}" '
                    f'src="data:image/png;base64,{imgs["axial"]}"><figcaption>axial, {imgs["window"]}</figcaption></figure>'
                    f'<figure><img alt="coronal key image: {esc(str(f.prompt))}" '
                    f'src="data:image/png;base64,{imgs["coronal"]}"><figcaption>coronal, {imgs["window"]}</figcaption></figure>'
                    "</div>"
                )
            if progress:
                progress((idx + 1) / n, f"key images {idx + 1}/{n}")
    model_line = (
        f"{esc(str(model.get('id')))} version {esc(str(model.get('version')))}"
        f" &middot; sha256 <code>{esc(str(model.get('sha256') or '—')[:16])}…</code>"
    )
    shape = input_info.get("shape")
    spacing = input_info.get("spacing")
    inp = esc(str(input_info.get("path") or "—"))
    series = input_info.get("series_uid")
    thr = (extra or {}).get("mask_threshold")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>CTLanguage findings</title>
<style>{_CSS}</style></head><body>
<h1>CTLanguage findings</h1>
<div class="notice"><strong>Research use only.</strong> {esc(RESEARCH_NOTICE)}{_model_notice(model)}</div>
<p class="meta">Model: {model_line}<br>
Input: {inp}{' &middot; series ' + esc(str(series)) if series else ''}<br>
Shape (k, j, i): {esc(str(shape))} &middot; spacing (k, j, i) mm: {esc(str(spacing))}<br>
Mask threshold: {esc(str(thr)) if thr is not None else '—'} &middot; created {esc(str(created))}</p>
<table><thead><tr><th>prompt</th><th>anatomy</th><th>finding</th><th>laterality</th>
<th>value</th><th>what the value is</th><th>prompt confidence</th><th>volume (ml)</th><th>mask</th>
<th>models (mask / value)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p class="meta">Value: for a finding, the probability that it is present in the anatomy it was
judged in — or absent, for a negated prompt ("no pleural effusion") — when the model is calibrated
(on which cohort is said), otherwise an uncalibrated score; — for anatomy prompts and for text that
was not understood. A finding judged absent gets no mask. Prompt confidence: how sure the system is
that it understood the prompt.</p>
<h2>Key images</h2>
{chr(10).join(sections)}
</body></html>
"""


def _prompt_note(f: Any) -> str:
    esc = html.escape
    if not getattr(f, "understood", True):
        sug = ", ".join(getattr(f, "suggestions", ()) or ())
        return f"<br><em>not understood{esc(' — did you mean: ' + sug + '?') if sug else ''}</em>"
    if getattr(f, "negated", False):
        return "<br><em>negated question</em>"
    return ""


def _models(f: Any) -> str:
    m, s = getattr(f, "mask_model", None), getattr(f, "score_model", None)
    return f"{m or '—'} / {s or '—'}"


def _model_notice(model: dict) -> str:
    n = (model or {}).get("notice")
    return f"<br>{html.escape(str(n))}" if n else ""


def write_report(path: str | Path, volume: Any, findings: Sequence[Any], **kwargs: Any) -> Path:
    path = Path(path)
    text = build_html(volume, findings, **kwargs)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
