"""The findings as tables: the MRML table node saved with the scene (one row per finding) and the
texts of the module panel's results table (filled by ``panel.fill_results_table``). Qt-free; works
on an explicit scene (pytest, web demo, Slicer).
"""

from __future__ import annotations

import vtk

from .mrml_glue import ATTRIBUTE_PREFIX

# MRML table columns written by findings_to_table (order matters).
TABLE_COLUMNS = (
    ("prompt", "string"),
    ("anatomy", "string"),
    ("finding", "string"),
    ("laterality", "string"),
    ("probability", "double"),
    ("score_label", "string"),
    ("prompt_confidence", "double"),
    ("volume_ml", "double"),
    ("mask_model", "string"),
    ("score_model", "string"),
    ("segment_id", "string"),
)

# The panel's results table.
PANEL_COLUMNS = ("Prompt", "Anatomy", "Score", "Prompt confidence", "Volume (ml)", "Model", "Show", "Colour")
SCORE_COLUMN = 2
SHOW_COLUMN = 6
COLOR_COLUMN = 7


def _float_or_nan(value) -> float:
    return float("nan") if value is None else float(value)


def findings_to_table(scene, findings, segment_ids=None, table_node=None, model_id: str = ""):
    """Write one row per finding into a vtkMRMLTableNode (columns: TABLE_COLUMNS).
    A probability of None (pure anatomy prompt) is stored as NaN; ``score_label`` says what the
    number is (calibrated probability or uncalibrated score), the model columns who made it."""
    findings = list(findings)
    segment_ids = list(segment_ids) if segment_ids is not None else [""] * len(findings)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", "CTLanguage findings")
    table = table_node.GetTable()
    table.Initialize()
    columns = {}
    for name, kind in TABLE_COLUMNS:
        col = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        col.SetName(name)
        table.AddColumn(col)
        columns[name] = col
    for f, sid in zip(findings, segment_ids):
        columns["prompt"].InsertNextValue(f.prompt)
        columns["anatomy"].InsertNextValue(f.anatomy or "")
        columns["finding"].InsertNextValue(f.finding or "")
        columns["laterality"].InsertNextValue(f.laterality or "")
        columns["probability"].InsertNextValue(_float_or_nan(f.probability))
        columns["score_label"].InsertNextValue(f.score_label or "")
        columns["prompt_confidence"].InsertNextValue(float(f.prompt_confidence))
        columns["volume_ml"].InsertNextValue(_float_or_nan(f.volume_ml))
        columns["mask_model"].InsertNextValue(f.mask_model or "")
        columns["score_model"].InsertNextValue(f.score_model or "")
        columns["segment_id"].InsertNextValue(str(sid or ""))
    table.Modified()
    table_node.SetUseColumnTitleAsColumnHeader(True)
    if model_id:
        table_node.SetAttribute(ATTRIBUTE_PREFIX + "ModelId", model_id)
    table_node.Modified()
    return table_node


def table_rows(table_node) -> list[dict]:
    """Read a findings table back as a list of dicts (numbers as float, NaN for missing)."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            col = table.GetColumn(c)
            v = col.GetValue(r)
            row[col.GetName()] = float(v) if isinstance(col, vtk.vtkDoubleArray) else str(v)
        rows.append(row)
    return rows


def panel_texts(finding) -> tuple:
    """The text columns of the panel's row for one finding (Prompt .. Model). A score that is not
    a calibrated probability says so; the model column names who made the mask and the number."""
    p, v = finding.probability, finding.volume_ml
    if not finding.understood:  # no concept matched: no mask, no number, a suggestion
        hint = f" — try '{finding.suggestions[0]}'" if finding.suggestions else ""
        return (finding.prompt, f"not understood{hint}", "—", f"{finding.prompt_confidence:.2f}", "—", "")
    score = "—" if p is None else f"{p:.2f}" + ("" if finding.calibrated else " (uncalibrated)")
    models = dict.fromkeys(m for m in (finding.mask_model, finding.score_model) if m)
    return (finding.prompt, finding.anatomy or "", score, f"{finding.prompt_confidence:.2f}",
            "—" if v is None else f"{v:.1f}", " / ".join(models))
