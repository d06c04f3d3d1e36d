"""Slicer segmentation file (``.seg.nrrd``) written directly with pynrrd.

Follows the header conventions of Slicer's vtkMRMLSegmentationStorageNode (Slicer >= 4.11):
one binary-labelmap *layer* per NRRD volume along a leading ``list`` axis (4-D file) when
segments overlap — e.g. "liver" and "liver lesion" — or a plain 3-D labelmap when they do not;
per segment ``SegmentN_ID/Name/Color/LabelValue/Layer/Extent/Tags`` key/value pairs, with the
Slicer terminology string under the ``TerminologyEntry`` tag. The file keeps the full extent of
the source volume (``Segmentation_ReferenceImageExtentOffset 0 0 0``) so voxels line up 1:1 with
the CT and the NIfTI masks.

The file is written by a small writer here rather than pynrrd because segment names are free
text (any language): the header is UTF-8, as Slicer reads and writes it, while pynrrd only writes
ASCII headers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..volume import flip_lps_ras
from . import finding_color, finding_key
from .extent import MaskExtent, extents_for, mask_extent, masks_overlap
from .gzip_stream import write_gzip



def terminology_string(f: Any) -> str | None:
    """Slicer terminology entry for a finding (None when the vocabulary has no code for it)."""
    key = finding_key(f)
    if not key:
        return None
    try:
        from ..segment_codes import slicer_terminology_string  # type: ignore
    except Exception:  # noqa: BLE001 - vocabulary not available
        return None
    try:
        return slicer_terminology_string(key, getattr(f, "laterality", None)) or None
    except Exception:  # noqa: BLE001 - unknown key
        return None


def assign_layers(masks: Sequence[np.ndarray | None], extents: Sequence[MaskExtent] | None = None
                  ) -> list[int]:
    """Greedy layer assignment: a segment goes into the first layer it does not overlap."""
    if extents is None:
        extents = [mask_extent(m) for m in masks]
    layers: list[list[int]] = []   # segment indices per layer
    result = []
    for n, (m, e) in enumerate(zip(masks, extents)):
        if m is None or e.empty:
            result.append(0)
            continue
        for li, members in enumerate(layers):
            if not any(masks_overlap(m, e, masks[o], extents[o]) for o in members):
                members.append(n)
                result.append(li)
                break
        else:
            layers.append([n])
            result.append(len(layers) - 1)
    return result


def _extent(ext: MaskExtent) -> str:
    if ext.box is None:
        return "0 -1 0 -1 0 -1"
    k0, k1, j0, j1, i0, i1 = ext.bounds()
    return f"{i0} {i1 - 1} {j0} {j1 - 1} {k0} {k1 - 1}"


def _matrix_string(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> str:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    vals = ";".join(repr(float(v)) for v in m.ravel())
    k, j, i = shape_kji
    return f"{vals};0;{i - 1};0;{j - 1};0;{k - 1};"


def _clean(text: str) -> str:
    # header values are single lines
    return " ".join(str(text).split())


def write_seg_nrrd(path: str | Path, volume: Any, findings: Sequence[Any],
                   names: Sequence[str] | None = None, compression_level: int = 1,
                   extents: Sequence[MaskExtent] | None = None) -> Path:
    """Write all findings' masks as segments of one Slicer segmentation file.

    The labelmap is built only inside the union of the masks' bounding boxes (full rows) and
    gzipped by ``gzip_stream``, so the cost follows the segments' size, not the volume's."""
    path = Path(path)
    ijk_to_ras = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    shape = tuple(int(s) for s in np.shape(volume.array))
    masks = [getattr(f, "mask", None) for f in findings]
    extents = extents_for(findings, extents)
    layer_of = assign_layers(masks, extents)
    n_layers = max(layer_of, default=0) + 1
    boxes = [e.box for m, e in zip(masks, extents) if m is not None and e.box is not None]
    if boxes:   # union box, full width along i so that every k-slice's rows are contiguous
        k0, k1 = min(b[0].start for b in boxes), max(b[0].stop for b in boxes)
        j0, j1 = min(b[1].start for b in boxes), max(b[1].stop for b in boxes)
        sub = np.zeros((k1 - k0, j1 - j0, shape[2], n_layers), dtype=np.uint8)
        union_box: Any = (slice(k0, k1), slice(j0, j1))
        used = np.zeros(shape[0], bool)
        for m, e in zip(masks, extents):
            if m is not None and e.box is not None:
                used |= e.slices
    else:
        sub, union_box, used = None, None, None
    label_in_layer = [0] * n_layers
    lps = flip_lps_ras(ijk_to_ras)
    dirs = lps[:3, :3].T  # rows: i, j, k axis vectors in LPS
    origin = lps[:3, 3]
    vec = lambda v: "(" + ",".join(_num(x) for x in v) + ")"  # noqa: E731
    k, j, i = shape
    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", "type: unsigned char"]
    if n_layers > 1:
        lines += ["dimension: 4", "space: left-posterior-superior", f"sizes: {n_layers} {i} {j} {k}",
                  "space directions: none " + " ".join(vec(d) for d in dirs),
                  "kinds: list domain domain domain"]
    else:
        lines += ["dimension: 3", "space: left-posterior-superior", f"sizes: {i} {j} {k}",
                  "space directions: " + " ".join(vec(d) for d in dirs), "kinds: domain domain domain"]
    lines += ["encoding: gzip", f"space origin: {vec(origin)}"]
    header: dict[str, str] = {}
    ref_geometry = _matrix_string(ijk_to_ras, shape)  # type: ignore[arg-type]
    header["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    header["Segmentation_ConversionParameters"] = (
        f"Reference image geometry|{ref_geometry}|Image geometry description&"
        "Crop to reference image geometry|0|Crop the model to the extent of reference geometry. "
        "0 (default) = created labelmap will contain the entire model. "
        "1 = created labelmap extent will be within reference image extent."
    )
    header["Segmentation_MasterRepresentation"] = "Binary labelmap"
    header["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    for idx, (f, mask, layer) in enumerate(zip(findings, masks, layer_of)):
        label_in_layer[layer] += 1
        value = label_in_layer[layer]
        ext = extents[idx]
        if mask is not None and ext.box is not None:
            ks, js, is_ = ext.box
            dst = sub[ks.start - k0:ks.stop - k0, js.start - j0:js.stop - j0, is_, layer]
            np.copyto(dst, np.uint8(value), where=mask[ext.box].astype(bool, copy=False))
        name = names[idx] if names is not None else getattr(f, "prompt", f"Segment {idx + 1}")
        r, g, b = finding_color(f, idx)
        p = f"Segment{idx}_"
        header[p + "Color"] = f"{r:.6g} {g:.6g} {b:.6g}"
        header[p + "ColorAutoGenerated"] = "0"
        header[p + "Extent"] = _extent(ext)
        header[p + "ID"] = f"Segment_{idx + 1}"
        header[p + "LabelValue"] = str(value)
        header[p + "Layer"] = str(layer)
        header[p + "Name"] = _clean(name) or f"Segment {idx + 1}"
        header[p + "NameAutoGenerated"] = "0"
        term = terminology_string(f)
        header[p + "Tags"] = (f"TerminologyEntry:{_clean(term)}|" if term else "|")
    lines += [f"{key}:={value}" for key, value in header.items()]
    head = ("\n".join(lines) + "\n\n").encode("utf-8")
    # C-order (k, j, i[, layer]) == NRRD axes ([layer,] i, j, k), the first fastest; the gzip
    # stream starts after the plain-text header
    with open(path, "wb") as fh:
        fh.write(head)
        write_gzip(fh, b"", _labelmap_pieces(shape, n_layers, sub, union_box, used),
                   level=compression_level)
    return path


def _labelmap_pieces(shape, n_layers: int, sub, union_box, used):
    """Bytes of the full (k, j, i, layer) labelmap: zeros outside ``sub`` (the union box)."""
    if sub is None:
        yield int(np.prod(shape, dtype=np.int64)) * n_layers
        return
    ks, js = union_box
    row = shape[2] * n_layers
    yield ks.start * shape[1] * row
    for k in range(ks.start, ks.stop):
        if not used[k]:
            yield shape[1] * row
            continue
        yield js.start * row
        yield sub[k - ks.start]
        yield (shape[1] - js.stop) * row
    yield (shape[0] - ks.stop) * shape[1] * row


def _num(x: float) -> str:
    v = float(x)
    if v == 0.0:
        return "0"
    return repr(v)
