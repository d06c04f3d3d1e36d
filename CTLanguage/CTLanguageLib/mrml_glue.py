"""MRML <-> engine glue.

Everything here works on an explicit ``vtkMRMLScene`` (never ``slicer.mrmlScene``), so the same
code runs inside the Slicer application, in the trame-slicer web demo, and under pytest with the
``slicer-core`` wheel.  Only ``vtk``, ``numpy`` and the MRML classes exported by ``slicer`` are
used; the engine (``ctlanguage``) is imported lazily. Findings are the engine's
``ctlanguage.engine.Finding``: the glue reads its public attributes directly.

Geometry: a volume node's voxel array is ``[k, j, i]`` (same as ``slicer.util.arrayFromVolume``)
and its ``IJKToRASMatrix`` maps ``(i, j, k, 1)`` to RAS -- exactly ``CTVolume.array`` and
``CTVolume.ijk_to_ras``.  Masks coming back from the engine are on the same grid, so segments
are written without any resampling: the binary labelmap of each segment has the volume's own
image-to-world matrix, and the segmentation's reference geometry is the input volume's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

HEATMAP_COLOR_NODE_NAME = "CTLanguageHeat"
ATTRIBUTE_PREFIX = "CTLanguage."

# A generic terminology for prompts that do not map to a known concept (Slicer's general
# anatomy list "Tissue" category). Used only when the vocabulary gives nothing.
GENERIC_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"
)


# --------------------------------------------------------------------------------------------
# matrices and arrays
# --------------------------------------------------------------------------------------------

def vtk_matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {array.shape}")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def ijk_to_ras_of_node(volume_node, world: bool = False) -> np.ndarray:
    """The node's IJK->RAS matrix (4x4 float64). With ``world=True`` a linear parent transform is
    composed in (non-linear parent transforms are refused)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = vtk_matrix_to_numpy(m)
    if world:
        parent = volume_node.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise ValueError(
                    f"Volume '{volume_node.GetName()}' is under a non-linear transform; harden the "
                    "transform (Data module) before encoding."
                )
            to_world = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(to_world)
            ijk_to_ras = vtk_matrix_to_numpy(to_world) @ ijk_to_ras
    return ijk_to_ras


def array_from_volume_node(volume_node) -> np.ndarray:
    """A *copy* of the voxel array in ``[k, j, i]`` order (like ``slicer.util.arrayFromVolume``)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise ValueError(f"Volume '{name}' has no voxel data.")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(
            f"Volume '{volume_node.GetName()}' has {scalars.GetNumberOfComponents()} components per "
            "voxel; a CT must be a single-component scalar volume."
        )
    dims = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(scalars)
    return np.array(arr.reshape(dims[2], dims[1], dims[0]), copy=True)


def _set_image_from_array(image: vtk.vtkImageData, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    k, j, i = array.shape
    image.SetDimensions(int(i), int(j), int(k))
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(order="C"), deep=True)
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    image.Modified()


def _set_node_geometry(volume_node, ijk_to_ras: np.ndarray) -> None:
    volume_node.SetIJKToRASMatrix(numpy_to_vtk_matrix(ijk_to_ras))


# --------------------------------------------------------------------------------------------
# volume node <-> CTVolume
# --------------------------------------------------------------------------------------------

def _make_ctvolume(array: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    from ctlanguage.volume import CTVolume  # lazy: pulls in the engine package only when needed

    return CTVolume(array=array, ijk_to_ras=ijk_to_ras, source=f"Slicer volume node '{name}'",
                    modality="CT", metadata={"slicer_node_name": name})


def volume_node_to_ctvolume(volume_node):
    """Scalar volume node -> ``ctlanguage.volume.CTVolume`` with the exact voxel->RAS affine.

    The affine is the node's IJKToRAS composed with a linear parent transform (world RAS), so the
    engine sees the patient orientation the user sees. The voxel grid is untouched.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError("Select a CT scalar volume first.")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{volume_node.GetName()}' is a label map, not a CT volume.")
    array = array_from_volume_node(volume_node).astype(np.float32, copy=False)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"Volume '{volume_node.GetName()}' is not a 3D volume (shape {array.shape}).")
    return _make_ctvolume(array, ijk_to_ras_of_node(volume_node, world=True), volume_node.GetName())


def ctvolume_to_volume_node(scene, volume, name: str = "CT", node=None):
    """CTVolume (or anything with ``array`` [k,j,i] and ``ijk_to_ras``) -> scalar volume node."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CreateDefaultDisplayNodes()
    image = vtk.vtkImageData()
    _set_image_from_array(image, np.asarray(volume.array))
    node.SetAndObserveImageData(image)
    _set_node_geometry(node, np.asarray(volume.ijk_to_ras))
    display = node.GetDisplayNode()
    if display is not None and hasattr(display, "SetAutoWindowLevel"):
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(400.0, 40.0)
    return node


# --------------------------------------------------------------------------------------------
# findings -> segmentation
# --------------------------------------------------------------------------------------------

def _color01(color) -> tuple[float, float, float]:
    """A finding's RGB colour (0..255 integers, from the vocabulary) as Slicer's 0..1 floats."""
    return tuple(min(max(int(c) / 255.0, 0.0), 1.0) for c in color[:3])


def terminology_for_finding(finding) -> str:
    """The finding's Slicer terminology string (the engine's, from the vocabulary), or a generic
    'Tissue' entry when the prompt maps to no known concept."""
    own = finding.terminology
    return own if isinstance(own, str) and own.count("~") >= 6 else GENERIC_TERMINOLOGY


def oriented_image_from_mask(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """uint8 mask [k,j,i] + IJK->RAS -> vtkOrientedImageData on exactly that grid."""
    image = slicer.vtkOrientedImageData()
    _set_image_from_array(image, np.asarray(mask, dtype=np.uint8))
    image.SetImageToWorldMatrix(numpy_to_vtk_matrix(ijk_to_ras))
    return image


def new_segmentation_node(scene, reference_volume_node, name: str | None = None):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{reference_volume_node.GetName()} CTLanguage")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    parent = reference_volume_node.GetParentTransformNode()
    if parent is not None:
        seg.SetAndObserveTransformNodeID(parent.GetID())
    seg.SetAttribute(ATTRIBUTE_PREFIX + "ReferenceVolumeID", reference_volume_node.GetID())
    return seg


def _mask_image(mask: np.ndarray, reference_volume_node):
    """``mask`` (reference grid) -> vtkOrientedImageData of its bounding box."""
    ref_shape = array_shape_of_node(reference_volume_node)
    mask = np.asarray(mask)
    if mask.shape != ref_shape:
        raise ValueError(
            f"Mask shape {mask.shape} does not match the volume grid {ref_shape}; the engine must "
            "return masks on the source grid."
        )
    binary = mask > 0
    ijk_to_ras = ijk_to_ras_of_node(reference_volume_node)
    # Only the mask's bounding box travels (same grid, shifted origin): much less copying for
    # small findings on large CTs; an empty mask becomes one zero voxel (MODE_REPLACE clears).
    ks = np.flatnonzero(binary.any(axis=(1, 2)))
    if ks.size:
        k0, k1 = int(ks[0]), int(ks[-1]) + 1
        slab = binary[k0:k1]
        js = np.flatnonzero(slab.any(axis=(0, 2)))
        is_ = np.flatnonzero(slab.any(axis=(0, 1)))
        j0, j1, i0, i1 = int(js[0]), int(js[-1]) + 1, int(is_[0]), int(is_[-1]) + 1
    else:
        k0 = j0 = i0 = 0
        k1 = j1 = i1 = 1
    crop = np.ascontiguousarray(binary[k0:k1, j0:j1, i0:i1], dtype=np.uint8)
    shift = np.eye(4)
    shift[:3, 3] = (i0, j0, k0)
    return oriented_image_from_mask(crop, ijk_to_ras @ shift)


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, reference_volume_node) -> None:
    """Replace a segment's binary labelmap with ``mask`` on the reference volume's voxel grid."""
    image = _mask_image(mask, reference_volume_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ok = logic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, logic.MODE_REPLACE, image.GetExtent()
    )
    if not ok:
        raise ValueError(f"Could not write the mask of segment '{segment_id}'.")


def array_shape_of_node(volume_node) -> tuple[int, int, int]:
    dims = volume_node.GetImageData().GetDimensions()
    return (dims[2], dims[1], dims[0])


def _unique_segment_id(segmentation, base: str) -> str:
    sid = "".join(ch if ch.isalnum() else "_" for ch in base).strip("_") or "finding"
    candidate, n = sid, 1
    while segmentation.GetSegment(candidate) is not None:
        n += 1
        candidate = f"{sid}_{n}"
    return candidate


def add_finding_segment(segmentation_node, finding, reference_volume_node, segment_id: str | None = None,
                        visible: bool = True) -> str:
    """Add (or replace, if ``segment_id`` exists) one segment for a finding: name = prompt,
    colour, terminology, mask on the reference grid; probability etc. stored as segment tags."""
    segmentation = segmentation_node.GetSegmentation()
    name = finding.name or finding.prompt or "finding"
    created = segment_id is None or segmentation.GetSegment(segment_id) is None
    if created:
        segment_id = segment_id or _unique_segment_id(segmentation, name)
        segment = slicer.vtkSegment()
        segment.SetName(name)
        # the new segment carries its labelmap when it is added: an empty segment added while
        # a closed-surface representation exists makes the surface conversion fail for it
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                                  _mask_image(finding.mask, reference_volume_node))
        segmentation.AddSegment(segment, segment_id)
    segment = segmentation.GetSegment(segment_id)
    segment.SetName(name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*_color01(finding.color))
    segment.SetColorAutoGenerated(False)
    segment.SetTerminology(terminology_for_finding(finding))
    prob = finding.probability
    segment.SetTag(ATTRIBUTE_PREFIX + "Probability", "" if prob is None else f"{float(prob):.6g}")
    segment.SetTag(ATTRIBUTE_PREFIX + "PromptConfidence", f"{float(finding.prompt_confidence):.6g}")
    segment.SetTag(ATTRIBUTE_PREFIX + "Anatomy", finding.anatomy or "")
    segment.SetTag(ATTRIBUTE_PREFIX + "ScoreLabel", finding.score_label or "")
    segment.SetTag(ATTRIBUTE_PREFIX + "MaskModel", finding.mask_model or "")
    segment.SetTag(ATTRIBUTE_PREFIX + "ScoreModel", finding.score_model or "")
    if not created:
        set_segment_mask(segmentation_node, segment_id, finding.mask, reference_volume_node)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetSegmentVisibility(segment_id, bool(visible))
    return segment_id


def findings_to_segmentation(scene, findings, reference_volume_node, segmentation_node=None,
                             probability_threshold: float | None = None):
    """Write findings as segments. Returns ``(segmentation_node, [segment_id, ...])``.

    With ``probability_threshold`` a finding whose probability is below it is added hidden
    (anatomy-only prompts, probability None, are always shown)."""
    if reference_volume_node is None:
        raise ValueError("Select the CT volume the findings were computed on.")
    if segmentation_node is None:
        segmentation_node = new_segmentation_node(scene, reference_volume_node)
    ids = []
    for f in findings:
        ids.append(add_finding_segment(segmentation_node, f, reference_volume_node,
                                       visible=finding_visible(f, probability_threshold)))
    return segmentation_node, ids


def finding_visible(finding, probability_threshold: float | None) -> bool:
    """Whether a finding's segment is shown: its number for being *present* reaches the threshold
    (for "no pleural effusion" too: the segment is the effusion, shown when likely). A display
    filter only; whether the mask is drawn at all is the engine's rule (``session.shown``)."""
    prob = finding.probability_present if finding.probability_present is not None else finding.probability
    if probability_threshold is None or prob is None:
        return True
    return float(prob) >= float(probability_threshold)


def segment_mask_on_reference(scene, segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """Export one segment as a labelmap on the reference volume's grid -> uint8 [k,j,i] (0/1)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ctlanguage_export__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume_node
        )
        if not ok:
            raise ValueError(f"Could not export segment '{segment_id}'.")
        if not np.allclose(ijk_to_ras_of_node(labelmap), ijk_to_ras_of_node(reference_volume_node)):
            raise ValueError("Exported labelmap is not on the reference grid.")
        return (array_from_volume_node(labelmap) > 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        scene.RemoveNode(labelmap)
        if color is not None and color.GetName() and "__ctlanguage_export__" in (color.GetName() or ""):
            scene.RemoveNode(color)


def segment_center_ras(segmentation_node, segment_id: str):
    """RAS centre of a segment (for jumping the slice views), or None when empty."""
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    if center is None:
        return None
    c = [float(x) for x in center]
    return None if any(math.isnan(x) for x in c) else c


def mask_center_ras(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """Centroid of a [k,j,i] mask in RAS millimetres, or None when empty."""
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        return None
    k, j, i = idx.mean(axis=0)
    return (np.asarray(ijk_to_ras) @ np.array([i, j, k, 1.0]))[:3].tolist()


# --------------------------------------------------------------------------------------------
# heat map -> scalar volume with a colour table
# --------------------------------------------------------------------------------------------

def heat_color_node(scene):
    """A 256-entry black->red->yellow->white colour table, transparent at 0 (created once)."""
    existing = scene.GetFirstNodeByName(HEATMAP_COLOR_NODE_NAME)
    if existing is not None:
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEATMAP_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for n in range(256):
        t = n / 255.0
        r = min(1.0, 3.0 * t)
        g = min(1.0, max(0.0, 3.0 * t - 1.0))
        b = min(1.0, max(0.0, 3.0 * t - 2.0))
        alpha = 0.0 if n == 0 else min(1.0, 0.25 + t)
        node.SetColor(n, f"{n}", r, g, b, alpha)
    node.SetAttribute(ATTRIBUTE_PREFIX + "HeatMap", "1")
    return node


def heatmap_to_volume(scene, heatmap: np.ndarray, reference_volume_node, name: str = "CTLanguage heat map",
                      node=None):
    """float heat map [k,j,i] in [0,1] on the reference grid -> scalar volume node displayed with
    the heat colour table (window 0..1)."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != array_shape_of_node(reference_volume_node):
        raise ValueError("Heat map is not on the input volume's grid.")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CreateDefaultDisplayNodes()
    image = vtk.vtkImageData()
    _set_image_from_array(image, heatmap)
    node.SetAndObserveImageData(image)
    _set_node_geometry(node, ijk_to_ras_of_node(reference_volume_node))
    parent = reference_volume_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
    return node


# --------------------------------------------------------------------------------------------
# .seg.nrrd through the segmentation storage node
# --------------------------------------------------------------------------------------------

def check_output_folder(path: str) -> None:
    """ValueError (the panel's error type) unless the folder of ``path`` exists and accepts files."""
    from ctlanguage.errors import ExportError
    from ctlanguage.exports.atomic import check_writable_dir

    try:
        check_writable_dir(os.path.dirname(os.path.abspath(path)), create=False)
    except ExportError as exc:
        raise ValueError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None


def save_segmentation(segmentation_node, path: str) -> str:
    """Write a .seg.nrrd through vtkMRMLSegmentationStorageNode (names, colours, terminology and
    the binary labelmaps on the reference grid are kept)."""
    path = os.fspath(path)
    check_output_folder(path)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    if hasattr(storage, "SetCropToMinimumExtent"):
        storage.SetCropToMinimumExtent(False)
    if not storage.WriteData(segmentation_node):
        raise ValueError(f"Could not write '{path}'.")
    return path


def load_segmentation(scene, path: str, name: str | None = None):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(path))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(os.fspath(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise ValueError(f"Could not read '{path}'.")
    return node


@dataclass
class SceneSnapshot:
    """Node ids and their modification times: compare two snapshots to prove nothing changed."""

    nodes: dict

    @classmethod
    def take(cls, scene) -> "SceneSnapshot":
        nodes = {}
        for n in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(n)
            nodes[node.GetID()] = (node.GetClassName(), node.GetMTime())
        return cls(nodes)
