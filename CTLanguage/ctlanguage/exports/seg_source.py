"""The source instances a DICOM SEG references, made usable when an anonymiser blanked UIDs.

Sources, in this order: an explicit ``dicom_source`` (folder or datasets), the exact files the
volume was read from (``volume.metadata["files"]``), the volume's series in ``volume.source``.
A SEG needs Study, Series and Frame of Reference UIDs and a SOP Class/Instance UID per source
image. Where the source lacks one, in-memory copies of the headers (never the files) get a fresh
UID and a warning says so: the SEG is then valid but a PACS cannot link it to the images by that
UID.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import ExportError

_SERIES_LEVEL = (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
                 ("FrameOfReferenceUID", "Frame of Reference UID"))
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _blank(ds: Any, keyword: str) -> bool:
    return not str(ds.get(keyword, "") or "").strip()


def _load(volume: Any, dicom_source: Any) -> list:
    import pydicom

    from .dicom_seg import load_source_series

    if dicom_source is not None and not isinstance(dicom_source, (str, Path)):
        return list(dicom_source)
    if dicom_source is not None:
        return load_source_series(dicom_source, getattr(volume, "series_uid", None))
    files = (getattr(volume, "metadata", None) or {}).get("files")
    if files:
        datasets = []
        for f in files:
            try:
                datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - moved, deleted or damaged since reading
                raise ExportError(f"the source file {Path(f).name} can no longer be read ({exc})") from None
        return datasets
    source = getattr(volume, "source", None)
    if source is None:
        raise ExportError("the volume has no source DICOM series")
    return load_source_series(source, getattr(volume, "series_uid", None))


def seg_source_datasets(volume: Any, dicom_source: Any = None) -> tuple[list, list[str]]:
    """(pydicom header datasets for ``write_dicom_seg``, warnings). ExportError when no SEG can
    reference this source (the caller skips the SEG and reports why)."""
    from pydicom.uid import generate_uid

    datasets = _load(volume, dicom_source)
    if not datasets:
        raise ExportError("no source DICOM images were found")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise ExportError("the source is a multi-frame (Enhanced CT) object; a DICOM SEG is written "
                          "only for single-frame series")
    filled = []
    needs_copy = any(_blank(ds, kw) for ds in datasets for kw, _ in _SERIES_LEVEL) or any(
        _blank(ds, "SOPInstanceUID") or _blank(ds, "SOPClassUID") for ds in datasets)
    if not needs_copy:
        return datasets, []
    datasets = [copy.deepcopy(ds) for ds in datasets]
    for keyword, name in _SERIES_LEVEL:
        blanks = [ds for ds in datasets if _blank(ds, keyword)]
        if not blanks:
            continue
        present = {str(ds.get(keyword)).strip() for ds in datasets if not _blank(ds, keyword)}
        if len(present) == 1:  # blank in some instances only: take the series' own value
            value = present.pop()
        else:
            value = generate_uid()
            filled.append(name)
        for ds in blanks:
            setattr(ds, keyword, value)
    if any(_blank(ds, "SOPInstanceUID") for ds in datasets):
        for ds in datasets:
            if _blank(ds, "SOPInstanceUID"):
                ds.SOPInstanceUID = generate_uid()
        filled.append("SOP Instance UID")
    for ds in datasets:
        if _blank(ds, "SOPClassUID"):
            meta = getattr(ds, "file_meta", None)
            ds.SOPClassUID = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
            if _blank(ds, "SOPClassUID"):
                ds.SOPClassUID = _CT_IMAGE_STORAGE
    warnings = []
    if filled:
        warnings.append(
            f"segmentation.dcm: the source series has no {', '.join(filled)} (removed by anonymisation?); "
            "the DICOM SEG was written with fresh UIDs for them, so a PACS cannot link it to the "
            "source images by those UIDs")
    return datasets, warnings
