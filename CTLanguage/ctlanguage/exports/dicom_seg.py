"""DICOM SEG (highdicom) referencing the source CT series, one SNOMED-coded segment per prompt.

The masks live on the CTVolume's voxel grid; the SEG frames must line up with the source
instances. For every source instance the pixel grid (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) is mapped into the volume's voxel indices: when rows/columns run along voxel axes
(the normal case, whatever the flips/permutation) frames are plain slices; otherwise the mask is
sampled nearest-neighbour.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ExportError, InputError
from ..volume import flip_lps_ras
from . import finding_color, finding_key
from .extent import extents_for, masks_overlap


# generic codes when the vocabulary has none for a prompt
_GENERIC_CATEGORY = ("91723000", "SCT", "Anatomical Structure")
_GENERIC_TYPE = ("91723000", "SCT", "Anatomical Structure")
_LATERALITY = {"left": ("7771000", "SCT", "Left"), "right": ("24028007", "SCT", "Right"),
               "both": ("51440002", "SCT", "Right and left"), "bilateral": ("51440002", "SCT", "Right and left")}


# ------------------------------------------------------------------------------- source series

def load_source_series(folder: str | Path, series_uid: str | None = None) -> list:
    """pydicom datasets (no pixel data) of one series in ``folder`` (recursive)."""
    import pydicom

    folder = Path(folder)
    if folder.is_file():
        files = [folder]
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    by_series: dict[str, list] = {}
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if not uid or "ImagePositionPatient" not in ds:
            continue
        by_series.setdefault(uid, []).append(ds)
    if series_uid:
        datasets = by_series.get(str(series_uid))
        if not datasets:
            raise InputError(f"series {series_uid} not found in {folder}")
    elif len(by_series) == 1:
        datasets = next(iter(by_series.values()))
    elif not by_series:
        raise InputError(f"no DICOM image series found in {folder}")
    else:
        raise InputError(f"{folder} holds {len(by_series)} series; the series UID is needed")
    return datasets


# ------------------------------------------------------------------------------- geometry

def _lps_to_ijk(ras_to_ijk: np.ndarray):
    """Function: DICOM patient point (LPS mm) -> continuous voxel index (i, j, k)."""
    return lambda lps: ras_to_ijk[:3, :3] @ flip_lps_ras(lps) + ras_to_ijk[:3, 3]


def _frame_sampler(ds: Any, ras_to_ijk: np.ndarray, shape_kji: tuple[int, int, int]):
    """Function mask[k, j, i] -> 2-D (Rows, Columns) frame for source instance ``ds``."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # spacing between rows, between columns
    x, y = iop[:3], iop[3:]

    to_ijk = _lps_to_ijk(ras_to_ijk)
    p0 = to_ijk(ipp)
    step_c = to_ijk(ipp + dc * x) - p0
    step_r = to_ijk(ipp + dr * y) - p0
    nk, nj, ni = shape_kji
    size = np.array([ni, nj, nk])

    def unit_axis(v):
        a = int(np.argmax(np.abs(v)))
        if abs(abs(v[a]) - 1.0) < 1e-3 and np.all(np.abs(np.delete(v, a)) < 1e-3):
            return a, int(np.sign(v[a]))
        return None

    ac, ar = unit_axis(step_c), unit_axis(step_r)
    p0r = np.round(p0)
    if ac and ar and ac[0] != ar[0] and np.all(np.abs(p0 - p0r) < 1e-2):
        (axc, sc), (axr, sr) = ac, ar
        p0i = p0r.astype(int)
        fixed = 3 - axc - axr
        rows_idx = p0i[axr] + sr * np.arange(rows)
        cols_idx = p0i[axc] + sc * np.arange(cols)
        fixed_idx = int(p0i[fixed])
        ok_r = (rows_idx >= 0) & (rows_idx < size[axr])
        ok_c = (cols_idx >= 0) & (cols_idx < size[axc])
        inside = 0 <= fixed_idx < size[fixed]

        def sample(mask: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, cols), dtype=np.uint8)
            if not inside:
                return out
            sl: list[Any] = [slice(None)] * 3
            sl[2 - fixed] = fixed_idx
            plane = mask[tuple(sl)]  # remaining array dims in array order
            # array dim of voxel axis a is 2 - a; plane axes are in increasing array-dim order
            if (2 - axr) > (2 - axc):
                plane = plane.T  # -> (row axis, col axis)
            sub = plane[np.ix_(rows_idx[ok_r], cols_idx[ok_c])]
            out[np.ix_(np.flatnonzero(ok_r), np.flatnonzero(ok_c))] = sub
            return out

        return sample

    # general case: nearest neighbour through the full affine
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pts = p0[:, None, None] + step_c[:, None, None] * c + step_r[:, None, None] * r
    idx = np.rint(pts).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < size[:, None, None]), axis=0)

    def sample_general(mask: np.ndarray) -> np.ndarray:
        out = np.zeros((rows, cols), dtype=np.uint8)
        out[ok] = mask[idx[2][ok], idx[1][ok], idx[0][ok]]
        return out

    return sample_general


def _axis_params(ds: Any, ras_to_ijk: np.ndarray):
    """(col axis, col sign, row axis, row sign, voxel index of pixel (0,0)) when the instance's
    rows/columns run along voxel axes on integer positions, else None."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)

    to_ijk = _lps_to_ijk(ras_to_ijk)
    p0 = to_ijk(ipp)
    out = []
    for step in (to_ijk(ipp + dc * iop[:3]) - p0, to_ijk(ipp + dr * iop[3:]) - p0):
        a = int(np.argmax(np.abs(step)))
        if abs(abs(step[a]) - 1.0) > 1e-3 or np.any(np.abs(np.delete(step, a)) > 1e-3):
            return None
        out += [a, int(np.sign(step[a]))]
    p0r = np.round(p0)
    if out[0] == out[2] or np.any(np.abs(p0 - p0r) > 1e-2):
        return None
    return (*out, tuple(int(v) for v in p0r))


def _as_slice(ix: np.ndarray):
    """A step +-1 arithmetic progression as a slice (views instead of gathers), else the array."""
    if ix.size == 0:
        return ix
    if ix.size == 1:
        return slice(int(ix[0]), int(ix[0]) + 1)
    step = int(ix[1] - ix[0])
    if step in (1, -1) and np.array_equal(ix, ix[0] + step * np.arange(ix.size)):
        stop = int(ix[-1]) + step
        return slice(int(ix[0]), None if stop < 0 else stop, step)
    return ix


class _SeriesSampler:
    """Maps a [k, j, i] mask to the (frames, rows, cols) stack of the source instances.

    Normal case (all instances share in-plane axes/start, e.g. any axis-aligned series): one
    transposed view and a gather along the slice axis. Otherwise per-instance sampling."""

    def __init__(self, datasets: Sequence[Any], ras_to_ijk: np.ndarray, shape_kji: tuple):
        self.rows, self.cols = int(datasets[0].Rows), int(datasets[0].Columns)
        self.shape = shape_kji
        params = [_axis_params(ds, ras_to_ijk) for ds in datasets]
        self.fast = None
        if all(p is not None for p in params) and all(int(ds.Rows) == self.rows and
                                                       int(ds.Columns) == self.cols for ds in datasets):
            axc, sc, axr, sr, p0 = params[0]
            same = all(p[:4] == (axc, sc, axr, sr) and p[4][axc] == p0[axc] and p[4][axr] == p0[axr]
                       for p in params)
            if same:
                size = (shape_kji[2], shape_kji[1], shape_kji[0])  # voxels along i, j, k
                fixed = 3 - axc - axr
                rows_idx = p0[axr] + sr * np.arange(self.rows)
                cols_idx = p0[axc] + sc * np.arange(self.cols)
                fixed_idx = np.array([p[4][fixed] for p in params])
                if (rows_idx.min() >= 0 and rows_idx.max() < size[axr] and cols_idx.min() >= 0
                        and cols_idx.max() < size[axc] and fixed_idx.min() >= 0
                        and fixed_idx.max() < size[fixed]):
                    self.fast = ((2 - fixed, 2 - axr, 2 - axc), fixed_idx, rows_idx, cols_idx)
        if self.fast is None:
            self.samplers = [_frame_sampler(ds, ras_to_ijk, shape_kji) for ds in datasets]

    def candidate_frames(self, mask: np.ndarray | None, extent) -> np.ndarray:
        """Sorted indices of the frames that can hold mask voxels: for a series of k-slices the
        non-empty slices of the mask (``extent``), else frames crossing its bounding box; on the
        per-instance path, the frames that sample any voxel."""
        if mask is None or extent.box is None:
            return np.zeros(0, np.int64)
        if self.fast is not None:
            perm, fixed_idx, _, _ = self.fast
            span = extent.box[perm[0]]
            inside = (fixed_idx >= span.start) & (fixed_idx < span.stop)
            if perm[0] == 0:
                inside &= extent.slices[np.clip(fixed_idx, 0, len(extent.slices) - 1)]
            return np.flatnonzero(inside)
        return np.array([i for i, s in enumerate(self.samplers) if s(mask).any()], np.int64)

    def window(self, extent) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1), half-open: the part of every frame where a mask with this
        extent can be non-zero; columns widened to multiples of 8 (whole bytes of a packed row).
        The whole frame on the per-instance path."""
        if self.fast is None or extent.box is None:
            return 0, self.rows, 0, self.cols
        perm, _, rows_idx, cols_idx = self.fast
        out = []
        for ix, span in ((rows_idx, extent.box[perm[1]]), (cols_idx, extent.box[perm[2]])):
            hit = np.flatnonzero((ix >= span.start) & (ix < span.stop))
            out += [int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, 0]
        r0, r1, c0, c1 = out
        return r0, r1, c0 // 8 * 8, min(-(-c1 // 8) * 8, self.cols)

    def write_frames(self, mask: np.ndarray, frames: np.ndarray, out: np.ndarray,
                     rows_of_out: np.ndarray, window: tuple[int, int, int, int] | None = None) -> None:
        """Sample ``frames`` of the mask as 0/1 into ``out[rows_of_out[n]]`` (uint8 [F, rows,
        cols]; with ``window`` (row0, row1, col0, col1), only that part of each frame, and
        ``out`` is [F, row1 - row0, col1 - col0]). One pass over each frame, no temporary stack."""
        r0, r1, c0, c1 = window or (0, self.rows, 0, self.cols)
        if self.fast is not None:
            perm, fixed_idx, rows_idx, cols_idx = self.fast
            v = mask.transpose(perm)
            rs, cs = _as_slice(rows_idx[r0:r1]), _as_slice(cols_idx[c0:c1])
            planes = (v[fixed_idx[f]][rs][:, cs] for f in frames.tolist())
        else:
            planes = (self.samplers[f](mask)[r0:r1, c0:c1] for f in frames.tolist())
        for src, r in zip(planes, rows_of_out.tolist()):
            np.not_equal(src, 0, out=out[r].view(bool))

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if self.fast is not None:
            perm, fixed_idx, rows_idx, cols_idx = self.fast
            v = mask.transpose(perm)
            index = tuple(_as_slice(ix) for ix in (fixed_idx, rows_idx, cols_idx))
            if all(isinstance(ix, slice) for ix in index):
                return v[index]  # a view: no copy of the volume
            out = v
            for axis, ix in enumerate(index):
                out = out[(slice(None),) * axis + (ix,)] if isinstance(ix, slice) else np.take(out, ix, axis=axis)
            return out
        return np.stack([s(mask) for s in self.samplers])


# ------------------------------------------------------------------------------- codes

def _code(triple: Any):
    from highdicom.sr import CodedConcept

    if triple is None:
        return None
    if isinstance(triple, CodedConcept):
        return triple
    if hasattr(triple, "value") and hasattr(triple, "scheme_designator"):
        return CodedConcept(triple.value, triple.scheme_designator, triple.meaning)
    if isinstance(triple, dict):
        value = triple.get("value") or triple.get("code") or triple.get("CodeValue")
        scheme = triple.get("scheme") or triple.get("scheme_designator") or triple.get("CodingSchemeDesignator") or "SCT"
        meaning = triple.get("meaning") or triple.get("CodeMeaning") or ""
        return CodedConcept(str(value), str(scheme), str(meaning)) if value else None
    if isinstance(triple, (list, tuple)) and len(triple) >= 3:
        return CodedConcept(str(triple[0]), str(triple[1]), str(triple[2]))
    return None


def segment_codes(f: Any) -> dict:
    """{'category', 'type', 'modifier', 'region', 'region_modifier'} coded concepts for a finding."""
    found: dict = {}
    key = finding_key(f)
    raw = None
    if key:
        try:
            from ..segment_codes import dicom_seg_codes  # type: ignore

            raw = dicom_seg_codes(key, getattr(f, "laterality", None))
        except Exception:  # noqa: BLE001 - vocabulary missing or unknown key
            raw = None
    if raw is None and isinstance(getattr(f, "codes", None), dict):
        raw = f.codes
    if isinstance(raw, dict):
        for k, v in raw.items():
            kl = k.lower()
            if "category" in kl:
                found.setdefault("category", _code(v))
            elif "region" in kl or "anatomic" in kl:
                if "modifier" in kl:
                    found.setdefault("region_modifier", _code(v))
                else:
                    found.setdefault("region", _code(v))
            elif "modifier" in kl:
                found.setdefault("modifier", _code(v))
            elif "type" in kl:
                found.setdefault("type", _code(v))
    elif raw is not None:  # a sequence of triples (category, type[, modifier[, region]])
        seq = list(raw)
        names = ["category", "type", "modifier", "region"]
        for n, v in zip(names, seq):
            found[n] = _code(v)
    if not found.get("category") or not found.get("type"):
        found["category"] = _code(_GENERIC_CATEGORY)
        found["type"] = _code(_GENERIC_TYPE)
    lat = (getattr(f, "laterality", None) or "").lower()
    if lat in _LATERALITY and not found.get("modifier") and not found.get("region_modifier"):
        found["modifier"] = _code(_LATERALITY[lat])
    return {k: v for k, v in found.items() if v is not None}


# ------------------------------------------------------------------------------- writer

_IOD_LOCK = threading.Lock()
_IOD_USERS = [0, None]   # [SEG writers inside _memoised_iod_lookups, highdicom's own function]


@contextlib.contextmanager
def _memoised_iod_lookups():
    """While a SEG is built, highdicom's "is this attribute in that IOD" answers are memoised.

    For every source and referenced instance highdicom asks whether its IOD has frames / pixel
    data (``highdicom._standard_utils.is_attribute_in_iod``: a scan of the standard's module
    tables, 0.3-1.6 ms a call, ~400 calls and 0.3-0.6 s for a 300-slice series). The answer
    depends only on the arguments (keyword, SOP class, excluded paths), so it is computed once
    per question. The module function is swapped only while a SEG is being built (reference
    counted across threads) and only when it exists; otherwise nothing changes."""
    try:
        from highdicom import _standard_utils as su
    except ImportError:
        su = None
    if su is None or not callable(getattr(su, "is_attribute_in_iod", None)):
        yield
        return
    with _IOD_LOCK:
        if _IOD_USERS[0] == 0:
            original = su.is_attribute_in_iod
            cache: dict = {}

            def memoised(attribute, sop_class_uid, exclude_path_elements=None):
                key = (attribute, str(sop_class_uid),
                       None if exclude_path_elements is None else tuple(exclude_path_elements))
                if key not in cache:
                    cache[key] = original(attribute, sop_class_uid, exclude_path_elements)
                return cache[key]

            _IOD_USERS[1] = original
            su.is_attribute_in_iod = memoised
        _IOD_USERS[0] += 1
    try:
        yield
    finally:
        with _IOD_LOCK:
            _IOD_USERS[0] -= 1
            if _IOD_USERS[0] == 0:
                su.is_attribute_in_iod = _IOD_USERS[1]
                _IOD_USERS[1] = None


def _sample_segments(sampler: _SeriesSampler, masks, extents, cands) -> list[dict]:
    """Per segment: {source instance index: its frame as little-endian packed bits} for the
    frames that hold any of its pixels (highdicom's ``omit_empty_frames``). Only the window of
    the frames that the mask's bounding box reaches is sampled and packed (with whole-byte rows,
    a packed frame is its packed rows one after the other)."""
    rows, cols = sampler.rows, sampler.cols
    out: list[dict] = []
    for m, e, idx in zip(masks, extents, cands):
        if m is None or idx.size == 0:
            out.append({})
            continue
        r0, r1, c0, c1 = sampler.window(e) if cols % 8 == 0 else (0, rows, 0, cols)
        buf = np.zeros((idx.size, r1 - r0, c1 - c0), np.uint8)
        sampler.write_frames(m, idx, buf, np.arange(idx.size), (r0, r1, c0, c1))
        keep = buf.reshape(idx.size, -1).max(axis=1, initial=0) > 0
        if cols % 8 == 0:
            packed = np.zeros((int(keep.sum()), rows, cols // 8), np.uint8)
            packed[:, r0:r1, c0 // 8:c1 // 8] = np.packbits(buf[keep], axis=-1, bitorder="little")
        else:
            packed = np.packbits(buf[keep].reshape(int(keep.sum()), -1), axis=-1, bitorder="little")
        out.append(dict(zip(idx[keep].tolist(), packed.reshape(int(keep.sum()), -1))))
    return out


def _frames_overlap(masks, extents, frames: list[dict]) -> bool:
    """Whether two segments share a frame pixel. Sharing a voxel is necessary (every frame pixel
    is one voxel), so only pairs whose bounding boxes intersect and that share a voxel are
    compared, on the frames both have, stopping at the first shared pixel."""
    have = np.array([m is not None and e.box is not None for m, e in zip(masks, extents)])
    if have.sum() < 2:
        return False
    b = np.array([e.bounds() for e in extents]).reshape(-1, 3, 2)     # [segment, axis, lo/hi]
    meet = np.all(np.maximum(b[:, None, :, 0], b[None, :, :, 0])
                  < np.minimum(b[:, None, :, 1], b[None, :, :, 1]), axis=-1)
    for a, c in np.argwhere(np.triu(meet & have[:, None] & have[None, :], 1)).tolist():
        if not masks_overlap(masks[a], extents[a], masks[c], extents[c]):
            continue
        for i in frames[a].keys() & frames[c].keys():
            if np.bitwise_and(frames[a][i], frames[c][i]).any():
                return True
    return False


def _descriptions(findings: Sequence[Any], names: Sequence[str] | None, model: dict) -> list:
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes as dcm_codes

    algo = hd.AlgorithmIdentificationSequence(
        name=f"CTLanguage {model.get('id', 'model')}"[:64],
        family=dcm_codes.cid7162.ArtificialIntelligence,
        version=str(model.get("version", "unknown"))[:64],
    )
    descriptions = []
    for s, f in enumerate(findings):
        c = segment_codes(f)
        label = (names[s] if names is not None else str(getattr(f, "prompt", f"segment {s + 1}")))
        label = " ".join(label.split())[:64] or f"segment {s + 1}"
        r, g, b = finding_color(f, s)
        desc = hd.seg.SegmentDescription(
            segment_number=s + 1,
            segment_label=label,
            segmented_property_category=c["category"],
            segmented_property_type=c["type"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=label,
            anatomic_regions=[c["region"]] if c.get("region") else None,
            display_color=hd.color.CIELabColor.from_rgb(int(r * 255), int(g * 255), int(b * 255)),
        )
        if c.get("modifier"):
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept(c["modifier"].value, c["modifier"].scheme_designator, c["modifier"].meaning)
            ]
        if c.get("region_modifier") and c.get("region"):
            desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [c["region_modifier"]]
        descriptions.append(desc)
    return descriptions


def write_dicom_seg(path: str | Path, volume: Any, findings: Sequence[Any], source: Any = None, *,
                    model: dict | None = None, names: Sequence[str] | None = None,
                    series_description: str = "CTLanguage segmentation", extents=None,
                    via_highdicom_frames: bool = False) -> Path:
    """Write a binary DICOM SEG of all findings, referencing the source CT series.

    ``source``: the DICOM folder (or a list of pydicom datasets) the volume was read from;
    defaults to ``volume.source`` restricted to ``volume.series_uid``.

    highdicom builds the SEG. Its per-frame work (~1 ms a frame, ~130 frames per organ on 300
    slices) is paid once per source instance instead of once per frame: highdicom gets a
    template in which segment 1 covers every instance that holds any segment, and the other
    frames are that template's per-frame items with the segment number changed
    (``dicom_seg_file.expand_template``, which checks the template first and otherwise lets
    highdicom write every frame; ``via_highdicom_frames=True`` always does, the reference
    the tests compare with)."""
    import logging

    import highdicom as hd

    from .dicom_seg_file import expand_template, save_seg

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-attribute INFO chatter
    path = Path(path)
    if source is None:
        source = getattr(volume, "source", None)
    if source is None:
        raise ExportError("DICOM SEG needs the source DICOM series, but the volume has no source")
    if isinstance(source, (str, Path)):
        datasets = load_source_series(source, getattr(volume, "series_uid", None))
    else:
        datasets = list(source)
    if not findings:
        raise ExportError("DICOM SEG needs at least one segment")
    ras_to_ijk = np.linalg.inv(np.asarray(volume.ijk_to_ras, dtype=np.float64))
    shape = tuple(int(s) for s in np.shape(volume.array))
    sampler = _SeriesSampler(datasets, ras_to_ijk, shape)  # type: ignore[arg-type]
    n_seg = len(findings)
    masks = [getattr(f, "mask", None) for f in findings]
    extents = extents_for(findings, extents)
    # per segment: the frames (instance indices) that can hold its voxels, from its extent
    cands = [sampler.candidate_frames(m, e) for m, e in zip(masks, extents)]
    frames = _sample_segments(sampler, masks, extents, cands)
    # only instances that hold any segment become frames; the others are still listed as
    # referenced instances of the series
    used = np.array(sorted(set().union(*(f.keys() for f in frames))), np.int64)
    any_voxels = used.size > 0
    if not any_voxels:
        used = np.array([0])
    used_set = set(used.tolist())
    further = [ds for i, ds in enumerate(datasets) if i not in used_set]
    model = model or {}
    kwargs = dict(
        source_images=[datasets[i] for i in used],
        further_source_images=further or None,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(findings, names, model),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CTLanguage",
        manufacturer_model_name=str(model.get("id", "CTLanguage"))[:64],
        software_versions=str(model.get("version", "unknown"))[:64],
        device_serial_number="0",
        series_description=series_description,
        content_label="CTLANGUAGE",
        content_description="Prompt-based segmentation (research use only)",
        omit_empty_frames=any_voxels,
    )
    rows, cols = sampler.rows, sampler.cols
    row_of = {int(i): r for r, i in enumerate(used.tolist())}
    expanded = None
    with _memoised_iod_lookups():
        try:
            if any_voxels and not via_highdicom_frames and (rows * cols) % 8 == 0:
                # template of (at most) two segments: segment 1 on one pixel of every used
                # instance, segment 2 on another pixel of the first one (the frame the expansion
                # is checked on); the other segments' descriptions are added afterwards, as
                # highdicom would (for BINARY its Segment Sequence is the descriptions as given)
                described = kwargs["segment_descriptions"]
                template = np.zeros((used.size, rows, cols), np.uint8)
                template[:, 0, 0] = 1
                if n_seg > 1:
                    template[0, 0, 1] = 2
                seg = hd.seg.Segmentation(pixel_array=template,
                                          **{**kwargs, "segment_descriptions": described[:2]})
                if list(seg.SegmentSequence) == list(described[:2]):   # stored as given
                    seg.SegmentSequence = described
                    expanded = expand_template(seg, frames, [datasets[i] for i in used], row_of)
            if expanded is None:   # highdicom writes every frame
                planes = np.zeros((used.size, n_seg, rows, cols), np.uint8)
                for n, (m, idx) in enumerate(zip(masks, cands)):
                    idx = idx[np.isin(idx, used)]
                    sampler.write_frames(m, idx, planes[:, n], np.searchsorted(used, idx))
                seg = hd.seg.Segmentation(pixel_array=np.moveaxis(planes, 1, -1), **kwargs)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ExportError(f"could not build the DICOM SEG: {exc}") from None
    if expanded is not None:
        seg.SegmentsOverlap = "YES" if _frames_overlap(masks, extents, frames) else "NO"
    save_seg(seg, path, expanded)
    return path
