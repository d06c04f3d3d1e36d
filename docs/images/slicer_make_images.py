"""Render docs/images/slicer_prompt_overlay.png from the MRML nodes the CTLanguage module creates.

Runs without the Slicer application (slicer-core wheel): phantom CT -> scalar volume node ->
session (real engine + embedded model when available, else the phantom's truth masks as a clearly
labelled stand-in) -> segmentation node + findings table node. The picture is composed from what
MRML holds: each segment is exported back as a labelmap on the CT grid, the table rows are read
from the vtkMRMLTableNode. It is NOT a screen capture of the Slicer window.

    .venv/bin/python docs/images/slicer_make_images.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CTLanguage"))

import slicer  # noqa: E402

from CTLanguageLib import mrml_glue  # noqa: E402
from CTLanguageLib.session import CTLanguageSession  # noqa: E402

OUT = Path(__file__).resolve().parent / "slicer_prompt_overlay.png"
PROMPTS = "liver; liver lesion; fluid around the left lung; left kidney"


def font(size):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def stand_in_engine(case):
    """Phantom truth masks in the engine's Finding shape (used only when no model is available)."""
    from ctlanguage import vocabulary

    class Engine:
        model_id = "phantom-truth (no model)"

        def encode(self, volume, progress=None, cancel=None):
            return SimpleNamespace(volume=volume)

        def query(self, enc, text, mask_threshold=0.5):
            out = []
            for p in [t.strip() for t in text.split(";") if t.strip()]:
                key = {"liver": "liver", "left kidney": "kidney_left"}.get(p)
                if key:
                    mask, prob, finding = case.anatomy_mask(key).astype(np.uint8), None, None
                else:
                    want = {"liver lesion": ("liver_lesion", "liver_cyst"), "fluid around the left lung": ("pleural_effusion",)}[p]
                    mask = np.zeros(case.volume.shape, np.uint8)
                    for f in case.findings:
                        if f.name in want and (p != "fluid around the left lung" or f.laterality == "left"):
                            mask |= (f.mask > 0).astype(np.uint8)
                    prob, finding = (1.0 if mask.any() else 0.0), want[0]
                    key = "liver" if finding.startswith("liver") else "pleural_space_left"
                ml = float(mask.sum()) * abs(np.linalg.det(case.ijk_to_ras[:3, :3])) / 1000
                out.append(SimpleNamespace(prompt=p, anatomy=key, finding=finding, laterality=None,
                                           probability=prob, prompt_confidence=1.0, mask=mask, volume_ml=ml,
                                           color=vocabulary.color(finding or key), codes=None))
            return out

    return Engine()


def main():
    from ctlanguage.exports.html_report import ras_view
    from ctlanguage.phantom import generate_case

    case = generate_case(7)
    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    volume = mrml_glue.ctvolume_to_volume_node(
        scene, SimpleNamespace(array=case.volume, ijk_to_ras=case.ijk_to_ras), "phantom_007")
    try:
        from ctlanguage.engine import Engine

        engine = Engine.load("default", device="cpu")
        model_id = f"{engine.model_id} {engine.model_version}"
    except Exception as exc:  # no model yet
        print(f"no model available ({exc}); using the phantom's truth masks as a labelled stand-in")
        engine = stand_in_engine(case)
        model_id = engine.model_id
    session = CTLanguageSession(scene, engine_loader=lambda m, d: engine)
    session.model_id = model_id
    session.encode_inline(volume)
    results = session.run_prompts(volume, PROMPTS)
    seg = session.segmentation_node(volume)
    rows = mrml_glue.table_rows(session.table_node(volume))

    ct, (s_mm, a_mm, r_mm) = ras_view(mrml_glue.array_from_volume_node(volume), mrml_glue.ijk_to_ras_of_node(volume))
    masks = []
    for r in results:
        m = mrml_glue.segment_mask_on_reference(scene, seg, r.segment_id, volume)
        view, _ = ras_view(m, mrml_glue.ijk_to_ras_of_node(volume))
        rgb = seg.GetSegmentation().GetSegment(r.segment_id).GetColor()
        masks.append((view, rgb))
    focus = next((v for v, _ in masks[1:] if v.any()), masks[0][0])
    cs, ca, cr = [int(round(x)) for x in np.argwhere(focus).mean(axis=0)] if focus.any() else [d // 2 for d in ct.shape]

    def panel(ct2d, mask_list, row_mm, col_mm, size=420):
        gray = np.clip((ct2d.astype(np.float32) + 160.0) * (255.0 / 400.0), 0, 255)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        for m2d, colour in mask_list:
            m = m2d.astype(bool)
            col = np.asarray(colour, np.float32) * 255.0
            rgb[m] = rgb[m] * 0.55 + col * 0.45
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            rgb[edge] = col
        img = Image.fromarray(rgb.astype(np.uint8), "RGB")
        h_mm, w_mm = ct2d.shape[0] * row_mm, ct2d.shape[1] * col_mm
        scale = size / max(h_mm, w_mm)
        return img.resize((max(int(w_mm * scale), 1), max(int(h_mm * scale), 1)), Image.BILINEAR)

    axial = panel(ct[cs][::-1, ::-1], [(v[cs][::-1, ::-1], c) for v, c in masks], a_mm, r_mm)       # radiological: A up, R on the left
    coronal = panel(ct[:, ca, :][::-1, ::-1], [(v[:, ca, :][::-1, ::-1], c) for v, c in masks], s_mm, r_mm)

    W, H = 1400, 60 + max(axial.height, coronal.height) + 40
    canvas = Image.new("RGB", (W, H), (30, 30, 36))
    d = ImageDraw.Draw(canvas)
    d.text((20, 14), "CTLanguage — prompts on a synthetic phantom CT (MRML nodes rendered with numpy, not a Slicer screen capture)",
           font=font(18), fill=(230, 230, 230))
    canvas.paste(axial, (20, 60))
    canvas.paste(coronal, (20 + axial.width + 20, 60))
    ylab = 60 + max(axial.height, coronal.height) + 8
    d.text((20, ylab), "axial (radiological view)", font=font(15), fill=(180, 180, 180))
    d.text((40 + axial.width, ylab), "coronal", font=font(15), fill=(180, 180, 180))
    x0 = 40 + axial.width + coronal.width + 20
    d.text((x0, 60), f"research use only — model: {model_id}", font=font(16), fill=(255, 190, 90))
    y = 100
    d.text((x0, y), "prompt", font=font(15), fill=(200, 200, 200))
    d.text((x0 + 250, y), "p", font=font(15), fill=(200, 200, 200))
    d.text((x0 + 320, y), "ml", font=font(15), fill=(200, 200, 200))
    for row, (_, rgb) in zip(rows, masks):
        y += 30
        d.rectangle((x0, y + 3, x0 + 14, y + 17), fill=tuple(int(255 * c) for c in rgb))
        d.text((x0 + 22, y), row["prompt"][:26], font=font(15), fill=(235, 235, 235))
        p = row["probability"]
        d.text((x0 + 250, y), "—" if p != p else f"{p:.2f}", font=font(15), fill=(235, 235, 235))
        d.text((x0 + 320, y), f"{row['volume_ml']:.0f}", font=font(15), fill=(235, 235, 235))
    canvas.save(OUT, optimize=True)
    print(f"wrote {OUT} ({canvas.size[0]}x{canvas.size[1]}), model: {model_id}")


if __name__ == "__main__":
    main()
