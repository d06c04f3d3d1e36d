"""The pieces that make exports cost what the masks cost, not what the volume costs: mask extents,
the sparse gzip writer, the nibabel-made NIfTI header, bounding-box layer assignment in .seg.nrrd
and the key-image section search. Each is checked against a plain reference computation."""

from __future__ import annotations

import gzip
import io
import itertools
import zlib

import numpy as np
import pytest

from ctlanguage.errors import ExportError
from ctlanguage.exports import ExportFinding
from ctlanguage.exports.extent import mask_extent
from ctlanguage.exports.gzip_stream import crc32_zeros, volume_pieces, write_gzip
from ctlanguage.volume import CTVolume


def _random_mask(rng, shape, blobs=3):
    m = np.zeros(shape, np.uint8)
    for _ in range(blobs):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [min(s, a + int(rng.integers(1, 5))) for a, s in zip(lo, shape)]
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


def _axis_affines():
    """All 48 axis permutations/flips with anisotropic spacing, plus an oblique one."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1, 1), repeat=3):
            m = np.eye(4)
            m[:3, :3] = 0
            for r, c in enumerate(perm):
                m[r, c] = signs[r] * (0.7, 1.1, 2.5)[c]
            m[:3, 3] = (12.5, -40.25, 101.0)
            out.append(m)
    c, s = np.cos(0.5), np.sin(0.5)
    obl = np.eye(4)
    obl[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-0.7, 0.8, 2.0])
    out.append(obl)
    return out


# ---------------------------------------------------------------------------------- extent

def test_extent_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 9, 3))
        m = _random_mask(rng, shape, blobs=n % 4)
        for arr in (m, m.astype(bool), m.astype(np.int16) * -3, np.asfortranarray(m)):
            e = mask_extent(arr)
            nz = np.argwhere(m)
            np.testing.assert_array_equal(e.slices, m.reshape(shape[0], -1).any(axis=1))
            if nz.size == 0:
                assert e.empty and e.box is None
                continue
            lo, hi = nz.min(0), nz.max(0) + 1
            assert e.bounds() == (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    assert mask_extent(None).empty
    with pytest.raises(ValueError):
        mask_extent(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------- gzip

@pytest.mark.parametrize("n", [0, 1, 2, 3, 255, 256, 4097, 262144, (1 << 20) - 1, 3 * (1 << 20) + 5])
def test_crc_of_zero_runs_equals_zlib(n):
    for start in (0, 1, 0xFFFFFFFF, 0x1234ABCD):
        assert crc32_zeros(start, n) == zlib.crc32(bytes(n), start)


def test_sparse_gzip_round_trips_and_is_deterministic():
    rng = np.random.default_rng(1)
    for n in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 10, 3)) + ((2,) if n % 3 == 0 else ())
        m = _random_mask(rng, shape[:3], blobs=n % 3)
        if len(shape) == 4:
            m = np.stack([m, m[::-1]], axis=-1)
        e = mask_extent(m[..., 0] | m[..., 1] if m.ndim == 4 else m)
        bufs = []
        for _ in range(2):
            bio = io.BytesIO()
            write_gzip(bio, b"HEADER", volume_pieces(m, e.box, e.slices), level=n % 10)
            bufs.append(bio.getvalue())
        assert bufs[0] == bufs[1]
        assert gzip.decompress(bufs[0]) == b"HEADER" + m.tobytes()  # gzip checks CRC and size


def test_gzip_writer_refuses_bad_pieces():
    with pytest.raises(ValueError):
        write_gzip(io.BytesIO(), b"", [np.zeros((4, 4), np.uint8)[:, ::2]])
    with pytest.raises(ValueError):
        write_gzip(io.BytesIO(), b"", [-1])
    with pytest.raises(ValueError):
        write_gzip(io.BytesIO(), b"", [], level=11)


# ---------------------------------------------------------------------------------- NIfTI

@pytest.mark.parametrize("affine", _axis_affines())
def test_nifti_mask_geometry_every_orientation(tmp_path, affine):
    import nibabel as nib
    import SimpleITK as sitk

    from ctlanguage.exports.masks import write_mask_nifti
    from ctlanguage.volume import sitk_ijk_to_ras

    m = _random_mask(np.random.default_rng(2), (5, 6, 7))
    p = write_mask_nifti(tmp_path / "m.nii.gz", m, affine)
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), m)
    s = sitk.ReadImage(str(p))
    assert s.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s), m)
    np.testing.assert_allclose(sitk_ijk_to_ras(s), affine, atol=1e-4)


def test_nifti_refuses_skewed_axes(tmp_path):
    from ctlanguage.exports.masks import write_mask_nifti

    skew = np.eye(4)
    skew[0, 1] = 0.5
    with pytest.raises(ExportError, match="not orthogonal"):
        write_mask_nifti(tmp_path / "m.nii.gz", np.zeros((2, 2, 2), np.uint8), skew)
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------------------------- seg.nrrd

def _reference_layers(masks):
    """The original full-volume greedy assignment."""
    layers, result = [], []
    for m in masks:
        if m is None or not m.any():
            result.append(0)
            continue
        for li, occ in enumerate(layers):
            if not np.any(occ & m.astype(bool)):
                occ |= m.astype(bool)
                result.append(li)
                break
        else:
            layers.append(m.astype(bool).copy())
            result.append(len(layers) - 1)
    return result


def test_seg_nrrd_layers_and_voxels_match_a_plain_reference(tmp_path):
    import nrrd

    from ctlanguage.exports.seg_nrrd import assign_layers, write_seg_nrrd

    rng = np.random.default_rng(3)
    for n in range(12):
        shape = tuple(int(v) for v in rng.integers(3, 10, 3))
        masks = [_random_mask(rng, shape, blobs=int(rng.integers(0, 3))) for _ in range(1 + n % 5)]
        assert assign_layers(masks) == _reference_layers(masks)
        vol = CTVolume(np.full(shape, -1000.0, np.float32), _axis_affines()[n])
        fs = [ExportFinding(f"p{k}", m) for k, m in enumerate(masks)]
        path = write_seg_nrrd(tmp_path / f"{n}.seg.nrrd", vol, fs)
        data, hdr = nrrd.read(str(path))
        if data.ndim == 3:
            data = data[None]
        for k, m in enumerate(masks):
            layer = data[int(hdr[f"Segment{k}_Layer"])].transpose(2, 1, 0)
            got = layer == int(hdr[f"Segment{k}_LabelValue"])
            np.testing.assert_array_equal(got, m.astype(bool), err_msg=f"case {n} segment {k}")


# ---------------------------------------------------------------------------------- report

@pytest.mark.parametrize("affine", _axis_affines()[::5])
def test_key_image_sections_match_full_volume_sums(affine):
    from ctlanguage.exports.html_report import _largest_sections, ras_view

    rng = np.random.default_rng(4)
    for _ in range(10):
        m = _random_mask(rng, (7, 9, 11), blobs=3)
        mv = ras_view(m, affine)[0]
        want = (int(np.argmax(mv.sum(axis=(1, 2), dtype=np.int64))),
                int(np.argmax(mv.sum(axis=(0, 2), dtype=np.int64))))
        got = _largest_sections(m, affine, mask_extent(m))
        assert got == (want if m.any() else None)


# ---------------------------------------------------------------------------------- DICOM SEG

def test_seg_frames_of_a_mask_equal_full_sampling(tmp_path):
    """Frames chosen from a mask's extent and written one by one equal sampling the whole series
    (0/1 planes), on the vectorised and the per-instance path."""
    import pydicom

    from _export_helpers import synthetic_volume
    from ctlanguage.dicom_write import write_dicom_series
    from ctlanguage.exports.dicom_seg import _frame_sampler, _SeriesSampler

    shape = (12, 20, 24)
    vol = synthetic_volume(shape)
    write_dicom_series(vol, tmp_path / "s")
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "s").iterdir())]
    inv = np.linalg.inv(vol.ijk_to_ras)
    rng = np.random.default_rng(5)
    for vectorised in (True, False):
        sampler = _SeriesSampler(dss, inv, shape)
        assert sampler.fast is not None
        if not vectorised:  # force the per-instance path
            sampler.fast = None
            sampler.samplers = [_frame_sampler(ds, inv, shape) for ds in dss]
        for blobs in (0, 1, 3):
            m = _random_mask(rng, shape, blobs) * np.uint8(3)   # any non-zero value is "in"
            full = sampler(m) != 0
            idx = sampler.candidate_frames(m, mask_extent(m))
            np.testing.assert_array_equal(idx, np.flatnonzero(full.reshape(len(dss), -1).any(axis=1)))
            out = np.zeros((len(idx) + 2,) + full.shape[1:], np.uint8)
            rows = np.arange(len(idx)) + 1
            sampler.write_frames(m, idx, out, rows)
            np.testing.assert_array_equal(out[rows], full[idx].astype(np.uint8))
            assert not out[0].any() and not out[-1].any()
            # the window of the frames the mask's box reaches: all of its voxels, whole bytes
            r0, r1, c0, c1 = win = sampler.window(mask_extent(m))
            if vectorised and blobs == 1:   # one small blob: a real restriction
                assert (r1 - r0) * (c1 - c0) < full.shape[1] * full.shape[2]
            assert c0 % 8 == 0 and (c1 % 8 == 0 or c1 == full.shape[2])
            inside = np.zeros(full.shape[1:], bool)
            inside[r0:r1, c0:c1] = True
            assert not full[:, ~inside].any()
            part = np.zeros((len(idx), r1 - r0, c1 - c0), np.uint8)
            sampler.write_frames(m, idx, part, np.arange(len(idx)), win)
            np.testing.assert_array_equal(part, full[idx][:, r0:r1, c0:c1])
