"""A writer for valid single-frame DICOM CT series (test data, the demo case, and the web demo's
bundled case), with exact geometry from the volume's voxel->RAS matrix."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from .dicom_io import _SOP_CLASS_FOR_MODALITY, SECONDARY_CAPTURE
from .errors import ExportError, GeometryError
from .exports.atomic import check_writable_dir
from .volume import CTVolume, flip_lps_ras


def _ds(values) -> list:
    from pydicom.valuerep import DSfloat

    return [DSfloat(float(v), auto_format=True) for v in values]


def _rescale_for(array: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that round((HU - intercept) / slope) fits int16.

    The usual CT choice (slope 1, intercept -1024) whenever the HU range allows it; otherwise a
    slope that spreads the range over int16.
    """
    lo, hi = float(array.min()), float(array.max())
    if lo >= -32768 - 1024 and hi <= 32767 - 1024:
        return 1.0, -1024.0
    slope = (hi - lo) / 65000.0
    return slope, lo + 32500 * slope


def write_dicom_series(volume: CTVolume, folder, patient_name: str = "Phantom^CTLanguage",
                       series_description: str = "CTLanguage synthetic CT", modality: str = "CT",
                       patient_id: str = "CTL-PHANTOM", study_uid: str | None = None,
                       series_number: int = 1, study_description: str = "CTLanguage synthetic study",
                       frame_of_reference_uid: str | None = None) -> str:
    """Write ``volume`` as a single-frame DICOM image series into ``folder``; return its SeriesInstanceUID.

    Slices follow the volume's k axis; ImagePositionPatient/ImageOrientationPatient/PixelSpacing
    come from ``ijk_to_ras``; values are stored as int16 with RescaleSlope/Intercept (slope 1,
    intercept -1024 whenever the HU range allows, i.e. HU rounded to integers). Each file is
    written atomically; on failure the files written so far are removed (ExportError).
    Reading back gives the same array and affine when the k axis points along row x column
    (the usual case); otherwise k comes back reversed, which is the same physical image.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    arr = np.asarray(volume.array)
    if arr.ndim != 3 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ExportError(f"Cannot write a DICOM series from an array of shape {arr.shape} (3D and finite needed).")
    affine = volume.ijk_to_ras
    lps = flip_lps_ras(affine)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    row_dir, col_dir, k_dir = (lps / spacing).T
    normal = np.cross(row_dir, col_dir)
    if abs(abs(float(normal @ k_dir)) - 1.0) > 1e-6:
        raise GeometryError(
            "Cannot write this volume as DICOM slices: its slice axis is not perpendicular to the "
            "slice plane (sheared/tilted grid)."
        )
    modality = modality.upper()
    sop_class = _SOP_CLASS_FOR_MODALITY.get(modality, SECONDARY_CAPTURE)
    # use the values exactly as they will read back from their decimal strings
    slope, intercept = (float(v) for v in _ds(_rescale_for(arr)))

    folder = Path(folder)
    check_writable_dir(folder)

    study_uid = study_uid or volume.study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    origin_lps = flip_lps_ras(affine[:3, 3])

    written: list[Path] = []
    try:
        for k in range(arr.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            sop_uid = generate_uid()
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
            ds.AccessionNumber = ""
            ds.Modality = modality
            ds.Manufacturer = "CTLanguage"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = study_description
            ds.SeriesDescription = series_description
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = int(series_number)
            ds.InstanceNumber = k + 1
            ds.AcquisitionNumber = 1
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            position = origin_lps + lps[:, 2] * k
            ds.ImagePositionPatient = _ds(position)
            ds.ImageOrientationPatient = _ds(np.concatenate([row_dir, col_dir]))
            ds.PixelSpacing = _ds([spacing[1], spacing[0]])
            ds.SliceThickness = _ds([spacing[2]])[0]
            ds.SliceLocation = _ds([position @ normal])[0]
            ds.KVP = ""
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = _ds([intercept])[0]
            ds.RescaleSlope = _ds([slope])[0]
            ds.RescaleType = "HU"
            ds.WindowCenter = _ds([40])[0]
            ds.WindowWidth = _ds([400])[0]
            stored = np.clip(np.rint((arr[k].astype(np.float64) - intercept) / slope), -32768, 32767)
            ds.PixelData = stored.astype("<i2").tobytes()
            path = folder / f"{series_uid[-12:]}_{k + 1:04d}.dcm"
            tmp = folder / f".{path.name}.tmp"
            try:
                ds.save_as(tmp, enforce_file_format=True)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written.append(path)
    except Exception as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, ExportError):
            raise
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ExportError(f"Writing the DICOM series into {folder} failed: {msg}.") from None
    return series_uid
