"""Reading CT volumes and writing volumes/masks/label maps on the exact source grid.

All writes are atomic: the file is written under a temporary name in the destination folder and
then renamed with ``os.replace``, so a failure never leaves a half-written file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ExportError, InputError
from .files import make_shared
from .exports.atomic import check_writable_dir
from .volume import CTVolume, nonfinite_error, set_sitk_geometry

log = logging.getLogger(__name__)

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# single-file formats only: a two-file format (.nhdr/.mhd + raw) cannot be replaced atomically
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")

# MetaImage "Modality" tag values (MET_MOD_*) that are not CT
_NON_CT_META = {"MET_MOD_MR": "MR", "MET_MOD_PET": "PT", "MET_MOD_SPECT": "NM", "MET_MOD_US": "US"}


def _suffix(path: Path, allowed) -> str | None:
    name = path.name.lower()
    for suffix in sorted(allowed, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def read_ct(path, validate: bool = True) -> CTVolume:
    """Read a CT volume from a NIfTI/NRRD/MetaImage file or a DICOM folder (HU, exact geometry).

    Raises InputError (or GeometryError) with a specific message for anything unusable.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"No such file or folder: {path}")
    if path.is_dir():
        from . import dicom_io

        return dicom_io.read_dicom_series(path, validate=validate)
    if not os.access(path, os.R_OK):
        raise InputError(f"The file {path} is not readable (permission denied).")
    suffix = _suffix(path, READ_SUFFIXES)
    if suffix is None:
        if path.suffix.lower() == ".dcm" or _looks_like_dicom(path):
            return _read_series_of_file(path, validate)
        raise InputError(
            f"Unsupported file type {path.name!r}; expected one of {', '.join(READ_SUFFIXES)} "
            "or a DICOM folder."
        )
    if path.stat().st_size == 0:
        raise InputError(f"The file {path} is empty (0 bytes).")
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path, suffix)
        _check_nifti_finite(path, suffix)
    volume = _read_with_sitk(path)
    if validate:
        volume.validate()
    return volume


def _read_series_of_file(path: Path, validate: bool) -> CTVolume:
    """A DICOM file stands for its whole series (found in the same folder tree)."""
    import pydicom

    from . import dicom_io

    try:
        uid = dicom_io.series_key(pydicom.dcmread(path, stop_before_pixels=True), path)
    except Exception as exc:  # pydicom raises assorted types on corrupt files
        raise InputError(f"Cannot read the DICOM file {path.name}: {exc}.") from None
    return dicom_io.read_dicom_series(path.parent, series_uid=uid, validate=validate)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _check_nifti_complete(path: Path, suffix: str) -> None:
    """Refuse truncated NIfTI files: ITK silently fills missing voxel data with zeros."""
    import gzip
    import struct
    import zlib

    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises many types on corrupt headers
        raise InputError(f"Cannot read {path.name}: the NIfTI header is corrupt ({exc}).") from None
    if suffix == ".nii":
        actual = path.stat().st_size
    else:
        with open(path, "rb") as fh:  # gzip trailer: uncompressed size mod 2**32 (last member)
            fh.seek(-4, os.SEEK_END)
            if struct.unpack("<I", fh.read(4))[0] == expected % 2**32:
                return
        actual = 0  # multi-member or damaged: count exactly by streaming
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError(f"Cannot read {path.name}: the compressed file is truncated or corrupt.") from None
    if actual < expected:
        raise InputError(
            f"Cannot read {path.name}: the file is truncated ({actual} of {expected} bytes of header and voxel data)."
        )


def _check_nifti_finite(path: Path, suffix: str) -> None:
    """Refuse NaN/Inf voxels in float NIfTI files: ITK's NIfTI reader silently turns them into 0
    (NRRD/MetaImage keep them and ``CTVolume.validate`` refuses them). Streams the voxel data."""
    import gzip

    import nibabel as nib

    header = nib.load(str(path)).header  # readable: _check_nifti_complete ran first
    dtype = header.get_data_dtype()
    if dtype.kind != "f":
        return
    remaining = int(np.prod(header.get_data_shape()))
    per_chunk = (1 << 24) // dtype.itemsize
    n_bad = 0
    with (gzip.open(path, "rb") if suffix == ".nii.gz" else open(path, "rb")) as fh:
        fh.seek(int(header.get_data_offset()))
        while remaining > 0:
            buf = fh.read(min(remaining, per_chunk) * dtype.itemsize)
            if not buf:
                break
            values = np.frombuffer(buf, dtype=dtype, count=len(buf) // dtype.itemsize)
            n_bad += int(np.count_nonzero(~np.isfinite(values)))
            remaining -= values.size
    if n_bad:
        raise nonfinite_error(n_bad, str(path))


def _read_with_sitk(path: Path) -> CTVolume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"Cannot read {path.name}: the file is corrupt or not a valid image ({_first_line(exc)}).") from None
    dim = reader.GetDimension()
    size = reader.GetSize()
    if dim != 3 and not (dim == 4 and size[3] == 1):
        raise InputError(f"{path.name} is a {dim}D image of size {size}; a 3D CT volume is needed.")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{path.name} has {reader.GetNumberOfComponents()} components per voxel (colour or "
            "vector image); a scalar CT volume is needed."
        )
    modality = None
    if "Modality" in reader.GetMetaDataKeys():
        tag = reader.GetMetaData("Modality").strip()
        if tag in _NON_CT_META:
            raise InputError(f"{path.name} is tagged as modality {_NON_CT_META[tag]} ({tag}); only CT is supported.")
        if tag == "MET_MOD_CT":
            modality = "CT"
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"Cannot read the voxel data of {path.name}: the file is truncated or corrupt ({_first_line(exc)})."
        ) from None
    if image.GetDimension() == 4:  # a 4D file with a single time point
        import SimpleITK as sitk

        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return CTVolume.from_sitk(image, source=str(path), modality=modality)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages look like "Exception thrown in SimpleITK ...: /path/file.cxx:123:\nITK ERROR: ..."
    for ln in lines:
        if "ERROR" in ln or "error" in ln:
            return ln[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


# --- writing ---------------------------------------------------------------------------------

def _check_destination(path: Path) -> str:
    suffix = _suffix(path, WRITE_SUFFIXES)
    if suffix is None:
        raise ExportError(f"Cannot write {path.name!r}: use one of {', '.join(WRITE_SUFFIXES)}.")
    try:
        check_writable_dir(path.parent, create=False)
    except ExportError as exc:
        raise ExportError(f"Cannot write {path}: {exc}.") from None
    if path.is_dir():
        raise ExportError(f"Cannot write {path}: a folder with that name exists.")
    return suffix


def atomic_write(path, write_fn, suffix: str | None = None) -> Path:
    """Call ``write_fn(tmp_path)`` for a temp file next to ``path``, then rename it into place.

    ``suffix`` keeps the file extension on the temp name (ITK picks the format from it).
    The file gets the permissions a plain ``open`` would give (the temp file is private).
    On any failure the temp file is removed and ExportError is raised.
    The project's one single-file atomic writer.
    """
    path = Path(path)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise ExportError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    os.close(fd)
    try:
        make_shared(tmp)
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, ExportError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, OSError):
            raise ExportError(f"Writing {path} failed: {exc.strerror or exc}.") from None
        raise ExportError(f"Writing {path} failed: {_first_line(exc)}.") from None
    return path


def _write_array(array: np.ndarray, ijk_to_ras: np.ndarray, path: Path, compress: bool = True) -> Path:
    import SimpleITK as sitk

    suffix = _check_destination(path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    try:
        set_sitk_geometry(image, ijk_to_ras)
    except ValueError as exc:
        raise ExportError(f"Cannot write {path.name}: {exc}.") from None
    itk_suffix = ".nrrd" if suffix == ".seg.nrrd" else suffix

    def write(tmp):
        sitk.WriteImage(image, tmp, useCompression=compress)

    return atomic_write(path, write, suffix=itk_suffix)


def write_volume(volume: CTVolume, path) -> Path:
    """Write a CTVolume (float32 HU, or int16 when all values are integral and in range)."""
    arr = volume.array
    if arr.size and np.all(arr == np.round(arr)) and arr.min() >= -32768 and arr.max() <= 32767:
        arr = arr.astype(np.int16)
    return _write_array(arr, volume.ijk_to_ras, Path(path))


def _check_like(array: np.ndarray, like: CTVolume, what: str) -> np.ndarray:
    array = np.asarray(array)
    shape = tuple(np.shape(like.array))
    if tuple(array.shape) != shape:
        raise ExportError(f"The {what} has shape {array.shape} but the volume has shape {shape}.")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ExportError(f"The {what} must have an integer or boolean type, got {array.dtype}.")
    return array


def write_mask(mask: np.ndarray, like: CTVolume, path, extent=None) -> Path:
    """Write a binary mask (uint8, 0/1) on the exact voxel grid of ``like`` (NIfTI or NRRD; any
    object with ``array`` and ``ijk_to_ras`` will do). The project's one mask writer.

    ``.nii.gz`` is written in time proportional to the mask's bounding box
    (``exports.masks.write_mask_nifti``); ``extent`` (its ``exports.extent.MaskExtent``) saves
    finding that box again."""
    from .exports.extent import mask_extent

    mask = _check_like(mask, like, "mask")
    ext = extent if extent is not None else mask_extent(mask)
    inside = mask[ext.box] if ext.box is not None else mask[:0]   # zero outside the box
    if inside.size and (inside.min() < 0 or inside.max() > 1):
        raise ExportError(f"A mask must contain only 0 and 1, found values {inside.min()}..{inside.max()}.")
    mask = mask.astype(np.uint8, copy=False)
    path = Path(path)
    if _check_destination(path) == ".nii.gz":
        from .exports.masks import write_mask_nifti

        return atomic_write(path, lambda tmp: write_mask_nifti(tmp, mask, like.ijk_to_ras, ext))
    return _write_array(mask, like.ijk_to_ras, path)


def write_labelmap(labels: np.ndarray, like: CTVolume, path) -> Path:
    """Write an integer label map on the exact voxel grid of ``like`` (uint8, or uint16 if needed)."""
    labels = _check_like(labels, like, "label map")
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ExportError(f"Label values must be in 0..65535, found {lo}..{hi}.")
    dtype = np.uint8 if hi <= 255 else np.uint16
    return _write_array(labels.astype(dtype, copy=False), like.ijk_to_ras, Path(path))
