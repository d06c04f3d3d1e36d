"""DICOM SEG through Slicer's own DICOM export (DICOMSegmentationPlugin, Slicer application only).

The segments carry their terminology (SNOMED category/type/region); the segmentation's reference
geometry is the input volume, which must have been loaded through the DICOM module so that the
SEG references its series.
"""

from __future__ import annotations


def export_dicom_seg(scene, segmentation_node, volume_node, folder: str) -> str:
    """Write a DICOM SEG of ``segmentation_node`` into ``folder``; returns the folder."""
    if segmentation_node is None:
        raise ValueError("Nothing to export yet: run a prompt first.")
    sh = scene.GetSubjectHierarchyNode()
    volume_item = sh.GetItemByDataNode(volume_node)
    if not sh.GetItemUID(volume_item, "DICOM"):
        raise ValueError("DICOM SEG needs a CT loaded through the DICOM module (it must reference a DICOM "
                         "series); for other inputs export .seg.nrrd.")
    seg_item = sh.GetItemByDataNode(segmentation_node)
    sh.SetItemParent(seg_item, sh.GetItemParent(volume_item))  # same study as the CT
    try:
        import DICOMSegmentationPlugin
    except ImportError:
        raise ValueError("Slicer's DICOM segmentation export plugin is not available in this Slicer "
                         "(install the QuantitativeReporting extension on older Slicer versions).") from None
    exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
    exportables = exporter.examineForExport(seg_item)
    if not exportables:
        raise ValueError("Slicer's DICOM exporter did not accept the segmentation.")
    for exportable in exportables:
        exportable.directory = folder
    message = exporter.export(exportables)
    if message:
        raise ValueError(f"DICOM SEG export failed: {message}")
    return folder
