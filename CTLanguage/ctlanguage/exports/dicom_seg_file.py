"""Saving a DICOM SEG: the same bytes as pydicom's writer, with the per-frame groups encoded fast.

A SEG of a large series has one Per-Frame Functional Groups item per stored frame (~1000 for 8
organs on 300 slices), each a handful of nested sequences: ~20,000 data elements that pydicom's
generic writer encodes at ~35 us each. Here pydicom writes everything else (file meta,
header, shared groups), the per-frame sequence is encoded by a small explicit-VR little-endian
encoder for the plain VRs those items hold (any other element goes through pydicom's own
element writer), and the Pixel Data element follows it. ``Testing/test_dicom_seg_file.py``
checks the result byte for byte against ``Dataset.save_as``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.multival import MultiValue

PFFG_TAG = 0x52009230           # Per-Frame Functional Groups Sequence
PIXEL_DATA_TAG = 0x7FE00010

_LONG_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
_NUMBER_FORMATS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FD": "d", "FL": "f"}
_STRING_PADDING = {"UI": "\0", "CS": " ", "AE": " ", "AS": " "}       # pydicom's write_string
_TEXT_VRS = frozenset(("SH", "LO", "ST", "LT"))                       # pydicom's write_text
_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)                # item of undefined length
_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _is_multi(value: Any) -> bool:
    return isinstance(value, (MultiValue, list, tuple))


def _value_bytes(vr: str, value: Any) -> bytes | None:
    """Encoded value as pydicom writes it, or None when this encoder does not handle it."""
    if isinstance(value, (np.ndarray, bytes)):
        return None
    if value is None or value == "" or (_is_multi(value) and len(value) == 0):
        return b""
    if vr in _NUMBER_FORMATS:
        values = list(value) if _is_multi(value) else [value]
        if any(isinstance(v, (str, bytes)) for v in values):
            return None
        return struct.pack(f"<{len(values)}{_NUMBER_FORMATS[vr]}", *values)
    if vr in ("DS", "IS"):
        values = list(value) if _is_multi(value) else [value]
        text = "\\".join(v.original_string if hasattr(v, "original_string") else str(v) for v in values)
        pad = " "
    elif vr in _STRING_PADDING or vr in _TEXT_VRS:
        values = list(value) if _is_multi(value) else [value]
        if not all(isinstance(v, str) and v.isascii() for v in values):
            return None   # bytes values or character sets: pydicom's writer knows those
        text = "\\".join(values)
        pad = _STRING_PADDING.get(vr, " ")
    else:
        return None
    if len(text) % 2:
        text += pad
    return text.encode("ascii")


class _Unsupported(Exception):
    """An element this encoder leaves to pydicom's whole-file writer (e.g. an ambiguous VR)."""


def _pydicom_element(elem: Any, encodings: Any) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _encode_dataset(ds: Any, encodings: Any) -> bytes:
    encodings = ds.get("SpecificCharacterSet", encodings)
    out = []
    for tag in sorted(ds.keys()):
        if (tag & 0xFFFF) == 0 and (tag >> 16) > 6:
            continue   # retired group lengths, skipped like pydicom does
        elem = ds.get_item(tag)
        if elem.is_raw:   # read from a file and not yet decoded
            elem = ds[tag]
        vr = str(elem.VR) if elem.VR is not None else ""
        if len(vr) != 2:   # ambiguous ("US or SS"): pydicom resolves it from the dataset
            raise _Unsupported(f"element {tag}")
        if vr == "SQ":
            items = []
            for item in elem.value:
                body = _encode_dataset(item, encodings)
                if getattr(item, "is_undefined_length_sequence_item", False):
                    items += [_ITEM, body, _ITEM_END]
                else:
                    items += [struct.pack("<HHL", 0xFFFE, 0xE000, len(body)), body]
            value = b"".join(items)
            if elem.is_undefined_length:
                out += [_header(int(tag), vr, 0xFFFFFFFF), value, _SEQUENCE_END]
            else:
                out += [_header(int(tag), vr, len(value)), value]
            continue
        value = _value_bytes(vr, elem.value)
        if value is None or elem.is_undefined_length or (vr not in _LONG_VRS and len(value) > 0xFFFF):
            out.append(_pydicom_element(elem, encodings))
        else:
            out += [_header(int(tag), vr, len(value)), value]
    return b"".join(out)


def _encode_item(item: Any, encodings: Any) -> bytes:
    body = _encode_dataset(item, encodings)
    if getattr(item, "is_undefined_length_sequence_item", False):
        return _ITEM + body + _ITEM_END
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def encode_element(ds: Any, tag: int) -> bytes:
    """Explicit-VR little-endian bytes of element ``tag`` of ``ds``, as pydicom writes them."""
    from pydicom.dataset import Dataset

    one = Dataset()
    one[tag] = ds[tag]
    return _encode_dataset(one, ds.get("SpecificCharacterSet", "iso8859"))


# ------------------------------------------------------------------------------- template

@dataclass
class Expanded:
    """The frame-dependent part of a SEG: Number of Frames, the Per-Frame Functional Groups
    Sequence (encoded) and the Pixel Data value."""

    n_frames: int
    pffg: bytes
    pixel_data: bytes


_DIMENSION_INDEX = struct.pack("<HH2sH", 0x0020, 0x9157, b"UL", 8)    # + [segment, position]
_SEGMENT_NUMBER = struct.pack("<HH2sH", 0x0062, 0x000B, b"US", 2)     # + segment number


def _segment_fields(item: bytes) -> tuple[int, int] | None:
    """Offsets of the segment number in Dimension Index Values and in Referenced Segment
    Number of an encoded per-frame item of segment 1; None unless each occurs exactly once."""
    at = []
    for head, value in ((_DIMENSION_INDEX, struct.pack("<L", 1)), (_SEGMENT_NUMBER, struct.pack("<H", 1))):
        i = item.find(head)
        if i < 0 or item.find(head, i + 1) >= 0 or not item.startswith(value, i + len(head)):
            return None
        at.append(i + len(head))
    return (at[0], at[1]) if at[0] < at[1] else None


def _with_segment(item: bytes, fields: tuple[int, int], segment: int) -> bytes:
    i, j = fields
    return b"".join((item[:i], struct.pack("<L", segment), item[i + 4:j], struct.pack("<H", segment),
                     item[j + 2:]))


def expand_template(seg: Any, frames: list[dict], sources: list, row_of: dict) -> Expanded | None:
    """The frames of the real SEG from highdicom's template SEG ``seg``, or None when the
    template does not have the expected layout (the caller then lets highdicom write every frame).

    Template: ``sources`` (the instances that hold any segment) in highdicom's plane order as
    the frames of segment 1, then one frame of segment 2 (for a single segment the template's
    items are the real ones). ``frames[s - 1]`` maps a
    source instance index (``row_of`` gives its position in ``sources``) to the packed bits of
    segment s's frame there. highdicom orders frames by segment, then plane; a frame's item
    differs between segments only in the segment number (Dimension Index Values[0] and
    Referenced Segment Number, fixed-width), which is checked on the template's frame of
    segment 2."""
    n_seg, n_src = len(frames), len(sources)
    n_template = min(n_seg, 2)   # segments the template has frames of
    items = seg.get("PerFrameFunctionalGroupsSequence")
    if items is None or len(items) != n_src + n_template - 1:
        return None
    uid_row = {str(ds.SOPInstanceUID): r for r, ds in enumerate(sources)}

    def source_row(item: Any) -> int | None:
        try:
            refs = item.DerivationImageSequence[0].SourceImageSequence
        except (AttributeError, IndexError, KeyError):
            return None
        return uid_row.get(str(refs[0].ReferencedSOPInstanceUID)) if len(refs) == 1 else None

    order = [source_row(item) for item in items[:n_src]]
    if len(uid_row) != n_src or None in order or sorted(order) != list(range(n_src)):
        return None
    position = {row: p for p, row in enumerate(order)}
    encodings = seg.get("SpecificCharacterSet", "iso8859")
    try:
        encoded = [_encode_item(item, encodings) for item in items[:n_src]]
        # one segment: highdicom puts its number in the shared groups; nothing to change
        fields = [_segment_fields(b) for b in encoded] if n_seg > 1 else []
        if None in fields:
            return None
        for s in range(2, n_template + 1):
            p = position.get(source_row(items[n_src + s - 2]))  # type: ignore[arg-type]
            if p is None or _with_segment(encoded[p], fields[p], s) != _encode_item(items[n_src + s - 2], encodings):
                return None
    except _Unsupported:
        return None
    parts, pixels = [], []
    for s, by_instance in enumerate(frames, 1):
        for i in sorted(by_instance, key=lambda i: position[row_of[i]]):
            p = position[row_of[i]]
            parts.append(encoded[p] if s == 1 else _with_segment(encoded[p], fields[p], s))
            pixels.append(by_instance[i])
    body = b"".join(parts)
    pixel_data = b"".join(np.ascontiguousarray(b).tobytes() for b in pixels)
    if len(pixel_data) % 2:
        pixel_data += b"0"   # highdicom's padding byte
    return Expanded(len(parts), _header(PFFG_TAG, "SQ", len(body)) + body, pixel_data)


def save_seg(seg: Any, path: str | Path, expanded: Expanded | None = None) -> None:
    """``seg.save_as(path)`` (explicit VR little endian, as highdicom builds it), faster; with
    ``expanded``, its frames replace the template's."""
    from pydicom.filewriter import correct_ambiguous_vr_element
    from pydicom.uid import ExplicitVRLittleEndian

    path = Path(path)
    tags = sorted(int(t) for t in seg.keys())
    known = (seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and PFFG_TAG in tags
             and PIXEL_DATA_TAG in tags and not any(t > PFFG_TAG and t != PIXEL_DATA_TAG for t in tags))
    if expanded is None and known:
        try:
            pffg = encode_element(seg, PFFG_TAG)
        except _Unsupported:
            known = False
    if not known:
        if expanded is not None:
            raise ValueError("the template SEG has an unexpected layout")
        seg.save_as(str(path))  # a layout this writer does not know: pydicom writes it all
        return
    pixel = seg[PIXEL_DATA_TAG]
    correct_ambiguous_vr_element(pixel, seg, True)   # "OB or OW" -> OB/OW, as pydicom decides
    if expanded is not None:
        seg.NumberOfFrames = expanded.n_frames
        pffg, value = expanded.pffg, expanded.pixel_data
        pixel_bytes = _header(PIXEL_DATA_TAG, str(pixel.VR), len(value)) + value
    else:
        pixel_bytes = _pydicom_element(pixel, seg.get("SpecificCharacterSet", "iso8859"))
    tail = {t: seg[t] for t in (PFFG_TAG, PIXEL_DATA_TAG)}
    try:
        for t in tail:
            del seg[t]
        with open(path, "wb") as fh:
            seg.save_as(fh)
            fh.write(pffg)
            fh.write(pixel_bytes)
    finally:
        for t, elem in tail.items():
            seg[t] = elem
