"""Cohorts (ctlanguage.cohort, `ctlanguage batch`): shards, run folders that never silently
replace earlier results, summaries of interrupted runs, and Ray / 2-shard runs that give the same
per-case results as one process (embedded model, 4 phantoms)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ctlanguage import cohort
from ctlanguage.cli import main
from ctlanguage.errors import InputError


def _cases(n):
    return [cohort.Case(f"c{i}", Path(f"/x/c{i}.nii.gz")) for i in range(n)]


def test_shards_are_disjoint_and_complete():
    cases = _cases(11)
    parts = [cohort.select_shard(cases, cohort.parse_shard(f"{i}/3")) for i in range(3)]
    ids = [c.case_id for p in parts for c in p]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
    for bad in ("3/3", "-1/2", "a/b", "1", "0/0"):
        with pytest.raises(InputError):
            cohort.parse_shard(bad)


def test_a_folder_holding_another_run_is_refused_unless_forced(tmp_path):
    a = cohort.RunSpec("m", "0" * 64, ("liver",), 0.5)
    cohort.prepare_run(tmp_path, a)
    cohort.prepare_run(tmp_path, a)                       # the same run: resume
    b = cohort.RunSpec("m", "0" * 64, ("liver", "spleen"), 0.5)
    with pytest.raises(InputError, match="prompts"):
        cohort.prepare_run(tmp_path, b)
    with pytest.raises(InputError, match="mask_threshold"):
        cohort.prepare_run(tmp_path, cohort.RunSpec("m", "0" * 64, ("liver",), 0.3))
    cohort.prepare_run(tmp_path, b, force=True)
    assert json.loads((tmp_path / "run.json").read_text())["spec"]["prompts"] == ["liver", "spleen"]


# ------------------------------------------------------------------------- CLI, stand-in model
@pytest.fixture
def fake(monkeypatch, tmp_path):
    import _fake_engine

    _fake_engine.install(monkeypatch)
    return _fake_engine.make_fake_model_dir(tmp_path / "fake-model")


@pytest.fixture
def folder(tmp_path):
    from _export_helpers import synthetic_volume
    from ctlanguage.io import write_volume

    d = tmp_path / "cohort"
    d.mkdir()
    for i in range(4):
        write_volume(synthetic_volume((12, 20, 24)), d / f"case{i}.nii.gz")
    return d


def _summary(out, name="summary"):
    with open(out / f"{name}.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_interrupted_batch_writes_the_summary_of_what_finished(monkeypatch, fake, folder, tmp_path,
                                                              capsys):
    real = cohort.run_case
    calls = []

    def run_case(engine, case, out, spec):
        calls.append(case.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(engine, case, out, spec)

    monkeypatch.setattr(cohort, "run_case", run_case)
    out = tmp_path / "out"
    code = main(["--quiet", "batch", str(folder), "-p", "liver", "--out", str(out), "--model", str(fake)])
    assert code == 130
    assert [r["case_id"] for r in _summary(out)] == ["case0", "case1"]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["complete"] is False and doc["counts"]["not_run"] == 2 and "resume" in doc
    assert doc["spec"]["prompts"] == ["liver"]
    assert "resume" in capsys.readouterr().err
    monkeypatch.setattr(cohort, "run_case", real)
    assert main(["--quiet", "batch", str(folder), "-p", "liver", "--out", str(out), "--model", str(fake)]) == 0
    rows = _summary(out)
    assert [r["status"] for r in rows] == ["skipped", "skipped", "ok", "ok"]
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_changed_prompts_never_replace_earlier_results(fake, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quiet", "batch", str(folder), "-p", "liver", "--out", str(out), "--model", str(fake)]) == 0
    before = (out / "case0" / "findings.json").read_text()
    code = main(["--quiet", "batch", str(folder), "-p", "spleen", "--out", str(out), "--model", str(fake)])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (out / "case0" / "findings.json").read_text() == before
    assert main(["--quiet", "batch", str(folder), "-p", "spleen", "--out", str(out), "--model", str(fake),
                 "--force"]) == 0
    assert json.loads((out / "case0" / "findings.json").read_text())["requested_prompts"] == ["spleen"]


def test_shards_then_merge_equal_one_run(fake, folder, tmp_path):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert main(["--quiet", "batch", str(folder), "-p", "liver; left pleural effusion", "--out", str(one),
                 "--model", str(fake)]) == 0
    for i in range(2):
        assert main(["--quiet", "batch", str(folder), "-p", "liver; left pleural effusion", "--out",
                     str(sharded), "--model", str(fake), "--shard", f"{i}/2"]) == 0
    assert not (sharded / "summary.csv").exists()
    assert main(["--quiet", "batch", "merge", str(sharded)]) == 0
    a, b = _summary(one), _summary(sharded)
    keys = [k for k in a[0] if k.startswith(("p:", "ml:"))]
    assert keys and [r["case_id"] for r in a] == [r["case_id"] for r in b]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}


# ------------------------------------------------------------------- embedded model: Ray vs one
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from ctlanguage.phantom.corpus import write_corpus

    d = tmp_path_factory.mktemp("phantoms")
    write_corpus(str(d), 4, seed=9300, spacing=[4.0, 4.0, 5.0], montage=False)
    return d / "manifest.jsonl"


@pytest.mark.slow
def test_ray_local_cluster_gives_the_same_results_as_one_process(phantoms, tmp_path):
    pytest.importorskip("ray")
    prompts = ["liver", "left pleural effusion", "enlarged heart"]
    one, ray_out = tmp_path / "one", tmp_path / "ray"
    args = ["--quiet", "batch", str(phantoms), "--device", "cpu"] + [a for p in prompts for a in ("-p", p)]
    assert main(args + ["--out", str(one)]) == 0
    assert main(args + ["--out", str(ray_out), "--ray", "--workers", "2"]) == 0
    a, b = _summary(one), _summary(ray_out)
    assert [r["status"] for r in b] == ["ok"] * 4
    keys = [k for k in a[0] if k.startswith(("p:", "ml:"))]
    assert len(keys) == 2 * len(prompts)
    for x, y in zip(a, b):
        assert x["case_id"] == y["case_id"]
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}


def test_absent_masks_is_part_of_the_run_and_draws_the_masks(fake, folder, tmp_path, capsys):
    """--absent-masks: findings judged absent keep their masks; a run made without it is another
    run (never silently replaced), and run.json files written before the option existed resume."""
    out = tmp_path / "out"
    prompt = ["-p", "left pleural effusion"]   # the stand-in scores it 0.21, below its 0.5 rule
    assert main(["--quiet", "batch", str(folder), *prompt, "--out", str(out), "--model", str(fake)]) == 0
    (f,) = json.loads((out / "case0" / "findings.json").read_text())["findings"]
    assert f["mask_suppressed"] and f["volume_ml"] == 0
    assert main(["--quiet", "batch", str(folder), *prompt, "--out", str(out), "--model", str(fake),
                 "--absent-masks"]) == 2 and "absent_masks" in capsys.readouterr().err
    out2 = tmp_path / "out2"
    assert main(["--quiet", "batch", str(folder), *prompt, "--out", str(out2), "--model", str(fake),
                 "--absent-masks"]) == 0
    doc = json.loads((out2 / "case0" / "findings.json").read_text())
    (g,) = doc["findings"]
    assert doc["absent_masks"] is True and not g["mask_suppressed"] and g["volume_ml"] > 0
    run = json.loads((out / "run.json").read_text())
    del run["spec"]["absent_masks"]                        # as written before the option existed
    (out / "run.json").write_text(json.dumps(run))
    assert main(["--quiet", "batch", str(folder), *prompt, "--out", str(out), "--model", str(fake)]) == 0
