"""Findings table as JSON (full record, machine-readable) and CSV (one row per prompt)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CSV_COLUMNS = [
    "prompt", "understood", "kind", "anatomy", "finding", "laterality", "negated", "probability",
    "score_label", "prompt_confidence", "volume_ml", "mask", "mask_suppressed", "mask_model",
    "score_model", "calibration", "snomed_code", "snomed_meaning", "research_use_only",
]
RESEARCH_NOTICE = "Research use only; not for diagnosis."


def _num(v: Any, digits: int = 6) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(x) or math.isinf(x):
        return None
    return round(x, digits)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _num(obj, 10)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict())
    if hasattr(obj, "__dict__"):
        return _jsonable({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return str(obj)


def finding_record(f: Any, mask_rel: str | None) -> dict:
    """The JSON record of one finding (the contract of findings.json, see docs/exports.md)."""
    return {
        "prompt": getattr(f, "prompt", None),
        "understood": bool(getattr(f, "understood", True)),
        "suggestions": list(getattr(f, "suggestions", ()) or ()),
        "kind": getattr(f, "kind", None),
        "anatomy": getattr(f, "anatomy", None),
        "finding": getattr(f, "finding", None),
        "laterality": getattr(f, "laterality", None),
        "negated": bool(getattr(f, "negated", False)),
        "probability": _num(getattr(f, "probability", None)),
        "probability_present": _num(getattr(f, "probability_present", None)),
        "score_label": getattr(f, "score_label", None),
        "calibrated": bool(getattr(f, "calibrated", False)),
        "calibration": getattr(f, "calibration", None),
        "score_model": getattr(f, "score_model", None),
        "prompt_confidence": _num(getattr(f, "prompt_confidence", None)),
        "mask": mask_rel,
        "mask_model": getattr(f, "mask_model", None),
        "mask_suppressed": bool(getattr(f, "mask_suppressed", False)),
        "volume_ml": _num(getattr(f, "volume_ml", None), 4),
        "codes": _jsonable(getattr(f, "codes", None)),
    }


def _primary_code(codes: Any) -> tuple[str, str]:
    """Best-effort (code, meaning) for the CSV from whatever shape the codes dict has."""
    if not codes:
        return "", ""
    if isinstance(codes, dict):
        for key in ("finding", "type", "property_type", "anatomy", "anatomic_region"):
            c = codes.get(key)
            if c:
                return _primary_code(c)
        code = codes.get("code") or codes.get("value") or codes.get("CodeValue")
        meaning = codes.get("meaning") or codes.get("CodeMeaning") or ""
        if code:
            return str(code), str(meaning)
        return "", ""
    if isinstance(codes, (list, tuple)) and codes:
        if all(isinstance(x, (str, int)) for x in codes) and len(codes) >= 2:
            return str(codes[0]), str(codes[-1])
        return _primary_code(codes[0])
    return "", ""


def build_document(findings: Sequence[Any], mask_paths: Sequence[str | None], *, model: dict,
                   input_info: dict, extra: dict | None = None) -> dict:
    doc = {
        "research_use_only": True,
        "notice": RESEARCH_NOTICE,
        "model": _jsonable(model),
        "input": _jsonable(input_info),
        "findings": [finding_record(f, m) for f, m in zip(findings, mask_paths)],
    }
    if extra:
        doc.update(_jsonable(extra))
    return doc


def write_json(path: str | Path, document: dict) -> Path:
    path = Path(path)
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return path


def csv_text(document: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for rec in document["findings"]:
        code, meaning = _primary_code(rec.get("codes"))
        row = {k: rec.get(k) for k in CSV_COLUMNS if k in rec}
        row = {k: ("" if v is None else v) for k, v in row.items()}
        row["snomed_code"] = code
        row["snomed_meaning"] = meaning
        row["research_use_only"] = "true"
        w.writerow(row)
    return buf.getvalue()


def write_csv(path: str | Path, document: dict) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(csv_text(document))
    return path
