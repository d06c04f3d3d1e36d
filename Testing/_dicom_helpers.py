"""DICOM test series with known truth, shared by the DICOM reading and SEG tests."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from ctlanguage.dicom_write import write_dicom_series
from ctlanguage.volume import LPS_TO_RAS, CTVolume


def files_of(folder):
    return sorted(p for p in folder.rglob("*.dcm"))


def edit_series(folder, fn):
    for p in files_of(folder):
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p)


def tilted_series(folder, deg=15.0, shape=(10, 20, 24), spacing=(1.5, 1.25, 2.5)):
    """A gantry-tilted series with known truth: slice planes tilted about the patient's x axis by
    ``deg``, slice positions moving along the table (z), HU a linear function of the position.
    Returns (truth ijk->LPS 4x4 of the stored voxels, hu(lps) function)."""
    t = np.radians(deg)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(t), np.sin(t)])
    normal = np.cross(row, col)
    sx, sy, step = spacing
    p0 = np.array([-20.0, -15.0, 40.0])
    dz = step / np.cos(t)  # table feed per slice; the spacing along the normal stays ``step``
    truth = np.eye(4)
    truth[:3, 0], truth[:3, 1], truth[:3, 2], truth[:3, 3] = row * sx, col * sy, [0, 0, dz], p0

    def hu(lps):
        return -700.0 + 4.0 * lps[..., 0] - 3.0 * lps[..., 1] + 6.0 * lps[..., 2]

    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    lps = np.stack([i, j, k], -1) @ truth[:3, :3].T + p0
    untilted = np.eye(4)  # what the writer is given: the same planes, slice axis along the normal
    untilted[:3, 0], untilted[:3, 1], untilted[:3, 2], untilted[:3, 3] = row * sx, col * sy, normal * step, p0
    write_dicom_series(CTVolume(np.round(hu(lps)), LPS_TO_RAS @ untilted), folder)

    def retilt(ds):  # slices acquired at table positions z0 + k * dz, not along the normal
        k_ = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in p0 + k_ * np.array([0, 0, dz])]

    edit_series(folder, retilt)
    return truth, hu


def legacy_converted(folder, out):
    """The classic series in ``folder`` converted by highdicom into one Legacy Converted
    Enhanced CT object (multi-frame, geometry in functional groups)."""
    import highdicom as hd

    sources = [pydicom.dcmread(p) for p in files_of(folder)]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(sources, series_instance_uid=generate_uid(), series_number=7,
                                                   sop_instance_uid=generate_uid(), instance_number=1)
    out.mkdir()
    mf.save_as(out / "multiframe.dcm")
    return out / "multiframe.dcm"
