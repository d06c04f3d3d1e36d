"""One browser session's data: its own MRML scene, CT, encoding, prompt results and exports.

Nothing here knows about trame widgets: :class:`WebSession` works on a trame-slicer
``SlicerApp`` (scene + view manager) and reuses the Slicer module's logic core
(``CTLanguageLib.session.CTLanguageSession``: engine, encodings, segments, findings table) and
the engine's exports (``ctlanguage.exports.export_all``). The trame app (``app.py``) only moves
values between this class and the page.

Errors a user can cause (bad upload, no volume, empty prompt ...) are raised as ``ValueError``
with one sentence meant for the page.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 512
# a finding is shown as likely present (bold) from this probability on; every mask is drawn
# whatever its probability (the page is for looking at what the model found)
PRESENT_THRESHOLD = 0.5
# bundled synthetic cases: (id, phantom seed, title). The phantom is deterministic per seed.
BUNDLED_CASES = (
    ("synthetic-a", 1, "Synthetic torso A (seed 1)"),
    ("synthetic-b", 5, "Synthetic torso B (seed 5)"),
    ("synthetic-c", 4, "Synthetic torso C (seed 4)"),
)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
ZIP_MAX_FILES = 5000
ZIP_MAX_RATIO = 50  # refuse archives that expand more than this (zip bombs)

# export kind -> (file name in the export folder, download name, MIME type)
EXPORTS = {
    "seg_nrrd": ("segmentation.seg.nrrd", "ctlanguage-segmentation.seg.nrrd", "application/octet-stream"),
    "masks": ("masks.zip", "ctlanguage-masks-nifti.zip", "application/zip"),
    "dicom_seg": ("segmentation.dcm", "ctlanguage-segmentation.dcm", "application/dicom"),
    "csv": ("findings.csv", "ctlanguage-findings.csv", "text/csv"),
    "json": ("findings.json", "ctlanguage-findings.json", "application/json"),
    "html": ("report.html", "ctlanguage-report.html", "text/html"),
    "all": ("all.zip", "ctlanguage-results.zip", "application/zip"),
}


@dataclass
class LoadedInput:
    name: str            # what the page shows
    kind: str            # "synthetic" | "nifti" | "nrrd" | "mha" | "dicom"
    volume: object       # ctlanguage.volume.CTVolume as read (keeps DICOM provenance for DICOM SEG)
    truth: list          # phantom ground truth: [(finding key, laterality, mask)] (synthetic only)


def _fmt(value, digits=2):
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "—" if v != v else f"{v:.{digits}f}"


def _catalog_id(model: str) -> str:
    """'default' (or '') -> the catalog id of the default model, so the model menu can show it."""
    from ctlanguage import catalog

    if str(model or "default") not in catalog.DEFAULT_ALIASES:
        return str(model)
    try:
        return catalog.default_entry().id
    except Exception:  # noqa: BLE001 - no catalog: keep the alias, Engine.load resolves it
        return "default"


def _hex(color) -> str:
    """A finding's RGB colour (0..255 integers) as '#rrggbb'."""
    r, g, b = (min(max(int(c), 0), 255) for c in color[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def safe_extract_zip(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract a DICOM zip safely (no absolute paths or '..', bounded size and file count)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise ValueError(f"'{archive.name}' is not a valid zip archive.") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not infos:
            raise ValueError(f"'{archive.name}' is empty.")
        if len(infos) > ZIP_MAX_FILES:
            raise ValueError(f"'{archive.name}' holds {len(infos)} files; at most {ZIP_MAX_FILES} are accepted.")
        total = sum(i.file_size for i in infos)
        if total > max_bytes or total > ZIP_MAX_RATIO * max(archive.stat().st_size, 1):
            raise ValueError(f"'{archive.name}' expands to {total / 1e6:.0f} MB, more than this demo accepts.")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for info in infos:
            target = (dest / info.filename).resolve()
            if root not in target.parents:
                raise ValueError(f"'{archive.name}' contains an unsafe path ({info.filename!r}).")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


class WebSession:
    """State of one browser session. ``slicer_app`` is a ``trame_slicer.core.SlicerApp`` (or any
    object with ``scene``, ``view_manager``); ``work_dir`` is this session's private folder."""

    def __init__(self, slicer_app, work_dir, model: str = "default", device: str | None = "cpu",
                 engine_loader=None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        from CTLanguageLib.session import CTLanguageSession

        self.app = slicer_app
        self.scene = slicer_app.scene
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logic = CTLanguageSession(self.scene, engine_loader=engine_loader)
        self.logic.set_model(_catalog_id(model), device)
        self.logic.probability_threshold = 0.0  # draw every mask; PRESENT_THRESHOLD marks rows
        self.max_upload_bytes = int(float(max_upload_mb) * 1e6)
        self.input: LoadedInput | None = None
        self.volume_node = None
        self._n_loads = 0
        self._results_version = 0
        self._export_dir: Path | None = None
        self._export_version = -1
        self._export_lock = threading.Lock()
        self.export_warnings: list[str] = []   # what the last export reported (e.g. no DICOM SEG, why)

    # ---- loading -----------------------------------------------------------------------------
    @staticmethod
    def bundled_cases() -> list[dict]:
        return [{"value": cid, "title": title} for cid, _seed, title in BUNDLED_CASES]

    def load_bundled(self, case_id: str) -> LoadedInput:
        match = [c for c in BUNDLED_CASES if c[0] == case_id]
        if not match:
            raise ValueError(f"Unknown synthetic case {case_id!r}.")
        _cid, seed, title = match[0]
        from ctlanguage.phantom import generate_case
        from ctlanguage.volume import CTVolume

        case = generate_case(seed)
        volume = CTVolume(array=np.asarray(case.volume, dtype=np.float32),
                          ijk_to_ras=np.asarray(case.ijk_to_ras, dtype=np.float64),
                          source=f"synthetic phantom seed {seed}", modality="CT")
        truth = [(f.name, f.laterality, np.asarray(f.mask)) for f in case.findings]
        return self._install(LoadedInput(title, "synthetic", volume, truth))

    def load_upload(self, files: list[tuple[str, bytes]]) -> LoadedInput:
        n_before = self._n_loads
        try:
            return self._load_upload(files)
        except ValueError:
            if self._n_loads != n_before:  # a refused upload leaves no file behind
                shutil.rmtree(self.work_dir / f"upload_{self._n_loads:03d}", ignore_errors=True)
            raise

    def _load_upload(self, files: list[tuple[str, bytes]]) -> LoadedInput:
        """``files``: [(file name, content)] as sent by the page. One volume file (NIfTI, NRRD,
        MHA) or one zip of a DICOM folder (or several .dcm files of one series)."""
        from ctlanguage.errors import CTLanguageError
        from ctlanguage.io import read_ct

        files = [(os.path.basename(str(n or "")).strip(), c) for n, c in files if n]
        if not files:
            raise ValueError("No file was received; choose a NIfTI/NRRD file or a zipped DICOM folder.")
        total = sum(len(c) for _n, c in files)
        if total > self.max_upload_bytes:
            raise ValueError(f"The upload is {total / 1e6:.1f} MB; this demo accepts at most "
                             f"{self.max_upload_bytes / 1e6:g} MB.")
        self._n_loads += 1
        folder = self.work_dir / f"upload_{self._n_loads:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, content in files:
            if not name or name in (".", ".."):
                raise ValueError("A file without a usable name was uploaded.")
            (folder / name).write_bytes(content)
        names = [n for n, _c in files]
        lower = [n.lower() for n in names]
        if len(files) == 1 and lower[0].endswith(".zip"):
            path = safe_extract_zip(folder / names[0], folder / "unzipped", self.max_upload_bytes)
            (folder / names[0]).unlink()
            # a zip holding a single volume file is accepted too
            vols = [p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)]
            if vols and len(vols) == 1 and not any(p.suffix.lower() == ".dcm" for p in path.rglob("*")):
                path = vols[0]
        elif len(files) == 1 and lower[0].endswith(VOLUME_SUFFIXES):
            path = folder / names[0]
        elif all(n.endswith(".dcm") for n in lower):
            path = folder
        else:
            raise ValueError(
                f"Unsupported upload {', '.join(names)!s}: choose one .nii/.nii.gz/.nrrd/.mha file or a "
                ".zip of a DICOM folder.")
        def hide_paths(text: str) -> str:  # the page need not see this server's folders
            for p in (folder / "unzipped", folder):
                text = text.replace(str(p) + os.sep, "").replace(str(p), "the upload")
            return text

        try:
            volume = read_ct(path)
        except CTLanguageError as exc:
            raise ValueError(hide_paths(str(exc))) from None
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad upload, not a crash
            raise ValueError(hide_paths(f"'{names[0]}' could not be read as a CT volume ({exc}).")) from None
        kind = "dicom" if path.is_dir() else next(s for s in ("nii", "nrrd", "mha") if s in path.name.lower())
        kind = {"nii": "nifti"}.get(kind, kind)
        return self._install(LoadedInput(names[0] if len(names) == 1 else f"{len(names)} DICOM files",
                                         kind, volume, []))

    def _remove_previous(self) -> None:
        if self.volume_node is None:
            return
        vid = self.volume_node.GetID()
        state = self.logic.states.pop(vid, None)
        ids = [vid]
        if state is not None:
            ids += [state.segmentation_node_id, state.table_node_id, state.heatmap_node_id]
        for nid in ids:
            node = self.scene.GetNodeByID(nid) if nid else None
            if node is not None:
                self.scene.RemoveNode(node)
        self.volume_node = None

    def _install(self, loaded: LoadedInput) -> LoadedInput:
        from CTLanguageLib import mrml_glue

        self._remove_previous()
        name = "CT" if loaded.kind != "synthetic" else "Synthetic CT"
        node = mrml_glue.ctvolume_to_volume_node(self.scene, loaded.volume, name=name)
        self.volume_node = node
        self.input = loaded
        self._results_version += 1
        for view in self.app.view_manager.get_slice_views():
            view.set_background_volume_id(node.GetID())
            view.set_foreground_volume_id(None)
            try:  # the axial slice also shows in the 3D view, under the finding surfaces (all
                # three planes would hide a finding they all cross after a jump)
                view.set_visible_in_3d(str(view.get_orientation()).lower() == "axial")
            except Exception:  # noqa: BLE001
                pass
        self.reset_views()
        return loaded

    def reset_views(self) -> None:
        for view in self.app.view_manager.get_views():
            try:
                view.reset_view()
            except Exception:  # noqa: BLE001 - a view that is not mapped yet
                log.debug("reset_view failed", exc_info=True)
        for view in self.app.view_manager.get_threed_views():
            try:  # an oblique anterior-left view shows all three slice planes and the surfaces
                cam = view.renderer().GetActiveCamera()
                cam.Azimuth(-35)
                cam.Elevation(20)
                cam.OrthogonalizeViewUp()
                view.renderer().ResetCameraClippingRange()
                view.schedule_render()
            except Exception:  # noqa: BLE001
                log.debug("3D camera setup failed", exc_info=True)

    def volume_summary(self) -> str:
        from ctlanguage.volume import voxel_spacing

        if self.input is None:
            return ""
        v = self.input.volume
        sp = voxel_spacing(v.ijk_to_ras)
        k, j, i = np.shape(v.array)
        return (f"{self.input.name}: {i}×{j}×{k} voxels, {sp[0]:.2f}×{sp[1]:.2f}×{sp[2]:.2f} mm"
                f" ({self.input.kind})")

    def truth_summary(self) -> str:
        if self.input is None or self.input.kind != "synthetic":
            return ""
        if not self.input.truth:
            return "Ground truth: no findings (a normal synthetic torso)."
        names = sorted({(f"{lat} " if lat else "") + key.replace("_", " ") for key, lat, _m in self.input.truth})
        return "Ground truth: " + ", ".join(names) + "."

    # ---- encoding ----------------------------------------------------------------------------
    def is_encoded(self) -> bool:
        return self.volume_node is not None and self.logic.is_encoded(self.volume_node)

    def encode(self, progress=None, cancel=None):
        """Blocking encode (run it in a worker thread); the MRML scene is not modified."""
        if self.volume_node is None or self.input is None:
            raise ValueError("Load a CT or a synthetic case first.")
        volume, node = self.input.volume, self.volume_node
        if progress:
            progress(0.0, "Loading the model")
        engine = self.logic.engine()
        try:
            encoding = engine.encode(volume, progress=progress, cancel=cancel)
        except Exception as exc:
            raise ValueError(str(exc)) from exc
        if self.volume_node is node:  # the user did not load another CT meanwhile
            self.logic.state_for(node).encoding = encoding
        return encoding

    def model_label(self) -> str:
        return self.logic.model_label()

    def _model_choices(self) -> list:
        from CTLanguageLib import catalog_ui

        choices = catalog_ui.model_choices()
        if self.logic.model_id not in {c.spec for c in choices}:  # a model folder given at start
            choices.append(catalog_ui.ModelChoice(spec=self.logic.model_id, label=self.logic.model_id,
                                                  available=True, where="local folder"))
        return choices

    def model_choices(self) -> list[dict]:
        """Every model with what it can do, licence, size, CPU/GPU need, whether it is on disk and
        the demo model's limits: the Slicer module's menu (``CTLanguageLib.catalog_ui``)."""
        return [{"value": c.spec, "title": c.label, "details": c.details(notice=False), "notice": c.notice,
                 "props": {"disabled": not c.available}} for c in self._model_choices()]

    def set_model(self, spec: str) -> None:
        """Use another model that is on disk (encodings made with the old one are dropped)."""
        choice = next((c for c in self._model_choices() if c.spec == spec), None)
        if choice is None:
            raise ValueError(f"Unknown model {spec!r}.")
        if not choice.available:
            raise ValueError(f"{spec} is not on disk on this server ({choice.hint}).")
        self.logic.set_model(spec, self.logic.device)

    # ---- prompts -----------------------------------------------------------------------------
    def run_prompts(self, text: str) -> list[dict]:
        if self.volume_node is None:
            raise ValueError("Load a CT or a synthetic case first.")
        self.logic.run_prompts(self.volume_node, text)
        self._results_version += 1
        seg = self.logic.segmentation_node(self.volume_node)
        if seg is not None:
            display = seg.GetDisplayNode()
            if display is not None:
                display.SetOpacity2DFill(0.45)
                display.SetOpacity2DOutline(1.0)
                display.SetSliceIntersectionThickness(2)
                display.SetOpacity3D(1.0)  # translucent surfaces do not show with offscreen GL here
            try:  # no-op once the surfaces exist; new segments get theirs when added (glue)
                seg.CreateClosedSurfaceRepresentation()
            except Exception:  # noqa: BLE001 - 3D surfaces are a bonus
                log.warning("closed surface generation failed", exc_info=True)
        return self.rows()

    def remove_row(self, row: int) -> list[dict]:
        self.logic.remove_result(self.volume_node, int(row))
        self._results_version += 1
        return self.rows()

    def rows(self) -> list[dict]:
        out = []
        for n, r in enumerate(self.logic.results(self.volume_node)):
            f = r.finding
            prob = f.probability
            out.append({
                "row": n,
                "prompt": r.prompt,
                "anatomy": (f.anatomy or "").replace("_", " "),
                "finding": (f.finding or "").replace("_", " "),
                "probability": None if prob is None else round(float(prob), 4),
                "probability_text": ("not understood" if not f.understood else "anatomy" if prob is None
                                     else _fmt(prob) + ("" if f.calibrated else " (uncalibrated)")),
                "score_label": f.score_label or "",
                "models": " / ".join(dict.fromkeys(m for m in (f.mask_model, f.score_model) if m)),
                "confidence_text": _fmt(f.prompt_confidence),
                "volume_text": _fmt(f.volume_ml, 1),
                "color": _hex(f.color),
                "segment_id": r.segment_id,
                "present": prob is not None and float(prob) >= PRESENT_THRESHOLD,
                "has_mask": bool((f.volume_ml or 0.0) > 0.0),
            })
        return out

    # ---- views -------------------------------------------------------------------------------
    def slice_nodes(self) -> dict:
        nodes = {}
        for view in self.app.view_manager.get_slice_views():
            node = self.scene.GetNodeByID(view.get_view_node_id())
            if node is not None:
                nodes[str(node.GetOrientation() or node.GetName()).lower()] = node
        return nodes

    def jump_to_row(self, row: int):
        """Centre every slice view on the finding of ``row``; returns the RAS point or None."""
        target = self.logic.jump_target_ras(self.volume_node, int(row))
        if target is None:
            return None
        for node in self.slice_nodes().values():
            node.JumpSliceByCentering(*[float(x) for x in target])
        for view in self.app.view_manager.get_threed_views():
            try:
                cam = view.renderer().GetActiveCamera()
                cam.SetFocalPoint(*target)
                view.schedule_render()
            except Exception:  # noqa: BLE001
                pass
        return target

    def view_geometry(self, orientation: str = "axial") -> dict | None:
        """XY (view pixels, origin bottom-left) -> RAS matrix and view size of a slice view."""
        node = self.slice_nodes().get(orientation.lower())
        if node is None:
            return None
        m = node.GetXYToRAS()
        dims = node.GetDimensions()
        return {"xy_to_ras": [[m.GetElement(r, c) for c in range(4)] for r in range(4)],
                "width": int(dims[0]), "height": int(dims[1])}

    # ---- exports -----------------------------------------------------------------------------
    def export_kinds(self) -> list[dict]:
        kinds = [("seg_nrrd", "Segmentation (.seg.nrrd)"), ("masks", "Masks (NIfTI, zip)")]
        if self.input is not None and self.input.kind == "dicom":
            kinds.append(("dicom_seg", "DICOM SEG"))
        kinds += [("csv", "Findings (CSV)"), ("json", "Findings (JSON)"), ("html", "HTML report"),
                  ("all", "Everything (zip)")]
        return [{"kind": k, "label": label} for k, label in kinds]

    def export_file(self, kind: str) -> tuple[Path, str, str]:
        """Write (once per result set) every export and return ``(path, download name, mime)``."""
        if kind not in EXPORTS:
            raise ValueError(f"Unknown export {kind!r}.")
        if kind == "dicom_seg" and (self.input is None or self.input.kind != "dicom"):
            raise ValueError("DICOM SEG needs a DICOM input (upload a zipped DICOM folder).")
        results = self.logic.results(self.volume_node) if self.volume_node is not None else []
        if not results:
            raise ValueError("Nothing to export yet: run a prompt first.")
        with self._export_lock:
            if self._export_version != self._results_version or self._export_dir is None:
                self._write_exports([r.finding for r in results])
            fname, download, mime = EXPORTS[kind]
            path = self._export_dir / fname
            if not path.is_file():   # e.g. a DICOM SEG the source series cannot carry: say why
                why = [w for w in self.export_warnings if w.startswith(fname)]
                raise ValueError(why[0] if why else f"The {kind} export is not available for this input.")
            return path, download, mime

    def _write_exports(self, findings) -> None:
        from ctlanguage.errors import CTLanguageError
        from ctlanguage.exports import export_all

        base = self.work_dir / "exports"
        base.mkdir(exist_ok=True)
        out = base / f"v{self._results_version:04d}"
        shutil.rmtree(out, ignore_errors=True)
        extra = {"prompts": [f.prompt for f in findings], "research_use_only": True,
                 "exported_from": "CTLanguage web demo (trame-slicer)",
                 "present_threshold": PRESENT_THRESHOLD}
        try:
            result = export_all(self.input.volume, findings, out, model=self.logic.model_record(),
                                mask_threshold=self.logic.mask_threshold, extra=extra)
        except CTLanguageError as exc:
            raise ValueError(str(exc)) from None
        self.export_warnings = list(result.warnings)
        with zipfile.ZipFile(out / "masks.zip", "w", zipfile.ZIP_STORED) as zf:
            for p in sorted((out / "masks").glob("*")):
                zf.write(p, f"masks/{p.name}")
        with zipfile.ZipFile(out / "all.zip", "w", zipfile.ZIP_STORED) as zf:
            for p in sorted(out.rglob("*")):
                if p.is_file() and p.name not in ("all.zip", "masks.zip"):
                    zf.write(p, p.relative_to(out).as_posix())
        if self._export_dir is not None and self._export_dir != out:
            shutil.rmtree(self._export_dir, ignore_errors=True)
        self._export_dir, self._export_version = out, self._results_version

    # ---- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
