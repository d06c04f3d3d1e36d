"""export_all: the complete export set of one query, written all-or-nothing into one folder."""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..volume import voxel_spacing
from . import ExportResult, check_masks, unique_slugs
from .atomic import atomic_output_dir
from .extent import mask_extent

log = logging.getLogger(__name__)
ALL_FORMATS = ("masks", "json", "csv", "seg_nrrd", "html", "dicom_seg")
# the files export_all writes besides masks/ (checked early by the commands: atomic.check_ours)
FIXED_FILES = ("findings.json", "findings.csv", "segmentation.seg.nrrd", "report.html",
               "segmentation.dcm")


def input_record(volume: Any, path: str | Path | None = None) -> dict:
    """The "input" block of findings.json: where the image came from and its exact geometry."""
    m = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    sp_ijk = voxel_spacing(m)
    src = path if path is not None else getattr(volume, "source", None)
    return {
        "path": str(src) if src is not None else None,
        "shape": [int(s) for s in np.shape(volume.array)],          # [k, j, i]
        "spacing": [round(float(s), 6) for s in sp_ijk[::-1]],     # mm, [k, j, i]
        "axis_order": "k,j,i",
        "affine": [[float(v) for v in row] for row in m],           # (i, j, k, 1) -> RAS mm
        "affine_convention": "IJK->RAS (Slicer IJKToRASMatrix)",
        "series_uid": getattr(volume, "series_uid", None),
        "study_uid": getattr(volume, "study_uid", None),
        "modality": getattr(volume, "modality", None),
    }


def is_dicom_volume(volume: Any) -> bool:
    """Read from a DICOM folder: by its series UID, or by the files it lists (a series whose
    UIDs an anonymiser removed)."""
    src = getattr(volume, "source", None)
    listed = bool((getattr(volume, "metadata", None) or {}).get("files"))
    return (bool(getattr(volume, "series_uid", None)) or listed) and src is not None and Path(src).is_dir()


def _dicom_seg(path: Path, volume: Any, findings: Sequence[Any], dicom_source: Any, model: dict,
               warnings: list[str], extents=None) -> bool:
    """Write the DICOM SEG; when the source cannot carry one, log and record why and return False
    (every other export is still written). Disk errors still fail the whole export."""
    from ..errors import ExportError, InputError
    from .dicom_seg import write_dicom_seg
    from .seg_source import seg_source_datasets

    try:
        datasets, notes = seg_source_datasets(volume, dicom_source)
        write_dicom_seg(path, volume, findings, datasets, model=model, extents=extents)
    except (ExportError, InputError, ValueError, TypeError, AttributeError, KeyError) as exc:
        reason = str(exc).rstrip(".") or type(exc).__name__
        notes = [f"segmentation.dcm not written: {reason}; every other export was written"]
        ok = False
    else:
        ok = True
    for note in notes:
        log.warning("%s", note)
    warnings.extend(notes)
    return ok


def export_all(volume: Any, findings: Sequence[Any], out_dir: str | Path, *, model: dict,
               input_path: str | Path | None = None, dicom_source: Any = None,
               mask_threshold: float | None = None, formats: Sequence[str] = ALL_FORMATS,
               extra: dict | None = None, progress=None) -> ExportResult:
    """Write findings.json/.csv, masks/<slug>.nii.gz, segmentation.seg.nrrd, report.html and —
    when the volume came from a DICOM series (or ``dicom_source`` is given) — segmentation.dcm.
    A source that cannot carry a SEG (e.g. anonymised without UIDs) gives fresh UIDs or no SEG,
    with a warning in ``ExportResult.warnings`` and findings.json "warnings"; never a failure.

    ``model``: {"id", "version", "sha256"}. ``progress(fraction, message)`` is optional.
    Nothing is left in ``out_dir`` when any part fails (ExportError)."""
    from .findings_table import build_document, write_csv, write_json
    from .html_report import write_report
    from .masks import write_masks
    from .seg_nrrd import write_seg_nrrd

    findings = list(findings)
    check_masks(volume, findings)
    out_dir = Path(out_dir)
    slugs = unique_slugs(str(getattr(f, "prompt", "")) for f in findings)
    want_dicom = "dicom_seg" in formats and (dicom_source is not None or is_dicom_volume(volume))
    steps = [s for s in ALL_FORMATS if s in formats and (s != "dicom_seg" or want_dicom)]
    done = 0

    def step(name: str):
        nonlocal done
        done += 1
        if progress:
            progress(done / max(len(steps), 1), f"wrote {name}")

    result = ExportResult(out_dir=out_dir, slugs=slugs)
    meta = {
        "software": {"name": "ctlanguage", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mask_threshold": mask_threshold,
        "prompts": [str(getattr(f, "prompt", "")) for f in findings],
    }
    if extra:
        meta.update(extra)
    read_notes = list((getattr(volume, "metadata", None) or {}).get("warnings") or [])  # e.g. tilt
    if read_notes:
        meta["warnings"] = read_notes + list(meta.get("warnings") or [])
    info = input_record(volume, input_path)
    # where each mask is non-empty, found once: every writer then works on bounding boxes only
    extents = ([mask_extent(getattr(f, "mask", None)) for f in findings]
               if {"masks", "seg_nrrd", "html"} & set(formats) or want_dicom else None)
    with atomic_output_dir(out_dir) as tmp:
        if want_dicom:  # first, so that findings.json records why it is missing (if it is)
            warnings: list[str] = []
            if _dicom_seg(tmp / "segmentation.dcm", volume, findings, dicom_source, model, warnings,
                          extents):
                result.files["segmentation.dcm"] = out_dir / "segmentation.dcm"
            if warnings:
                meta["warnings"] = list(meta.get("warnings") or []) + warnings
                result.warnings.extend(warnings)
            step("segmentation.dcm")
        mask_rel: list[str | None] = [None] * len(findings)
        if "masks" in formats:
            paths = write_masks(tmp / "masks", findings, volume, slugs, extents=extents)
            mask_rel = [f"masks/{p.name}" if p is not None else None for p in paths]
            result.masks = [out_dir / r for r in mask_rel if r]
            step("masks")
        doc = build_document(findings, mask_rel, model=model, input_info=info, extra=meta)
        if "json" in formats:
            write_json(tmp / "findings.json", doc)
            result.files["findings.json"] = out_dir / "findings.json"
            step("findings.json")
        if "csv" in formats:
            write_csv(tmp / "findings.csv", doc)
            result.files["findings.csv"] = out_dir / "findings.csv"
            step("findings.csv")
        if "seg_nrrd" in formats:
            write_seg_nrrd(tmp / "segmentation.seg.nrrd", volume, findings, extents=extents)
            result.files["segmentation.seg.nrrd"] = out_dir / "segmentation.seg.nrrd"
            step("segmentation.seg.nrrd")
        if "html" in formats:
            write_report(tmp / "report.html", volume, findings, model=model, input_info=info,
                         mask_paths=mask_rel, extra=meta, extents=extents)
            result.files["report.html"] = out_dir / "report.html"
            step("report.html")
    return result
