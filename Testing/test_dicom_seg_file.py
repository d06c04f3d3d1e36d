"""DICOM SEG writing: the fast path (highdicom template + expanded frames, own per-frame encoder)
gives the same file as highdicom writing every frame and pydicom saving it, for axial, oblique,
reoriented and gantry-tilted series; and its frames land on the source voxels."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
import pydicom.uid
import pytest

from _dicom_helpers import tilted_series
from _export_helpers import MODEL_INFO, synthetic_volume
from ctlanguage.exports import ExportFinding
from ctlanguage.volume import CTVolume

SHAPE = (24, 40, 48)
# frame sizes off the byte grid: columns not a multiple of 8 (frames packed whole, not row by
# row), and rows x columns not a multiple of 8 (frames not byte-aligned: highdicom writes all)
_ODD_SHAPES = {"odd-columns": (12, 20, 42), "odd-frame": (12, 21, 23)}
_STAMPS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
           "SeriesDate", "SeriesTime")


def _rot_affine():
    """Oblique geometry: rotation about S by 30 degrees, anisotropic spacing, LPS-signed axes."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    m = np.eye(4)
    m[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-0.7, 0.8, 2.0])
    m[:3, 3] = [12.5, -40.25, 101.0]
    return m


def _series(tmp_path, kind):
    from ctlanguage.dicom_write import write_dicom_series
    from ctlanguage.io import read_ct

    folder = tmp_path / kind
    if kind == "tilted":
        tilted_series(folder, deg=15.0, shape=(12, 20, 24))
    elif kind in _ODD_SHAPES:
        write_dicom_series(synthetic_volume(_ODD_SHAPES[kind]), folder)
    else:
        write_dicom_series(synthetic_volume(SHAPE, _rot_affine() if kind == "oblique" else None), folder)
    vol = read_ct(folder)
    if kind == "reoriented":  # same series, the volume's axes permuted and flipped
        a = vol.ijk_to_ras
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2] = a[:3, 1], -a[:3, 2], a[:3, 0]
        m[:3, 3] = a[:3, 3] + a[:3, 2] * (vol.shape[0] - 1)
        vol = CTVolume(np.ascontiguousarray(vol.array[::-1].transpose(2, 0, 1)), m, source=vol.source,
                       modality="CT", series_uid=vol.series_uid)
    return folder, vol


def _findings(shape, n=4, seed=3):
    """Boxes: segments 1 and 2 overlap, the last is empty."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        m = np.zeros(shape, np.uint8)
        if s < n - 1:
            lo = [int(rng.integers(0, d // 2)) for d in shape]
            hi = [int(lo_ + rng.integers(2, d - lo_)) for lo_, d in zip(lo, shape)]
            m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        if s == 1:
            m[tuple(slice(d // 3, d // 2) for d in shape)] = 1
            out[0].mask[tuple(slice(d // 3, d // 2) for d in shape)] = 1
        out.append(ExportFinding(f"segment {s}", m, anatomy="liver" if s % 2 else "spleen"))
    return out


def _write(path, vol, fs, **kw):
    """write_dicom_seg with repeatable UIDs (the same sequence for every call)."""
    from ctlanguage.exports.dicom_seg import write_dicom_seg

    counter = itertools.count(1)
    orig = pydicom.uid.generate_uid
    pydicom.uid.generate_uid = lambda prefix=None, **_: f"1.2.826.0.1.3680043.10.1.{next(counter)}"
    try:
        return write_dicom_seg(path, vol, fs, model=MODEL_INFO, **kw)
    finally:
        pydicom.uid.generate_uid = orig


def _without_stamps(ds):
    for kw in _STAMPS:
        if kw in ds:
            delattr(ds, kw)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return ds


@pytest.mark.parametrize("kind", ["axial", "oblique", "reoriented", "tilted", "odd-columns"])
@pytest.mark.parametrize("n_seg", [1, 4])
def test_expanded_seg_equals_highdicom_writing_every_frame(tmp_path, kind, n_seg, monkeypatch):
    from ctlanguage.exports import dicom_seg_file

    folder, vol = _series(tmp_path, kind)
    fs = _findings(vol.shape)[:n_seg]
    expanded = []
    real = dicom_seg_file.expand_template
    monkeypatch.setattr(dicom_seg_file, "expand_template", lambda *a: expanded.append(real(*a)) or expanded[-1])
    fast = _write(tmp_path / "fast.dcm", vol, fs)
    assert expanded and expanded[0] is not None, "the template path was not taken"
    ref = _write(tmp_path / "ref.dcm", vol, fs, via_highdicom_frames=True)
    a, b = (_without_stamps(pydicom.dcmread(p)) for p in (fast, ref))
    assert int(a.NumberOfFrames) == int(b.NumberOfFrames) > 0
    assert a.PixelData == b.PixelData
    assert a.PerFrameFunctionalGroupsSequence == b.PerFrameFunctionalGroupsSequence
    assert a.SegmentsOverlap == b.SegmentsOverlap == ("YES" if n_seg > 1 else "NO")
    assert a == b


def test_fast_save_is_byte_identical_to_pydicom(tmp_path):
    """save_seg (own per-frame encoder) writes exactly the bytes of Dataset.save_as."""
    import highdicom as hd

    from ctlanguage.exports.dicom_seg_file import encode_element, save_seg

    folder, vol = _series(tmp_path, "oblique")
    fs = _findings(vol.shape)
    _write(tmp_path / "ref.dcm", vol, fs, via_highdicom_frames=True)
    seg = hd.seg.segread(str(tmp_path / "ref.dcm"))   # a highdicom Segmentation with frames
    seg.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].FrameLabel = "odd"   # padding
    save_seg(seg, tmp_path / "fast.dcm")
    seg.save_as(str(tmp_path / "plain.dcm"))
    plain = (tmp_path / "plain.dcm").read_bytes()
    assert (tmp_path / "fast.dcm").read_bytes() == plain
    assert encode_element(seg, 0x52009230) in plain   # the per-frame groups came from the encoder
    # every element kind the encoder handles, against pydicom's element writer
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"                 # UI, odd -> NUL padding
    item.ImagePositionPatient = ["-1.5", "2", "3.25"]       # DS, multi-valued
    item.InstanceNumber = 7                                  # IS
    item.CodeMeaning = "Café"                                # LO, not ASCII: pydicom's writer
    item.DimensionIndexValues = [3, 70000]                   # UL
    item.ReferencedSegmentNumber = 2                         # US
    item.ImageType = ["DERIVED", "PRIMARY"]                  # CS
    item.add_new(0x00189328, "FD", 1.25)                     # FD
    item.FrameLabel = ""                                     # empty
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SourceImageSequence = Sequence([item, Dataset()])
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, ds["SourceImageSequence"], ["ISO_IR 192"])
    assert encode_element(ds, 0x00082112) == fp.getvalue()


@pytest.mark.parametrize("kind", ["oblique", "reoriented", "odd-columns", "odd-frame"])
def test_seg_frames_land_on_the_source_voxels(tmp_path, kind):
    """Read back by highdicom per source instance, every segment equals its mask on the source
    grid, for an oblique LPS series and for a volume whose axes are permuted and flipped."""
    import highdicom as hd

    folder, vol = _series(tmp_path, kind)
    fs = _findings(vol.shape)
    path = _write(tmp_path / "seg.dcm", vol, fs)
    seg = hd.seg.segread(str(path))
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == {d.SOPInstanceUID for d in srcs}
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in srcs],
        segment_numbers=list(seg.segment_numbers), combine_segments=False,
        assert_missing_frames_are_empty=True)
    # the series' own voxel order: slice k = k-th instance along the slice normal
    by_pos = np.argsort([float(np.dot(np.cross(*np.reshape(d.ImageOrientationPatient, (2, 3)).astype(float)),
                                      np.asarray(d.ImagePositionPatient, float))) for d in srcs])
    for n, f in enumerate(fs):
        mask = f.mask
        if kind == "reoriented":  # back to the series' (k, j, i) order
            mask = mask.transpose(1, 2, 0)[::-1]
        assert mask.shape == px.shape[:3]
        np.testing.assert_array_equal(px[by_pos, :, :, n], mask, err_msg=f.prompt)


def test_more_than_255_segments(tmp_path, monkeypatch):
    """The template's label map needs 16 bits past 255 segments; the expansion still equals
    highdicom writing every frame."""
    from ctlanguage.exports import dicom_seg_file

    folder, vol = _series(tmp_path, "axial")
    fs = []
    for s in range(260):
        m = np.zeros(vol.shape, np.uint8)
        j = (s // vol.shape[0]) % (vol.shape[1] - 3)
        m[s % vol.shape[0], j:j + 3, 5:9] = 1
        fs.append(ExportFinding(f"segment {s}", m, anatomy="liver"))
    expanded = []
    real = dicom_seg_file.expand_template
    monkeypatch.setattr(dicom_seg_file, "expand_template", lambda *a: expanded.append(real(*a)) or expanded[-1])
    a = _without_stamps(pydicom.dcmread(_write(tmp_path / "fast.dcm", vol, fs)))
    assert expanded and expanded[0] is not None
    b = _without_stamps(pydicom.dcmread(_write(tmp_path / "ref.dcm", vol, fs, via_highdicom_frames=True)))
    assert int(a.NumberOfFrames) == 260 and a == b


def test_iod_lookups_are_memoised_only_while_a_seg_is_built(tmp_path, monkeypatch):
    """highdicom's is_attribute_in_iod is memoised inside the writer (same answers) and is
    highdicom's own function again afterwards, also after a failed SEG."""
    from highdicom import _standard_utils as su

    from ctlanguage.errors import ExportError
    from ctlanguage.exports.dicom_seg import _memoised_iod_lookups, write_dicom_seg

    original = su.is_attribute_in_iod
    questions = [("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.2", None),
                 ("PixelData", "1.2.840.10008.5.1.4.1.1.2", ["IconImageSequence"]),
                 ("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.66.4", None),
                 ("ContentDate", "1.2.840.10008.5.1.4.1.1.66.4", None),
                 ("FloatPixelData", "1.2.840.10008.5.1.4.1.1.128", ["IconImageSequence"])]
    want = [original(*q) for q in questions]
    assert True in want and False in want
    with _memoised_iod_lookups():
        with _memoised_iod_lookups():          # nested (another thread's SEG): one swap
            assert su.is_attribute_in_iod is not original
            assert [su.is_attribute_in_iod(*q) for q in questions * 2] == want * 2
        assert su.is_attribute_in_iod is not original
    assert su.is_attribute_in_iod is original
    folder, vol = _series(tmp_path, "axial")
    _write(tmp_path / "seg.dcm", vol, _findings(vol.shape))
    assert su.is_attribute_in_iod is original
    import highdicom as hd

    def fails(*a, **k):
        assert su.is_attribute_in_iod is not original
        raise ValueError("highdicom refused")

    monkeypatch.setattr(hd.seg, "Segmentation", fails)
    with pytest.raises(ExportError, match="highdicom refused"):
        write_dicom_seg(tmp_path / "bad.dcm", vol, _findings(vol.shape), model=MODEL_INFO)
    assert su.is_attribute_in_iod is original
