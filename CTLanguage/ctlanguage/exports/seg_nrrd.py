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

import gzip

import numpy as np

from ..volume import flip_lps_ras
from . import finding_color, finding_key



def terminology_string(f: Any) -> str | None:
    """Slicer terminology entry for a finding (None when the vocabulary has no code for it)."""
    key = finding_key(f)
    if not key:
        return None
    try:
        from ..vocabulary import slicer_terminology_string  # type: ignore
    except Exception:  # noqa: BLE001 - vocabulary not available
        return None
    try:
        return slicer_terminology_string(key, getattr(f, "laterality", None)) or None
    except Exception:  # noqa: BLE001 - unknown key
        return None


def assign_layers(masks: Sequence[np.ndarray | None]) -> list[int]:
    """Greedy layer assignment: a segment goes into the first layer it does not overlap."""
    layers: list[np.ndarray] = []
    result = []
    for m in masks:
        if m is None or not m.any():
            result.append(0 if layers else -1)
            continue
        mb = m.astype(bool, copy=False)
        for li, occ in enumerate(layers):
            if not np.any(occ & mb):
                occ |= mb
                result.append(li)
                break
        else:
            layers.append(mb.copy())
            result.append(len(layers) - 1)
    return [max(r, 0) for r in result]


def _extent(mask: np.ndarray | None) -> str:
    if mask is None:
        return "0 -1 0 -1 0 -1"
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return "0 -1 0 -1 0 -1"
    slab = mask[ks[0]:ks[-1] + 1]  # bounding slab only for the in-plane extents
    js = np.flatnonzero(slab.any(axis=(0, 2)))
    i_s = np.flatnonzero(slab.any(axis=(0, 1)))
    return f"{i_s[0]} {i_s[-1]} {js[0]} {js[-1]} {ks[0]} {ks[-1]}"


def _matrix_string(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> str:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    vals = ";".join(repr(float(v)) for v in m.ravel())
    k, j, i = shape_kji
    return f"{vals};0;{i - 1};0;{j - 1};0;{k - 1};"


def _clean(text: str) -> str:
    # header values are single lines
    return " ".join(str(text).split())


def write_seg_nrrd(path: str | Path, volume: Any, findings: Sequence[Any],
                   names: Sequence[str] | None = None, compression_level: int = 1) -> Path:
    """Write all findings' masks as segments of one Slicer segmentation file."""
    path = Path(path)
    ijk_to_ras = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    shape = tuple(int(s) for s in np.shape(volume.array))
    masks = [getattr(f, "mask", None) for f in findings]
    layer_of = assign_layers(masks)
    n_layers = max(layer_of, default=0) + 1
    layers = [np.zeros(shape, dtype=np.uint8) for _ in range(n_layers)]
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
        if mask is not None:
            np.copyto(layers[layer], np.uint8(value), where=mask.astype(bool, copy=False))
        name = names[idx] if names is not None else getattr(f, "prompt", f"Segment {idx + 1}")
        r, g, b = finding_color(f, idx)
        p = f"Segment{idx}_"
        header[p + "Color"] = f"{r:.6g} {g:.6g} {b:.6g}"
        header[p + "ColorAutoGenerated"] = "0"
        header[p + "Extent"] = _extent(mask)
        header[p + "ID"] = f"Segment_{idx + 1}"
        header[p + "LabelValue"] = str(value)
        header[p + "Layer"] = str(layer)
        header[p + "Name"] = _clean(name) or f"Segment {idx + 1}"
        header[p + "NameAutoGenerated"] = "0"
        term = terminology_string(f)
        header[p + "Tags"] = (f"TerminologyEntry:{_clean(term)}|" if term else "|")
    lines += [f"{key}:={value}" for key, value in header.items()]
    # C-order (k, j, i, layer): the list axis is the fastest, as NRRD's first axis must be
    data = layers[0] if n_layers == 1 else np.stack(layers, axis=-1)
    del layers
    head = ("\n".join(lines) + "\n\n").encode("utf-8")
    # C-order array (k, j, i[, layer]) == NRRD axes ([layer,] i, j, k) with the first fastest
    with open(path, "wb") as fh:
        fh.write(head)
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=compression_level, mtime=0) as gz:
            gz.write(np.ascontiguousarray(data).data)
    return path


def _num(x: float) -> str:
    v = float(x)
    if v == 0.0:
        return "0"
    return repr(v)
