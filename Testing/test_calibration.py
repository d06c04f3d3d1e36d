"""Site calibration (ctlanguage/calibration.py, `ctlanguage calibrate`): a deliberately
mis-scaled score is brought below ECE 0.05, on the fitted cohort and on a held-out split; the
file lands beside a writable model, else in the user cache; bad input is one clean error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctlanguage import calibration as C
from ctlanguage import metrics as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # Testing/conftest.py


def _cohort(rng, n, findings):
    """{finding: (mis-scaled raw score, label)} from a known logistic truth: z = 6 t - 2."""
    out = {}
    for f, (base, spread) in findings.items():
        t = base + spread * rng.normal(size=n)
        y = (rng.random(n) < 1 / (1 + np.exp(-t))).astype(int)
        out[f] = (6.0 * t - 2.0, y)
    return out


FINDINGS = {"ascites": (-1.5, 1.5), "pleural_effusion": (-0.5, 2.0), "liver_lesion": (-2.5, 1.0),
            "gallstone": (-6.0, 0.5)}          # the last has a handful of positives: shared fit


def test_fit_on_one_split_holds_on_another():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    fit_split, held_out = _cohort(rng, 800, FINDINGS), _cohort(rng, 800, FINDINGS)
    params = C.fit(fit_split)
    cal = C.as_calibration(params)
    as_probability = np.concatenate([C.sigmoid(z) for z, _ in held_out.values()])
    labels = np.concatenate([y for _, y in held_out.values()])
    assert M.expected_calibration_error(as_probability, labels) > 0.1   # the mis-scaled score
    assert C.ece(cal, fit_split) < 0.05
    assert C.ece(cal, held_out) < 0.05
    for f in ("ascites", "pleural_effusion", "liver_lesion"):
        pf = params["per_finding"][f]
        assert pf["fit"] == "own"
        assert pf["temperature"] == pytest.approx(6.0, rel=0.2)  # z / 6 + 2/6 recovers t
        assert pf["offset"] == pytest.approx(2.0 / 6.0, abs=0.35)
        z, y = fit_split[f]                                      # the exact maximum likelihood
        ref = LogisticRegression(C=1e9, max_iter=5000).fit(z[:, None], y)
        assert pf["temperature"] == pytest.approx(1 / ref.coef_[0, 0], rel=1e-3)
        assert pf["offset"] == pytest.approx(ref.intercept_[0], abs=1e-2)
        assert pf["auc"] == pytest.approx(M.roc_auc(fit_split[f][1], fit_split[f][0]))
    rare = params["per_finding"]["gallstone"]
    assert rare["n_pos"] < C.MIN_PER_CLASS and rare["fit"] == "shared"
    assert (rare["temperature"], rare["offset"]) == (params["temperature"], params["offsets"]["_default"])
    assert params["offsets"] == {**{f: v["offset"] for f, v in params["per_finding"].items()},
                                 "_default": params["offsets"]["_default"]}
    # the engine's scoring applies exactly these numbers
    assert cal.probability(1.5, "ascites") == pytest.approx(
        float(C.sigmoid(1.5 / params["per_finding"]["ascites"]["temperature"]
                        + params["per_finding"]["ascites"]["offset"])))


def test_a_score_that_ranks_backwards_gets_no_trust():
    z = np.linspace(-3, 3, 200)
    y = (z < 0).astype(int)
    t, _ = C.fit_temperature_offset(z, y)
    assert t >= 999.0                                            # slope clamped at its floor


# ------------------------------------------------------------------------------ CLI on phantoms
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Two disjoint phantom cohorts (fit, held out)."""
    from ctlanguage.phantom.corpus import write_corpus

    root = tmp_path_factory.mktemp("phantoms")
    write_corpus(str(root / "site_a"), 12, seed=8100, spacing=3.0, montage=False)
    write_corpus(str(root / "site_b"), 12, seed=8200, spacing=3.0, montage=False)
    return root / "site_a" / "manifest.jsonl", root / "site_b" / "manifest.jsonl"


def _mis_scaled(monkeypatch, factor=40.0):
    real = C.raw_presence_scores
    monkeypatch.setattr(C, "raw_presence_scores",
                        lambda engine, enc, fs: {f: factor * z + 3.0 for f, z in real(engine, enc, fs).items()})


@pytest.mark.slow
def test_calibrate_cli_on_phantoms_writes_beside_the_model(phantoms, random_model, monkeypatch, capsys):
    from ctlanguage.cli import main
    from ctlanguage.engine import Engine
    from ctlanguage.engine.scoring import Calibration

    fit_m, held_m = phantoms
    _mis_scaled(monkeypatch)
    assert main(["calibrate", "--model", str(random_model), "--data", str(fit_m)]) == 0
    doc = json.loads((random_model / "calibration.json").read_text())
    assert doc["format"] == "ctlanguage-calibration/1" and doc["model_id"] == "random-tiny"
    assert doc["name"] == "site_a" and doc["n"] == 12 and doc["date"][:2] == "20"
    assert len(doc["model_sha256"]) == 64
    assert doc["ece_before"] > 0.2 and doc["ece_after"] < 0.05
    assert set(doc["offsets"]) == set(doc["per_finding"]) | {"_default"} and len(doc["per_finding"]) >= 10
    # held out: the same scores on other phantoms; a fresh engine now finds the file beside the
    # model and says so, and its scoring gives the calibrated probabilities
    site = Calibration.from_file(random_model / "calibration.json")
    (random_model / "calibration.json").rename(random_model / "kept.json")
    try:
        uncalibrated = Engine.load(str(random_model), device="cpu")
        pairs, _ = C.collect_scores(uncalibrated, held_m)
        before = C.ece(C.active_calibration(uncalibrated), pairs)
    finally:
        (random_model / "kept.json").rename(random_model / "calibration.json")
    engine = Engine.load(str(random_model), device="cpu")
    assert engine.describe()["calibration"] == "calibrated on site_a, n=12"
    assert C.active_calibration(engine) == site
    pairs_after, n = C.collect_scores(engine, held_m)      # raw scores do not depend on calibration
    assert n == 12 and all(np.allclose(pairs[f][0], pairs_after[f][0], atol=1e-6) for f in pairs)
    held_out_ece = C.ece(site, pairs)
    print(f"phantoms: ECE fit cohort {doc['ece_before']:.3f} -> {doc['ece_after']:.3f}, held out "
          f"{before:.3f} -> {held_out_ece:.3f}")
    assert before > 0.2 and held_out_ece < 0.05


def test_cache_file_is_per_model_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CTLANGUAGE_CACHE", raising=False)
    expected = tmp_path / "xdg" / "ctlanguage" / "calibration" / f"m-{'ab' * 6}.json"
    assert C.target_file(None, "m", "ab" * 32) == expected
    assert C.target_file(tmp_path, "m", "ab" * 32) == tmp_path / "calibration.json"


@pytest.mark.slow
def test_embedded_model_goes_to_the_user_cache(phantoms, random_model, tmp_path, monkeypatch):
    """A model inside the resources folder (embedded) is never written into: its calibration
    goes to the user cache. A read-only model folder takes the same path (target_file)."""
    import shutil

    from ctlanguage.cli import main

    embedded = tmp_path / "res" / "Models" / "random-tiny"
    shutil.copytree(random_model, embedded, ignore=shutil.ignore_patterns("calibration.json"))
    monkeypatch.setenv("CTLANGUAGE_RESOURCES", str(tmp_path / "res"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CTLANGUAGE_CACHE", raising=False)
    before = sorted(p.name for p in embedded.iterdir())
    assert main(["--quiet", "calibrate", "--model", str(embedded), "--data", str(phantoms[0]),
                 "--name", "Site A"]) == 0
    assert sorted(p.name for p in embedded.iterdir()) == before
    (written,) = (tmp_path / "xdg" / "ctlanguage" / "calibration").iterdir()
    assert written.name.startswith("random-tiny-") and json.loads(written.read_text())["name"] == "Site A"
    if os.geteuid() != 0:            # root writes anywhere: the read-only check needs a user
        random_model.chmod(0o555)
        try:
            assert C.target_file(random_model, "m", "ab" * 32).parent.name == "calibration"
        finally:
            random_model.chmod(0o755)


def test_bad_manifest_is_one_clean_error_and_writes_nothing(tmp_path, random_model, capsys):
    from ctlanguage.cli import main

    bad = tmp_path / "manifest.jsonl"
    bad.write_text('{"image": "x.nii.gz"}\nnot json\n')
    before = sorted(p.name for p in random_model.iterdir())
    assert main(["calibrate", "--model", str(random_model), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Line 2" in err[0]
    unlabelled = tmp_path / "u" / "manifest.jsonl"
    unlabelled.parent.mkdir()
    unlabelled.write_text('{"image": "x.nii.gz"}\n')
    assert main(["calibrate", "--model", str(random_model), "--data", str(unlabelled)]) == 2
    assert "no case" in capsys.readouterr().err.lower()
    assert sorted(p.name for p in random_model.iterdir()) == before
