"""ctlanguage.metrics: the one Dice, AUC, ROC curve and ECE, against hand-computed values and
scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctlanguage import metrics as M


def test_auc_known_values():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5       # ties count half
    assert M.roc_auc([0, 0, 1], [0.1, 0.4, 0.35]) == 0.5
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))          # one class: undefined
    with pytest.raises(ValueError):
        M.roc_auc([0, 1], [0.5])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=40))
def test_auc_and_roc_curve_match_sklearn(rows):
    from sklearn.metrics import roc_auc_score, roc_curve

    y = [int(a) for a, _ in rows]
    s = [round(b, 2) for _, b in rows]   # force ties
    fpr, tpr = M.roc_curve(y, s)
    if len(set(y)) < 2:
        assert math.isnan(M.roc_auc(y, s)) and fpr.size == 0
        return
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, s))
    f_ref, t_ref, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f_ref)
    np.testing.assert_allclose(tpr, t_ref)


def test_dice_and_the_empty_rule():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), bool)
    assert math.isnan(M.dice(a, b))                 # both empty: undefined, left out of means
    a[0, 0, :2] = 1
    b[0, 0, 1:3] = True
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.dice(a, a) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0       # one empty: a miss
    with pytest.raises(ValueError):
        M.dice(a, np.zeros((4, 4, 5)))
    assert M.nanmean([0.5, float("nan"), None, 1.0]) == pytest.approx(0.75)
    assert math.isnan(M.nanmean([float("nan")]))


def test_ece_known_values_and_bins():
    p = [0.25] * 4 + [0.75] * 4                      # perfectly calibrated within bins
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    assert M.expected_calibration_error(p, y) == pytest.approx(0.0)
    assert M.expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)
    assert M.expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)   # last bin
    assert M.expected_calibration_error([0.05, 0.05, 0.95, 0.95], [0, 1, 1, 1]) == pytest.approx(
        0.5 * abs(0.5 - 0.05) + 0.5 * abs(1 - 0.95))
    # a bin edge belongs to the bin above it: 0.3 -> [0.3, 0.4)
    rows = M.reliability_table([0.3, 0.05, 0.95], [1, 0, 1])
    assert len(rows) == 10 and rows[3]["n"] == 1 and rows[2]["n"] == 0
    assert rows[0]["n"] == 1 and rows[-1]["n"] == 1 and rows[5]["mean_probability"] is None
    assert math.isnan(M.expected_calibration_error([], []))
