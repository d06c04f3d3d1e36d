"""Scan-to-scan variation of the phantom (ctlanguage.phantom.variation): each option does what it
claims, and a case made without a variation is the same as before the option existed.

Cases at 6 mm (a few at 4 mm) keep the file to a few seconds.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from ctlanguage.errors import InputError
from ctlanguage.phantom import anatomy as an
from ctlanguage.phantom import generate_case, write_corpus
from ctlanguage.phantom.variation import PRESETS, Variation

# sha256 of (int16 volume, label map, affine rounded to 1e-6, finding masks, report) of default
# cases, computed with the phantom code of main before the variation options were added.
DEFAULT_HASHES = {
    3: "a7ab2be63b274dbb9b37ddc859820d617c0b0f04bff1c3b714e8894cef52e8a7",
    11: "9eca9ab51db68a25444e48b080e19d100408d5d007244ff947fd1c2f5c22077d",
}


def _case_hash(c) -> str:
    m = hashlib.sha256()
    for a in (np.rint(c.volume).astype(np.int16), c.structures, np.round(c.ijk_to_ras, 6)):
        m.update(np.ascontiguousarray(a).tobytes())
    for f in c.findings:
        m.update(f.name.encode())
        m.update(np.ascontiguousarray(f.mask).tobytes())
    m.update(c.report.encode())
    return m.hexdigest()


@pytest.mark.parametrize("seed", sorted(DEFAULT_HASHES))
def test_default_case_is_unchanged(seed):
    c = generate_case(seed, spacing=6.0)
    assert _case_hash(c) == DEFAULT_HASHES[seed]
    assert "variation" not in c.meta
    assert _case_hash(generate_case(seed, spacing=6.0, variation="none")) == DEFAULT_HASHES[seed]


def _median(case, name):
    return float(np.median(case.volume[case.anatomy_mask(name)]))


def test_contrast_phase_changes_the_organs_it_should():
    def phase_case(phase, seed=21):
        return generate_case(seed, spacing=4.0, orient=False, findings=[], fov="chest_abdomen",
                             variation=Variation(phase={phase: 1}))

    cases = {p: phase_case(p) for p in ("non_contrast", "arterial", "portal_venous", "delayed")}
    aorta = {p: _median(c, "aorta") for p, c in cases.items()}
    liver = {p: _median(c, "liver") for p, c in cases.items()}
    assert aorta["arterial"] > aorta["portal_venous"] > aorta["delayed"] > aorta["non_contrast"], aorta
    assert aorta["non_contrast"] < 70 and aorta["arterial"] > 200, aorta
    assert liver["portal_venous"] > liver["arterial"] and liver["portal_venous"] > liver["non_contrast"] + 30, liver
    for p, c in cases.items():
        hu = c.meta["variation"]["phase_hu"]
        assert c.meta["variation"]["phase"] == p and c.meta["contrast"] == (p != "non_contrast")
        if p == "arterial":
            assert hu["kidney_cortex"] > hu["kidney_medulla"] + 50  # corticomedullary phase
        if p == "delayed":
            assert hu["kidney_medulla"] > hu["kidney_cortex"]  # excretory phase
    assert "arterial phase" in cases["arterial"].report.splitlines()[0]
    assert "without intravenous contrast" in cases["non_contrast"].report.splitlines()[0]


def test_chest_only_fov_has_no_kidneys_and_masks_match_the_image():
    v = Variation(fov={"chest": 1})
    for seed in range(40, 48):
        c = generate_case(seed, spacing=6.0, orient=False, variation=v)
        assert c.meta["fov"] == "chest" and c.meta["variation"]["fov"] == "chest"
        assert not c.anatomy_mask("kidney_left").any() and not c.anatomy_mask("kidney_right").any(), seed
        assert c.anatomy_mask("lung_left").any() and c.anatomy_mask("heart").any()
        assert c.structures.shape == c.volume.shape
        assert all(f.mask.shape == c.volume.shape for f in c.findings)
        assert "kidney" not in c.report.lower()


def test_abdomen_slab_has_the_requested_slices_and_organs_cut_at_its_edges():
    v = Variation(fov={"abdomen_slab": 1}, slab_slices=(25, 25), slice_mm={5.0: 1})
    c = generate_case(5, spacing=2.5, orient=False, findings=[], variation=v)
    assert c.volume.shape[0] == 25 and c.structures.shape == c.volume.shape
    assert c.meta["variation"]["slab_slices"] == 25 and c.meta["variation"]["shape_kji"][0] == 25
    assert np.isclose(np.linalg.norm(c.ijk_to_ras[:3, 2]), 5.0)
    # the body (and the liver or a kidney) runs through the slab: cut, not closed, at both edges
    body = c.structures > 0
    assert body[0].sum() > 1000 and body[-1].sum() > 1000
    cut = [n for n in ("liver", "kidney_left", "kidney_right", "spleen")
           if c.anatomy_mask(n)[0].any() or c.anatomy_mask(n)[-1].any()]
    assert cut
    # the label map on an edge slice agrees with the image there
    for k in (0, -1):
        lab, img = c.structures[k], c.volume[k]
        assert np.median(img[lab == 0]) < -900  # air outside the body
        soft = np.isin(lab, an.anatomy_labels("liver") + an.anatomy_labels("kidney_left")
                       + an.anatomy_labels("kidney_right") + an.anatomy_labels("spleen"))
        if soft.sum() > 50:
            assert 0 < np.median(img[soft]) < 300
    # orientation keeps the slice count on one axis
    co = generate_case(5, spacing=2.5, orient=True, findings=[], variation=v)
    assert 25 in co.volume.shape


def test_hu_shift_noise_kernel_and_slice_thickness():
    base = generate_case(9, spacing=4.0, orient=False, findings=[], fov="chest_abdomen")
    shifted = generate_case(9, spacing=4.0, orient=False, findings=[], fov="chest_abdomen",
                            variation=Variation(hu_shift=(20.0, 20.0)))
    ok = (base.volume > -1000) & (base.volume < 3000)  # away from the clip limits
    assert np.allclose(shifted.volume[ok] - base.volume[ok], 20.0, atol=1e-3)
    assert np.array_equal(shifted.structures, base.structures)

    def liver_sd(noise):
        c = generate_case(9, spacing=4.0, orient=False, findings=[], fov="chest_abdomen",
                          variation=Variation(noise_sd=(noise, noise)))
        from scipy import ndimage
        core = ndimage.binary_erosion(c.anatomy_mask("liver"), iterations=2)
        return float(np.std(c.volume[core]))

    assert liver_sd(40.0) > 2 * liver_sd(6.0)

    def organ_sd(tex, name="liver"):
        c = generate_case(9, spacing=4.0, orient=False, findings=["liver_cyst"], fov="chest_abdomen",
                          variation=Variation(noise_sd=(6.0, 6.0), organ_texture=tex))
        from scipy import ndimage
        core = ndimage.binary_erosion(c.anatomy_mask(name), iterations=2)
        cyst = [f.mask for f in c.findings if f.name == "liver_cyst"][0].astype(bool)
        return float(np.std(c.volume[core & ~cyst])), float(np.std(c.volume[ndimage.binary_erosion(cyst)]))

    (liver_tex, cyst_tex), (liver_flat, cyst_flat) = organ_sd((12.0, 12.0)), organ_sd(None)
    assert liver_tex > 1.5 * liver_flat and organ_sd((12.0, 12.0), "spleen")[0] > 1.5 * organ_sd(None, "spleen")[0]
    assert cyst_tex < 1.3 * cyst_flat + 1  # focal lesions are not textured
    sharp = generate_case(9, spacing=4.0, orient=False, variation=Variation(psf_fwhm_factor=(0.8, 0.8)))
    soft = generate_case(9, spacing=4.0, orient=False, variation=Variation(psf_fwhm_factor=(2.2, 2.2)))
    assert soft.meta["psf_fwhm_mm"] > 2.5 * sharp.meta["psf_fwhm_mm"]
    thin = generate_case(9, spacing=4.0, orient=False, variation=Variation(slice_mm={1.25: 1}))
    assert thin.meta["spacing"][2] == 1.25 and thin.meta["slice_thickness"] == 1.25
    assert np.isclose(np.linalg.norm(thin.ijk_to_ras[:3, 2]), 1.25)


def test_realistic_preset_is_seeded_and_recorded_in_the_manifest(tmp_path):
    a = generate_case(30001, spacing=6.0, variation="realistic")
    b = generate_case(30001, spacing=6.0, variation="realistic")
    assert np.array_equal(a.volume, b.volume) and a.meta == b.meta
    # the single-factor presets draw the same value of their factor as "realistic" for a seed
    for s in range(30000, 30010):
        r = generate_case(s, spacing=6.0, variation="realistic").meta["variation"]
        assert generate_case(s, spacing=6.0, variation="fov").meta["variation"]["fov"] == r["fov"]
    stats = write_corpus(str(tmp_path / "c"), n=2, seed=30000, spacing=6.0, montage=False, variation="realistic")
    recs = [json.loads(line) for line in open(stats["manifest"])]
    assert all(r["phantom"]["variation"]["fov"] == r["phantom"]["fov"] for r in recs)
    assert all(r["phantom"]["variation"]["phase"] in ("non_contrast", "arterial", "portal_venous", "delayed")
               for r in recs)
    plain = write_corpus(str(tmp_path / "d"), n=1, seed=30000, spacing=6.0, montage=False)
    assert "phantom" not in json.loads(open(plain["manifest"]).readline())
    # scripts/split_manifest.py: one manifest per drawn FOV, the cases' records unchanged
    import runpy
    from pathlib import Path

    split = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "split_manifest.py"))["main"]
    assert split([stats["manifest"], "fov"]) == 0
    parts = sorted((tmp_path / "c").glob("manifest_fov-*.jsonl"))
    got = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert sorted(r["seed"] for r in got) == [30000, 30001]
    assert {p.name for p in parts} == {f"manifest_fov-{r['phantom']['fov']}.jsonl" for r in recs}
    assert split([plain["manifest"], "fov"]) == 2
    assert set(PRESETS) >= {"realistic", "fov", "phase"}


def test_bad_variation_is_one_clear_error(tmp_path, capsys):
    from ctlanguage.cli import main

    with pytest.raises(InputError):
        generate_case(1, spacing=6.0, variation="everything")
    with pytest.raises(InputError):
        generate_case(1, spacing=6.0, variation=Variation(phase={"venous": 1}))
    with pytest.raises(InputError):
        write_corpus(str(tmp_path / "x"), n=1, variation="nope")
    assert not (tmp_path / "x").exists()
    code = main(["--quiet", "phantom", "--n", "1", "--seed", "30000", "--spacing", "6", "--no-montage",
                 "--variation", "realistic", "--out", str(tmp_path / "cli")])
    assert code == 0
    rec = json.loads((tmp_path / "cli" / "manifest.jsonl").read_text().splitlines()[0])
    assert rec["seed"] == 30000 and "variation" in rec["phantom"]


def test_realistic_held_out_seeds_are_in_no_training_config():
    """configs/*.json and the shipped model's config.json never draw phantoms from the held-out
    realistic-variation seeds."""
    from pathlib import Path

    from ctlanguage.engine import resolve_model_dir
    from ctlanguage.phantom.variation import HELD_OUT_SEEDS

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.json")) + [resolve_model_dir("default") / "config.json"]
    held, checked = set(HELD_OUT_SEEDS), 0

    def walk(node):
        nonlocal checked
        if isinstance(node, dict):
            ph = node.get("phantom")
            if isinstance(ph, dict) and "seed" in ph and "n" in ph:
                assert not held & set(range(int(ph["seed"]), int(ph["seed"]) + int(ph["n"]))), ph
                checked += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for f in files:
        if f.is_file():
            walk(json.loads(f.read_text()))
    assert checked >= 3
