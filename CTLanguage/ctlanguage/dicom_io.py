"""DICOM CT series: discovery and geometry-checked reading (the writer: ``dicom_write``).

Headers are read with pydicom. Pixels come from pydicom (uncompressed, RLE, JPEG-LS, JPEG 2000
where a decoder is installed) or, for single-frame files pydicom cannot decode here, from
SimpleITK/GDCM. Rescale slope/intercept are applied per slice (per frame for multi-frame objects).
Geometry comes from ImagePositionPatient/ImageOrientationPatient/PixelSpacing (or the Enhanced
CT functional groups) and is checked in ``dicom_geometry``: one orientation, regular slice
spacing; a gantry-tilted series is resampled onto an orthogonal grid. Localizer (scout) images
are left out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dicom_geometry import Plane, resample_orthogonal, stack_grid
from .errors import InputError
from .preprocess import AIR_HU
from .volume import CTVolume

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_SOP_CLASS_FOR_MODALITY = {
    "CT": CT_IMAGE_STORAGE,
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder."""

    series_uid: str                # SeriesInstanceUID, or a stand-in (see series_key)
    modality: str
    sop_class_uid: str
    description: str = ""
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list, repr=False)  # pydicom datasets without pixel data
    is_image: bool = True
    frames: int = 1
    uid_missing: bool = False      # the files carry no SeriesInstanceUID
    localizers: list[Path] = field(default_factory=list)  # scout images, left out

    def __str__(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.modality} series{desc} ({len(self.files)} files, UID {self.series_uid})"


# --- discovery ---------------------------------------------------------------------------------

_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory (DICOMDIR)
_MULTIFRAME_CT = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None
    except Exception:  # pydicom raises assorted errors on corrupt headers; treat as non-DICOM
        return None


def _sop_class(ds) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID (anonymisers drop the former)."""
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _is_localizer(ds) -> bool:
    return any(str(v).upper() == "LOCALIZER" for v in (ds.get("ImageType") or []))


def series_key(ds, path: Path) -> str:
    """The SeriesInstanceUID, or for files without one a stand-in naming their folder."""
    return str(ds.get("SeriesInstanceUID", "") or "") or f"(no series UID) {Path(path).parent}"


def find_series(folder) -> list[SeriesInfo]:
    """All DICOM series under ``folder`` (recursive), in a stable order.

    Localizer (scout) images are kept apart in ``SeriesInfo.localizers``: they are never part of
    the volume."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"No such folder: {folder}")
    series: dict[str, SeriesInfo] = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(root) / name
            ds = _read_header(path)
            if ds is None:
                continue
            sop_class = _sop_class(ds)
            if sop_class == _DIRECTORY_SOP_CLASS or not (sop_class or "Modality" in ds or "Rows" in ds):
                continue
            uid = series_key(ds, path)
            info = series.get(uid)
            if info is None:
                info = series[uid] = SeriesInfo(
                    series_uid=uid,
                    modality=str(ds.get("Modality", "")).upper() or "unknown",
                    sop_class_uid=sop_class,
                    description=str(ds.get("SeriesDescription", "")),
                    is_image="Rows" in ds and "Columns" in ds,
                    frames=int(ds.get("NumberOfFrames", 1) or 1),
                    uid_missing=not ds.get("SeriesInstanceUID", ""),
                )
            if _is_localizer(ds):
                info.localizers.append(path)
                continue
            info.files.append(path)
            info.headers.append(ds)
    for s in series.values():
        if s.localizers:
            log.info("Left out %d localizer (scout) image(s) of series %s%s", len(s.localizers),
                     s.series_uid, f" '{s.description}'" if s.description else "")
    return sorted(series.values(), key=lambda s: (-len(s.files), s.series_uid))


def _pick_ct_series(folder: Path, series: list[SeriesInfo]) -> SeriesInfo:
    if not series:
        volumes = sorted(p.name for p in folder.iterdir()
                         if p.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")))
        hint = f" (it holds {', '.join(volumes[:3])}: open that file instead)" if volumes else ""
        raise InputError(f"The folder {folder} contains no DICOM files{hint}.")
    ct = [s for s in series if s.modality == "CT" and s.is_image and s.files]
    if not ct:
        found = "; ".join(str(s) for s in series)
        raise InputError(f"The folder {folder} contains no CT image series (found: {found}); only CT is supported.")
    chosen = max(ct, key=lambda s: (len(s.files) * s.frames, s.series_uid))
    log.info("Reading %s from %s", chosen, folder)
    for s in series:
        if s is not chosen:
            why = ("only localizer images" if not s.files else
                   "fewer slices" if (s.modality == "CT" and s.is_image) else
                   "not an image" if not s.is_image else f"modality {s.modality}")
            log.info("Skipped %s (%s)", s, why)
    return chosen


# --- reading -------------------------------------------------------------------------------------

def read_dicom_series(folder, series_uid: str | None = None, validate: bool = True) -> CTVolume:
    """Read the CT series with the most slices in ``folder`` (or the one with ``series_uid``,
    as given by :func:`series_key`).

    Classic single-frame and Enhanced/Legacy-converted multi-frame CT are read; a gantry-tilted
    series is resampled onto an orthogonal grid (with a warning)."""
    folder = Path(folder)
    series = find_series(folder)
    if series_uid is not None:
        matches = [s for s in series if s.series_uid == series_uid]
        if not matches:
            raise InputError(f"No image series with UID {series_uid} in {folder}.")
        chosen = matches[0]
        if chosen.modality != "CT" or not chosen.is_image or not chosen.files:
            raise InputError(f"The series {chosen} is not a CT image series; only CT is supported.")
    else:
        chosen = _pick_ct_series(folder, series)
    multiframe = chosen.sop_class_uid in _MULTIFRAME_CT or any(
        int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds
        for ds in chosen.headers)
    planes = _multiframe_planes(chosen) if multiframe else _single_frame_planes(chosen)
    volume = _read_planes(chosen, planes)
    volume.source = str(folder)
    volume.metadata["skipped_series"] = [str(s) for s in series if s is not chosen]
    volume.metadata["left_out_localizers"] = [str(p) for p in chosen.localizers]
    if validate:
        volume.validate()
    return volume


def _floats(ds, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword) if ds is not None else None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f"The DICOM file {where} has a missing or invalid {keyword}.")
    return arr


def _single_frame_planes(info: SeriesInfo) -> list[Plane]:
    planes = []
    for path, ds in zip(info.files, info.headers):
        if "Rows" not in ds or "Columns" not in ds:
            raise InputError(f"The DICOM file {path.name} of {info} is not an image (no Rows/Columns).")
        planes.append(Plane(path, ds, None, _floats(ds, "ImagePositionPatient", 3, path.name),
                            _floats(ds, "ImageOrientationPatient", 6, path.name),
                            _floats(ds, "PixelSpacing", 2, path.name), int(ds.Rows), int(ds.Columns)))
    return planes


def _group(ds, frame_group, sequence: str):
    """First item of functional group ``sequence`` for one frame (per-frame, else shared)."""
    for groups in (frame_group, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        items = groups.get(sequence) if groups is not None else None
        if items:
            return items[0]
    return None


def _multiframe_planes(info: SeriesInfo) -> list[Plane]:
    """Planes of Enhanced / Legacy Converted Enhanced CT objects (geometry and rescale from the
    per-frame or shared functional groups)."""
    planes = []
    for path, ds in zip(info.files, info.headers):
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        if per_frame and len(per_frame) != n_frames:
            raise InputError(f"The DICOM file {path.name} lists {len(per_frame)} frame descriptions "
                             f"for {n_frames} frames.")
        for n in range(n_frames):
            fg = per_frame[n] if per_frame else None
            where = f"{path.name} (frame {n + 1})"
            pos = _group(ds, fg, "PlanePositionSequence")
            ori = _group(ds, fg, "PlaneOrientationSequence")
            meas = _group(ds, fg, "PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                missing = [k for k, v in (("Plane Position", pos), ("Plane Orientation", ori),
                                          ("Pixel Measures", meas)) if v is None]
                raise InputError(f"The multi-frame DICOM file {where} has no {' / '.join(missing)} "
                                 "functional group; its frames have no geometry.")
            pvt = _group(ds, fg, "PixelValueTransformationSequence")
            src = pvt if pvt is not None else ds
            rescale = (float(src.get("RescaleSlope", 1) or 1), float(src.get("RescaleIntercept", 0) or 0))
            planes.append(Plane(path, ds, n, _floats(pos, "ImagePositionPatient", 3, where),
                                _floats(ori, "ImageOrientationPatient", 6, where),
                                _floats(meas, "PixelSpacing", 2, where), int(ds.Rows), int(ds.Columns),
                                rescale))
    return planes


def _read_planes(info: SeriesInfo, planes: list[Plane]) -> CTVolume:
    grid = stack_grid(str(info), planes)
    planes = grid.planes
    rows, cols = planes[0].rows, planes[0].cols
    array = np.empty((len(planes), rows, cols), dtype=np.float32)
    frames: dict[Path, np.ndarray] = {}
    for n, plane in enumerate(planes):
        if plane.frame is None:
            array[n] = _slice_hu(plane.path, rows, cols)
        else:
            if plane.path not in frames:
                frames[plane.path] = _frames_raw(plane.path, rows, cols)
            slope, intercept = plane.rescale
            array[n] = frames[plane.path][plane.frame].astype(np.float64) * slope + intercept
    frames.clear()
    affine = grid.ijk_to_ras
    first = planes[0].header
    meta = {
        "series_description": str(first.get("SeriesDescription", "")),
        "series_number": str(first.get("SeriesNumber", "")),
        "n_slices": len(planes),
        "slice_spacing_mm": round(float(np.linalg.norm(affine[:3, 2])), 6),
        "convolution_kernel": str(first.get("ConvolutionKernel", "")),
        "sop_class_uid": info.sop_class_uid,
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "sop_instance_uids": [str(p.header.get("SOPInstanceUID", "")) for p in planes],  # per slice
        "files": list(dict.fromkeys(str(p.path) for p in planes)),  # distinct files, in slice order
    }
    if grid.tilt_deg is not None:
        fill = min(float(array.min()), AIR_HU)  # outside the acquired data
        before = array.shape
        array, affine = resample_orthogonal(array, affine, fill)
        note = (f"{info} was acquired with gantry tilt ({grid.tilt_deg:.1f} degrees): resampled onto an "
                f"orthogonal grid ({'x'.join(map(str, array.shape))} voxels, was {'x'.join(map(str, before))}; "
                f"linear interpolation within each slice, {fill:g} HU outside the scan).")
        log.warning("%s", note)
        meta["gantry_tilt_deg"] = round(grid.tilt_deg, 3)
        meta["warnings"] = [note]  # carried into findings.json by the exports
    return CTVolume(array, affine, source=str(info.files[0].parent), modality="CT",
                    series_uid=None if info.uid_missing else info.series_uid,
                    study_uid=str(first.get("StudyInstanceUID", "")) or None, metadata=meta)


def _frames_raw(path: Path, rows: int, cols: int) -> np.ndarray:
    """Stored values of all frames of a multi-frame file, shape (frames, rows, cols)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, truncated data, ...
        raise InputError(f"Cannot decode the pixel data of the multi-frame file {path.name} ({exc}).") from None
    raw = raw.reshape((-1,) + raw.shape[-2:]) if raw.ndim >= 2 else raw
    if raw.shape[1:] != (rows, cols) or raw.shape[0] != int(ds.get("NumberOfFrames", 1) or 1):
        raise InputError(f"The multi-frame file {path.name} has pixel data of shape {raw.shape}, "
                         f"expected {int(ds.get('NumberOfFrames', 1) or 1)} frames of {(rows, cols)}.")
    return raw


def _slice_hu(path: Path, rows: int, cols: int) -> np.ndarray:
    """HU values of one slice (per-slice RescaleSlope/Intercept applied)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"The DICOM file {path.name} became unreadable while loading ({exc}).") from None
    if "PixelData" not in ds:
        raise InputError(f"The DICOM file {path.name} has no pixel data.")
    try:
        raw = _native_pixels(ds, rows, cols)
        if raw is None:
            raw = ds.pixel_array
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = (raw.astype(np.float64) * slope + intercept).astype(np.float32)
    except Exception as exc:  # compressed syntax without a pydicom decoder, or truncated data
        hu = _slice_hu_sitk(path, exc)
    if hu.shape != (rows, cols):
        raise InputError(f"The DICOM file {path.name} has pixel data of shape {hu.shape}, expected {(rows, cols)}.")
    return hu


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def _native_pixels(ds, rows: int, cols: int):
    """Stored values of an uncompressed 16-bit little-endian slice, without pydicom's pixel
    machinery (a few ms per slice); None for anything else (then pydicom/GDCM decode it)."""
    if (str(ds.file_meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE or ds.get("BitsAllocated") != 16
            or ds.get("BitsStored") != 16 or ds.get("SamplesPerPixel", 1) != 1
            or int(ds.get("NumberOfFrames", 1) or 1) != 1):
        return None
    data = ds.PixelData
    if len(data) < rows * cols * 2:
        raise InputError(f"The pixel data of {ds.filename} is truncated ({len(data)} of {rows * cols * 2} bytes).")
    dtype = "<i2" if ds.get("PixelRepresentation", 0) == 1 else "<u2"
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def _slice_hu_sitk(path: Path, first_error: Exception) -> np.ndarray:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))  # GDCM applies the rescale
    except RuntimeError:
        raise InputError(f"Cannot decode the pixel data of {path.name} ({first_error}).") from None
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    return arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
