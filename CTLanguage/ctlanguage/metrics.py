"""The project's one Dice, AUC and ECE (evaluation, training, calibration, demo and benchmarks).

Rules, each in one place:

* ``dice`` of two empty masks is NaN (undefined, not perfect): ``nanmean`` leaves it out of
  every mean, so a structure absent from both prediction and truth neither helps nor hurts.
* ``roc_auc`` is the Mann-Whitney statistic with mid-ranks for ties; NaN with only one class.
* ``expected_calibration_error`` uses ``n_bins`` equal-width bins, bin ``floor(p * n_bins)``
  (p = 1.0 goes to the last bin), weighted by each bin's share of the samples.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape (NaN when both are empty)."""
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & t)) / total


def _pairs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError("labels and scores must have the same length")
    return y, s


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (mid-ranks for ties); NaN when only one class is present."""
    y, s = _pairs(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = float(rankdata(s)[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1), one point per distinct
    score; the trapezoid area under it equals ``roc_auc``. Empty arrays with only one class."""
    y, s = _pairs(labels, scores)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]   # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)


def expected_calibration_error(probs: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> float:
    """Sum over bins of |observed frequency - mean probability| x the bin's share (NaN if empty)."""
    y, p = _pairs(labels, probs)
    if p.size == 0:
        return float("nan")
    idx = _bins(p, n_bins)
    ece = 0.0
    for b in np.unique(idx):
        sel = idx == b
        ece += sel.mean() * abs(float(y[sel].mean()) - float(p[sel].mean()))
    return float(ece)


def reliability_table(probs: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> list[dict]:
    """Per bin of ``expected_calibration_error``: count, mean probability, observed frequency."""
    y, p = _pairs(labels, probs)
    idx = _bins(p, n_bins)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        nb = int(sel.sum())
        rows.append({
            "bin": f"[{b / n_bins:.1f}, {(b + 1) / n_bins:.1f}{']' if b == n_bins - 1 else ')'}",
            "n": nb,
            "mean_probability": float(p[sel].mean()) if nb else None,
            "observed_frequency": float(y[sel].mean()) if nb else None,
        })
    return rows


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the values that are neither None nor NaN (NaN when none is left)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")
