"""The real TotalSegmentator 2.18.0 ``totalsegmentator()`` end to end through the engine, offline,
against a weights folder made at test time (tiny random-weight nnU-Net, Testing/_totalseg_weights.py).

Its labels are arbitrary, but TotalSegmentator reorients every input to the same canonical
array before its network runs, so the same voxels stored in another axis order / direction must
come back with the same label at every physical voxel: that checks the whole orientation round
trip (our NIfTI writing, its reorientation and resampling, our mapping back) with its own code."""

import json

import numpy as np
import pytest

pytest.importorskip("totalsegmentator")
pytest.importorskip("nnunetv2")

from _totalseg_weights import make_weights  # noqa: E402
from test_totalseg_geometry import _reorient  # noqa: E402

from ctlanguage import vocabulary as V  # noqa: E402
from ctlanguage.engine import Engine  # noqa: E402
from ctlanguage.engine.encoding import Encoding  # noqa: E402
from ctlanguage.volume import CTVolume  # noqa: E402

pytestmark = pytest.mark.slow


def _phantom():
    """A small body-like CT (soft-tissue ellipsoid with a dense rod in air), LPS-stored with
    anisotropic voxels, as DICOM-derived volumes are."""
    k, j, i = np.mgrid[0:18, 0:26, 0:30].astype(np.float32)
    body = ((i - 14.5) / 12) ** 2 + ((j - 12.5) / 10) ** 2 < 1.0
    rod = ((i - 14.5) / 2.5) ** 2 + ((j - 18.0) / 2.5) ** 2 < 1.0
    hu = np.where(body, 40.0, -1000.0) + np.where(rod, 660.0, 0.0)
    hu += np.random.default_rng(3).normal(0, 15, hu.shape).round()
    aff = np.diag([-1.4, -1.7, 4.0, 1.0])
    aff[:3, 3] = [30.0, 25.0, -80.0]
    return CTVolume(hu.astype(np.float32), aff, source="phantom")


def test_real_totalsegmentator_labels_land_on_the_source_voxels(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from ctlanguage.cli import main as cli
    from ctlanguage.io import write_volume
    from ctlanguage.volume import sitk_ijk_to_ras

    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(make_weights(tmp_path / "weights", (297,))))
    monkeypatch.setenv("CTLANGUAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CTLANGUAGE_ALLOW_DOWNLOADS", raising=False)
    engine = Engine.load("totalseg", device="cpu")
    assert engine.model_id == "totalseg"

    # volume A through the engine
    a = _phantom()
    fractions = []
    enc_a = engine.encode(a, progress=lambda f, m: fractions.append(f))
    la = enc_a.parts["totalseg"].labels
    assert la.shape == a.shape and la.dtype == np.uint8
    assert len(np.unique(la)) > 2                     # the random network does label voxels
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)

    # later prompts are lookups in the stored label map, exactly on the source grid
    ts = V.totalseg_classes()
    counts = {n: int((la == ts[n]).sum()) for n in ts}
    present = sorted((n for n in counts if counts[n]), key=lambda n: -counts[n])[:3]
    f = engine.query_one(enc_a, V.get(present[0]).display)
    assert f.mask_model == "totalseg" and f.mask.shape == a.shape
    assert np.array_equal(f.mask.astype(bool), la == ts[present[0]])
    assert f.timings["total"] < 0.5
    lobes = [ts[n] for n in V.components("lung_left") + V.components("lung_right")]
    lungs = engine.query_one(enc_a, "lungs")
    assert np.array_equal(lungs.mask.astype(bool), np.isin(la, lobes))

    # the label map is saved with the encoding
    path = enc_a.save(tmp_path / "a.ctenc")
    again = Encoding.load(path, engine, a)
    assert np.array_equal(again.parts["totalseg"].labels, la)

    # the same voxels stored in another axis order with two flips, through the CLI: every
    # export is written and each mask lies on that file's grid with A's labels at every voxel
    perm, flip = (1, 2, 0), (True, False, True)
    b_arr, b_aff = _reorient(a.array, a.ijk_to_ras, perm, flip)
    b_path = write_volume(CTVolume(b_arr, b_aff), tmp_path / "b.nii.gz")
    prompts = [V.get(n).display for n in present] + ["lungs"]
    out = tmp_path / "out"
    assert cli(["query", str(b_path), "--model", "totalseg", "--device", "cpu",
                "--prompt", "; ".join(prompts), "--out", str(out)]) == 0
    findings = json.loads((out / "findings.json").read_text())["findings"]
    assert [x["mask_model"] for x in findings] == ["totalseg"] * 4
    assert (out / "findings.csv").is_file() and (out / "report.html").is_file()
    assert (out / "segmentation.seg.nrrd").is_file()
    for x, want in zip(findings, [[ts[n]] for n in present] + [lobes]):
        img = sitk.ReadImage(str(out / x["mask"]))
        assert np.allclose(sitk_ijk_to_ras(img), b_aff, atol=1e-4)
        expected, _ = _reorient(np.isin(la, want).astype(np.uint8), a.ijk_to_ras, perm, flip)
        got = sitk.GetArrayFromImage(img)
        assert got.shape == expected.shape
        assert np.array_equal(got, expected), f"{x['prompt']}: {np.mean(got != expected):.1%} differ"

    cfg = json.loads((tmp_path / "cache" / "totalsegmentator" / "config.json").read_text())
    assert cfg["send_usage_stats"] is False
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        "Dataset297_TotalSegmentator_total_3mm_1559subj"]          # nothing downloaded
