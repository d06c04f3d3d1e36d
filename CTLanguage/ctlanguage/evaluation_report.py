"""Evaluation results as files: one model's metrics or a comparison of several as Markdown
tables, metrics.json / metrics.md / metrics.html with figures (``write_results``). The numbers
come from ``evaluation.evaluate_model``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .evaluation import json_safe


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}"


def _size_note(m: dict) -> str:
    f = m.get("size_filter")
    if not f:
        return ""
    return (f", for structures of at least {f['min_structure_ml']:g} ml and findings of at least "
            f"{f['min_finding_ml']:g} ml in a case ({f['skipped']['structures']} structures and "
            f"{f['skipped']['findings']} findings below that left out)")


def metrics_markdown(m: dict, title: Optional[str] = None, figures: Optional[dict] = None) -> str:
    """One model's metrics as Markdown tables; ``figures`` {kind: link} adds the pictures."""
    model = m.get("model", {})
    lines = [f"# {title or 'Evaluation: ' + str(model.get('id'))}", ""]
    lines += [
        f"Model `{model.get('id')}` {model.get('version', '')} (weights sha256 "
        f"`{str(model.get('sha256'))[:12]}…`, presence from {model.get('presence_source') or 'its'} "
        f"embeddings, {model.get('calibration') or 'uncalibrated'}); "
        f"data `{m['data']['manifest']}` ({m['data']['n_cases']} cases); mask threshold "
        f"{m.get('mask_threshold')}. Dice is computed on the source voxel grid{_size_note(m)}.", "",
        "| metric | value |", "|---|---|",
        f"| mean structure Dice | {fmt(m.get('mean_structure_dice'))} |",
        f"| mean finding Dice | {fmt(m.get('mean_finding_dice'))} |",
        f"| mean finding AUC | {fmt(m.get('mean_finding_auc'))} |",
        f"| ECE (10 bins, {m.get('n_presence_pairs')} case x finding pairs) | {fmt(m.get('ece'))} |",
        f"| paraphrase mean AUC | {fmt(m['paraphrases'].get('mean_auc'))} |",
        f"| canonical mean AUC, same items | {fmt(m['paraphrases'].get('mean_auc_canonical'))} |",
        f"| paraphrase AUC drop (system: parser + model) | {fmt(m['paraphrases'].get('auc_drop'))} |",
        f"| paraphrase AUC drop (model level: paraphrase as the positive phrasing) | "
        f"{fmt(m['paraphrases'].get('model_level', {}).get('auc_drop'))} |",
        f"| paraphrase parser accuracy | {fmt(m['paraphrases'].get('parser_accuracy'))} |",
        f"| paraphrases without an answer (of {m['paraphrases'].get('n_items_scored')}) | "
        f"{fmt(m['paraphrases'].get('n_unanswered'))} |",
        f"| paraphrase anatomy Dice (canonical) | {fmt(m['paraphrases'].get('anatomy_dice'))} "
        f"({fmt(m['paraphrases'].get('anatomy_dice_canonical'))}) |",
        f"| encode time per case (s) | {fmt(m['timing'].get('encode_mean_s'), 2)} |",
        f"| query time per prompt with mask (ms) | {fmt(m['timing'].get('query_mean_ms'), 1)} |",
        "",
    ]
    if figures:
        names = {"roc": "ROC curves per finding", "reliability": "Reliability diagram",
                 "dice": "Dice per structure"}
        lines += ["## Figures", ""] + [f"![{names[k]}]({v})" for k, v in figures.items()] + [""]
    lines += [
        "## Findings", "",
        "| finding | AUC | positives | negatives | Dice | cases with mask |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in m.get("findings", {}).items():
        lines.append(f"| {k} | {fmt(v.get('auc'))} | {v.get('n_pos')} | {v.get('n_neg')} | "
                     f"{fmt(v.get('dice'))} | {v.get('n_dice')} |")
    lines += ["", "## Structures", "", "| structure | Dice | cases |", "|---|---|---|"]
    for k, v in m.get("structures", {}).items():
        lines.append(f"| {k} | {fmt(v.get('dice'))} | {v.get('n')} |")
    para = m.get("paraphrases", {})
    if para.get("per_finding"):
        lines += ["", "## Held-out paraphrases", "",
                  "| finding | paraphrase AUC | canonical AUC (same items) | positives | negatives |",
                  "|---|---|---|---|---|"]
        for k, v in para["per_finding"].items():
            lines.append(f"| {k} | {fmt(v.get('auc'))} | {fmt(v.get('auc_canonical'))} | "
                         f"{v.get('n_pos')} | {v.get('n_neg')} |")
    if m.get("reliability"):
        lines += ["", "## Reliability (calibration)", "",
                  "| bin | n | mean probability | observed frequency |", "|---|---|---|---|"]
        for r in m["reliability"]:
            lines.append(f"| {r['bin']} | {r['n']} | {fmt(r['mean_probability'])} | "
                         f"{fmt(r['observed_frequency'])} |")
    return "\n".join(lines) + "\n"


COMPARISON_COLUMNS = [
    ("mean structure Dice", lambda m: m.get("mean_structure_dice")),
    ("mean finding Dice", lambda m: m.get("mean_finding_dice")),
    ("mean finding AUC", lambda m: m.get("mean_finding_auc")),
    ("ECE", lambda m: m.get("ece")),
    ("paraphrase AUC", lambda m: m.get("paraphrases", {}).get("mean_auc")),
    ("paraphrase AUC drop", lambda m: m.get("paraphrases", {}).get("auc_drop")),
    ("paraphrase AUC drop (model level)",
     lambda m: m.get("paraphrases", {}).get("model_level", {}).get("auc_drop")),
]


def comparison_rows(results: dict) -> list[dict]:
    rows = []
    for label, m in results.items():
        row = {"model": label, "id": m["model"].get("id"),
               "presence_source": m["model"].get("presence_source"),
               "n_cases": m["data"]["n_cases"]}
        for name, fn in COMPARISON_COLUMNS:
            row[name] = fn(m)
        rows.append(row)
    return rows


def comparison_markdown(results: dict, title: str = "Model comparison") -> str:
    """Several evaluated models (``{label: metrics}``) in one table, plus per-finding AUCs."""
    rows = comparison_rows(results)
    first = next(iter(results.values()))
    lines = [f"# {title}", "",
             f"Data: `{first['data']['manifest']}` ({first['data']['n_cases']} cases). Produced by "
             "`ctlanguage evaluate` (one engine path for every model: masks mapped to the source grid, "
             "presence from the calibrated prompt-ensemble score).", "",
             "| model | presence from | " + " | ".join(n for n, _ in COMPARISON_COLUMNS) + " |",
             "|---|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['presence_source']} | "
                     + " | ".join(fmt(r[n]) for n, _ in COMPARISON_COLUMNS) + " |")
    labels = list(results)
    if len(labels) > 1:
        base = labels[0]
        lines += ["", f"AUC gap of each model relative to `{base}` (positive: `{base}` is better): "
                  + ", ".join(
                      f"`{l}` {fmt((results[base].get('mean_finding_auc') or float('nan')) - (results[l].get('mean_finding_auc') or float('nan')))}"
                      for l in labels[1:]) + "."]
    keys = sorted({k for m in results.values() for k in m.get("findings", {})})
    lines += ["", "## AUC per finding", "", "| finding | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(
            fmt(results[l].get("findings", {}).get(k, {}).get("auc")) for l in labels) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path, doc: str | Path | None = None) -> dict:
    """Write metrics.json, metrics.md and metrics.html (tables and pictures: figures/*.png) into
    ``out_dir``; with several models one comparison table comes first, then each model's details.
    With ``doc`` also write the tables (no pictures) there (e.g. docs/model_comparison.md).

    Written atomically (temporary file + rename). Returns {name: path}."""
    import base64

    from markdown_it import MarkdownIt

    from . import evaluation_figures as FIG
    from .exports import slugify
    from .exports.atomic import check_writable_dir
    from .io import atomic_write

    out = Path(out_dir)
    check_writable_dir(out)
    files = {}

    def put(path: Path, text: str):
        files[path.name] = atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    single = len(results) == 1
    figures = {label: FIG.write_figures(m, out / "figures", prefix="" if single else f"{slugify(label)}-")
               for label, m in results.items()}
    for made in figures.values():
        files.update({f"figures/{p.name}": p for p in made.values()})

    def document(links) -> str:
        if single:
            (label, m), = results.items()
            return metrics_markdown(m, figures=links(label))
        md = comparison_markdown(results)
        for label, m in results.items():
            md += "\n---\n\n" + metrics_markdown(m, title=f"Details: {label}", figures=links(label)
                                                  ).replace("\n## ", "\n### ")
        return md

    def relative(label):
        return {k: p.relative_to(out).as_posix() for k, p in figures[label].items()}

    def inline(label):   # metrics.html is one self-contained file
        return {k: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
                for k, p in figures[label].items()}

    payload = next(iter(results.values())) if single else \
        json_safe({"models": results, "comparison": comparison_rows(results)})
    put(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    put(out / "metrics.md", document(relative))
    body = MarkdownIt("commonmark").enable("table").render(document(inline))
    put(out / "metrics.html", "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>CTLanguage "
        "evaluation</title><style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}</style></head><body>\n" + body + "</body></html>\n")
    if doc:
        doc = Path(doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        put(doc, document(lambda label: None))
        files["doc"] = doc
    return files
