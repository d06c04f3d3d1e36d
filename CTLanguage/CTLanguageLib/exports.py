"""File exports of one volume's findings from a :class:`~CTLanguageLib.session.CTLanguageSession`:
.seg.nrrd (segmentation storage node), findings CSV/JSON and the HTML report (the engine's
``ctlanguage.exports`` writers, so the documents equal the CLI's). DICOM SEG: ``dicom_export``.
"""

from __future__ import annotations

import os

from . import mrml_glue
from .dicom_export import export_dicom_seg

KINDS = {"segnrrd": ".seg.nrrd", "csv": ".csv", "json": ".json", "html": ".html", "dicomseg": ""}


def export(session, volume_node, folder: str, kind: str) -> str:
    """Write export ``kind`` (a key of KINDS) of ``volume_node``'s findings into ``folder`` as
    ``<volume name>_ctlanguage<suffix>``; returns the path written."""
    if volume_node is None:
        raise ValueError("Select the input CT volume.")
    if kind not in KINDS:
        raise ValueError(f"Unknown export '{kind}'.")
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"Output folder '{folder}' does not exist.")
    if kind == "dicomseg":
        return export_dicom_seg(session.scene, session.segmentation_node(volume_node), volume_node, folder)
    path = os.path.join(folder, f"{volume_node.GetName()}_ctlanguage{KINDS[kind]}")
    if kind == "segnrrd":
        return export_seg_nrrd(session, volume_node, path)
    if kind == "html":
        return export_html_report(session, volume_node, path)
    return export_findings(session, volume_node, path)


def export_seg_nrrd(session, volume_node, path: str) -> str:
    seg = session.segmentation_node(volume_node)
    if seg is None:
        raise ValueError("Nothing to export yet: run a prompt first.")
    return mrml_glue.save_segmentation(seg, path)


def _context(session, volume_node, path: str):
    results = session.results(volume_node)
    if not results:
        raise ValueError("Nothing to export yet: run a prompt first.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"Output folder '{folder}' does not exist or is not writable.")
    volume = mrml_glue.volume_node_to_ctvolume(volume_node)
    extra = {"mask_threshold": session.mask_threshold, "probability_threshold": session.probability_threshold,
             "absent_masks": session.absent_masks,
             "prompts": [r.prompt for r in results], "research_use_only": True,
             "exported_from": "3D Slicer CTLanguage module"}
    return volume, [r.finding for r in results], extra


def export_findings(session, volume_node, path: str) -> str:
    """Findings table as CSV or JSON (by extension), stamped with model, prompts and thresholds;
    the same document as the CLI's findings.json (ctlanguage.exports.findings_table)."""
    from ctlanguage.exports import bundle, findings_table

    volume, findings, extra = _context(session, volume_node, path)
    doc = findings_table.build_document(findings, [None] * len(findings), model=session.model_record(),
                                        input_info=bundle.input_record(volume), extra=extra)
    writer = findings_table.write_json if str(path).lower().endswith(".json") else findings_table.write_csv
    try:
        return str(writer(path, doc))
    except Exception as exc:
        raise ValueError(str(exc)) from exc


def export_html_report(session, volume_node, path: str) -> str:
    """HTML report with key images (ctlanguage.exports.html_report)."""
    from ctlanguage.exports import bundle, html_report

    volume, findings, extra = _context(session, volume_node, path)
    try:
        return str(html_report.write_report(path, volume, findings, model=session.model_record(),
                                            input_info=bundle.input_record(volume), extra=extra))
    except Exception as exc:
        raise ValueError(str(exc)) from exc
