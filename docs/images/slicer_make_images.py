"""Render docs/images/slicer_prompt_overlay.png from the MRML nodes the CTLanguage module creates.

Runs without the Slicer application: phantom CT -> scalar volume node -> CTLanguage session (real
engine + embedded model when available, else the phantom's truth masks as a clearly labelled
stand-in) -> segmentation node + findings table node, all in a slicer-core scene. The axial and
coronal images are real Slicer slice views (vtkMRMLSliceLogic + Slicer's segmentation displayable
manager, through trame-slicer's serverless view factory, rendered offscreen with EGL/OSMesa); the
table is drawn from the vtkMRMLTableNode. It is NOT a capture of the whole Slicer main window.

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

from CTLanguageLib import mrml_glue, results_table  # noqa: E402
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
    """Phantom truth masks as the engine's Findings (used only when no model is available)."""
    from ctlanguage import segment_codes, vocabulary
    from ctlanguage.engine import Finding
    from ctlanguage.prompts import split_prompts

    class Engine:
        model_id = "phantom-truth (no model)"

        def describe(self):
            return {"id": self.model_id, "version": "", "sha256": None}

        def encode(self, volume, progress=None, cancel=None):
            return SimpleNamespace(volume=volume)

        def query(self, enc, text, mask_threshold=0.5):
            out = []
            for p in split_prompts(text):
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
                out.append(Finding(prompt=p, parsed=None, kind="finding" if finding else "anatomy", anatomy=key,
                                   finding=finding, laterality=None, probability=prob, prompt_confidence=1.0,
                                   mask=mask, volume_ml=ml, codes=None, color=vocabulary.color(finding or key),
                                   name=p, terminology=segment_codes.slicer_terminology_string(finding or key)))
            return out

    return Engine()


def render_slice_views(scene_setup):
    """Real Slicer slice views (offscreen) of what ``scene_setup(scene)`` puts in the scene."""
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    volume, focus_ras, extra = scene_setup(app.scene)
    images = []
    for definition in (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()):
        view = app.view_manager.create_view(definition)
        view.set_background_volume_id(volume.GetID())
        view.render_window().SetAlphaBitPlanes(1)
        view.render_window().SetSize(440, 440)
        view.fit_view_to_content()
        view.get_view_node().JumpSliceByCentering(*focus_ras)
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        from vtk.util import numpy_support

        rgb = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
        images.append(Image.fromarray(np.ascontiguousarray(rgb)))
    return images, extra


def main():
    from ctlanguage.phantom import generate_case

    case = generate_case(7)
    try:
        from ctlanguage.engine import Engine

        engine = Engine.load("default", device="cpu")
        model_id = f"{engine.model_id} {engine.model_version}"
    except Exception as exc:  # no model yet
        print(f"no model available ({exc}); using the phantom's truth masks as a labelled stand-in")
        engine = stand_in_engine(case)
        model_id = engine.model_id

    def setup(scene):
        volume = mrml_glue.ctvolume_to_volume_node(
            scene, SimpleNamespace(array=case.volume, ijk_to_ras=case.ijk_to_ras), "phantom_007")
        session = CTLanguageSession(scene, engine_loader=lambda m, d: engine)
        session.model_id = model_id
        session.encode_inline(volume)
        results = session.run_prompts(volume, PROMPTS)
        seg = session.segmentation_node(volume)
        display = seg.GetDisplayNode()
        # Outlines only: offscreen, the 2D fill layer is composited over black instead of over the
        # CT (seen with EGL here), which would misrepresent what Slicer shows.
        display.SetAllSegmentsOpacity2DFill(0.0)
        display.SetSliceIntersectionThickness(3)
        rows = results_table.table_rows(session.table_node(volume))
        colours = [seg.GetSegmentation().GetSegment(r.segment_id).GetColor() for r in results]
        focus = next((r for r in results[1:] if r.finding.mask.any()), results[0])
        centre = mrml_glue.mask_center_ras(focus.finding.mask, case.ijk_to_ras) or [0.0, 0.0, 0.0]
        return volume, centre, (rows, colours)

    (axial, coronal), (rows, colours) = render_slice_views(setup)

    W, H = 1400, 60 + max(axial.height, coronal.height) + 40
    canvas = Image.new("RGB", (W, H), (30, 30, 36))
    d = ImageDraw.Draw(canvas)
    d.text((20, 14), "CTLanguage — prompts on a synthetic phantom CT (Slicer slice views rendered offscreen from the module's MRML nodes)",
           font=font(17), fill=(230, 230, 230))
    canvas.paste(axial, (20, 60))
    canvas.paste(coronal, (40 + axial.width, 60))
    ylab = 60 + max(axial.height, coronal.height) + 8
    d.text((20, ylab), "axial", font=font(15), fill=(180, 180, 180))
    d.text((40 + axial.width, ylab), "coronal", font=font(15), fill=(180, 180, 180))
    x0 = 60 + axial.width + coronal.width + 20
    d.text((x0, 60), f"research use only — model: {model_id}", font=font(15), fill=(255, 190, 90))
    y = 100
    d.text((x0, y), "prompt", font=font(15), fill=(200, 200, 200))
    d.text((x0 + 250, y), "p", font=font(15), fill=(200, 200, 200))
    d.text((x0 + 320, y), "ml", font=font(15), fill=(200, 200, 200))
    for row, rgb in zip(rows, colours):
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
