"""Pictures of an evaluation (``ctlanguage evaluate``): ROC curves per finding, a reliability
diagram and Dice per structure, as PNG files (matplotlib, Agg backend; ``pip install
ctlanguage[eval]``).

Every number drawn comes from ``ctlanguage.metrics`` on the evaluation's own (probability, label)
pairs and Dice table, and each PNG carries those numbers as JSON in its ``ctlanguage-data`` text
chunk, so a test (or a reader) can check a picture against the tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import metrics as M

DATA_KEY = "ctlanguage-data"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def figure_data(m: dict) -> dict:
    """The numbers each picture shows, from one model's metrics dict: {"roc", "reliability", "dice"}
    (a picture without data is left out)."""
    out = {}
    roc = {}
    for f, pairs in sorted((m.get("presence_pairs") or {}).items()):
        fpr, tpr = M.roc_curve(pairs["y"], pairs["p"])
        if fpr.size:
            roc[f] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": M.roc_auc(pairs["y"], pairs["p"])}
    if roc:
        out["roc"] = roc
    rel = [r for r in m.get("reliability") or [] if r["n"]]
    if rel:
        out["reliability"] = {"bins": rel, "ece": m.get("ece")}
    dice = {k: v["dice"] for k, v in sorted((m.get("structures") or {}).items())
            if v.get("dice") is not None and not math.isnan(v["dice"])}
    if dice:
        out["dice"] = dice
    return out


def write_figures(m: dict, folder: str | Path, prefix: str = "") -> dict:
    """PNG files ``<prefix>roc.png``, ``<prefix>reliability.png``, ``<prefix>dice.png`` in
    ``folder`` (atomic writes); returns {kind: path}. Nothing when matplotlib is missing."""
    if not available():
        import logging

        logging.getLogger(__name__).warning(
            "matplotlib is not installed: the evaluation has tables but no pictures "
            "(pip install 'ctlanguage[eval]')")
        return {}
    from matplotlib.figure import Figure    # no pyplot: no global backend or window state

    from .io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = str((m.get("model") or {}).get("id") or "")
    files = {}
    for kind, data in figure_data(m).items():
        fig = Figure(figsize=(6.4, 4.8) if kind != "dice" else (7.0, 0.3 * len(data) + 1.2), dpi=100)
        ax = fig.add_subplot()
        _DRAW[kind](ax, data)
        ax.set_title(f"{_TITLES[kind]} — {title}" if title else _TITLES[kind], fontsize=10)
        fig.tight_layout()
        meta = {DATA_KEY: json.dumps(data, allow_nan=False, default=_finite)}
        path = folder / f"{prefix}{kind}.png"
        files[kind] = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata=meta),
                                   suffix=".png")
    return files


def _finite(x):
    raise TypeError(f"not JSON: {x!r}")


def _roc(ax, data):
    for f, d in data.items():
        ax.plot(d["fpr"], d["tpr"], drawstyle="default", linewidth=1.2,
                label=f"{f.replace('_', ' ')} ({d['auc']:.2f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=6, loc="lower right", ncol=2 if len(data) > 10 else 1, title="finding (AUC)",
              title_fontsize=6)


def _reliability(ax, data):
    bins = data["bins"]
    p = np.array([b["mean_probability"] for b in bins])
    y = np.array([b["observed_frequency"] for b in bins])
    n = np.array([b["n"] for b in bins])
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    ax.scatter(p, y, s=20 + 200 * n / n.max(), zorder=3, label="bin (size = cases)")
    ax.plot(p, y, linewidth=1)
    ece = data.get("ece")
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left", title=f"ECE {ece:.3f}" if ece is not None else None,
              title_fontsize=7)


def _dice(ax, data):
    names = list(data)
    ax.barh(range(len(names)), [data[k] for k in names], color="#4a7ab7")
    ax.set_yticks(range(len(names)), [k.replace("_", " ") for k in names], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="Dice (source grid)")


_DRAW = {"roc": _roc, "reliability": _reliability, "dice": _dice}
_TITLES = {"roc": "ROC per finding", "reliability": "Reliability", "dice": "Dice per structure"}
