"""Tests of the synthetic torso CT generator (ctlanguage.phantom).

Cases are generated at 3 mm (and module-scoped fixtures are shared) to keep the run short.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctlanguage.phantom import FINDING_ANATOMY, FINDING_KEYS, generate_case, write_corpus
from ctlanguage.phantom import anatomy as an
from ctlanguage.phantom.corpus import apply_orientation, orient_transform, write_nifti
from ctlanguage.phantom.montage import render_montage, to_canonical
from ctlanguage.phantom.report_writer import NORMALS, phrasings_used

SP = 3.0


@pytest.fixture(scope="module")
def all_findings_case():
    return generate_case(7, spacing=SP, orient=False, findings=FINDING_KEYS, fov="chest_abdomen")


@pytest.fixture(scope="module")
def normal_case():
    return generate_case(11, spacing=SP, orient=False, findings=[], fov="chest_abdomen")


def _centroid_ras(mask, ijk_to_ras):
    kji = np.argwhere(mask).mean(axis=0)
    ijk1 = np.array([kji[2], kji[1], kji[0], 1.0])
    return (ijk_to_ras @ ijk1)[:3]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_case_and_different_seed_differs():
    a = generate_case(3, spacing=SP)
    b = generate_case(3, spacing=SP)
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.structures, b.structures)
    assert np.array_equal(a.ijk_to_ras, b.ijk_to_ras)
    assert a.report == b.report and a.labels == b.labels
    assert [f.key for f in a.findings] == [f.key for f in b.findings]
    for fa, fb in zip(a.findings, b.findings):
        assert np.array_equal(fa.mask, fb.mask)
    c = generate_case(4, spacing=SP)
    assert c.volume.shape != a.volume.shape or not np.array_equal(c.volume, a.volume)


def test_api_types(all_findings_case):
    c = all_findings_case
    assert c.volume.dtype == np.float32 and c.volume.ndim == 3
    assert c.structures.dtype == np.uint8 and c.structures.shape == c.volume.shape
    assert c.ijk_to_ras.shape == (4, 4)
    assert set(c.labels) == set(FINDING_KEYS)
    assert set(c.structure_labels.values()) == set(an.STRUCTURE_NAMES)
    for f in c.findings:
        assert f.mask.dtype == np.uint8 and f.mask.shape == c.volume.shape
        assert f.volume_ml == pytest.approx(f.mask.sum() * np.prod(c.meta["spacing"]) / 1000.0)


# ----------------------------------------------------------------------------- geometry
def test_all_structures_present(all_findings_case):
    counts = np.bincount(all_findings_case.structures.ravel(), minlength=len(an.STRUCTURE_NAMES) + 1)
    missing = [an.STRUCTURE_LABELS[i] for i in an.STRUCTURE_LABELS if counts[i] < 5]
    assert not missing


def test_every_finding_is_placed_inside_its_anatomy(all_findings_case):
    c = all_findings_case
    placed = {f.name for f in c.findings}
    assert placed == set(FINDING_KEYS), set(FINDING_KEYS) - placed
    for f in c.findings:
        base = FINDING_ANATOMY[f.name]
        assert f.anatomy.startswith(base)
        region = c.anatomy_mask(f.anatomy)
        m = f.mask.astype(bool)
        assert m.any(), f.key
        assert not (m & ~region).any(), f"{f.key} leaks out of {f.anatomy}"
        assert c.labels[f.name] == 1


def test_sided_findings_lie_on_their_side(all_findings_case):
    c = all_findings_case
    for f in c.findings:
        if f.laterality is None:
            continue
        x = _centroid_ras(f.mask, c.ijk_to_ras)[0] - c.ijk_to_ras[0, 3]
        # canonical grid: RAS x grows to the patient's right; left organs have smaller x than the midline
        mid = _centroid_ras(c.anatomy_mask("spine"), c.ijk_to_ras)[0] - c.ijk_to_ras[0, 3]
        assert (x > mid) == (f.laterality == "right"), f.key


def test_left_right_organs_are_on_patient_side(normal_case):
    c = normal_case
    x = {n: _centroid_ras(c.anatomy_mask(n), c.ijk_to_ras)[0] for n in ("liver", "spleen", "kidney_left", "kidney_right", "lung_left", "lung_right")}
    assert x["liver"] > x["spleen"]  # RAS: +x = patient right
    assert x["kidney_right"] > x["kidney_left"] and x["lung_right"] > x["lung_left"]
    y = {n: _centroid_ras(c.anatomy_mask(n), c.ijk_to_ras)[1] for n in ("heart", "spine")}
    assert y["heart"] > y["spine"]  # heart anterior of the spine
    z = {n: _centroid_ras(c.anatomy_mask(n), c.ijk_to_ras)[2] for n in ("lung_left", "liver", "kidney_left")}
    assert z["lung_left"] > z["liver"] > z["kidney_left"]


def test_reoriented_case_has_same_physical_anatomy():
    a = generate_case(21, spacing=SP, orient=False, fov="chest_abdomen")
    b = generate_case(21, spacing=SP, orient=True, fov="chest_abdomen")
    assert b.meta["axis_perm"] != [0, 1, 2] or any(b.meta["axis_flips"])  # seed 21 really reorients
    assert a.volume.shape != b.volume.shape or not np.array_equal(a.volume, b.volume)
    for name in ("liver", "heart", "lung_upper_lobe_right", "kidney_left", "spine"):
        assert a.anatomy_mask(name).any(), name
        ca = _centroid_ras(a.anatomy_mask(name), a.ijk_to_ras)
        cb = _centroid_ras(b.anatomy_mask(name), b.ijk_to_ras)
        np.testing.assert_allclose(ca, cb, atol=1e-6)
    for fa, fb in zip(a.findings, b.findings):
        np.testing.assert_allclose(_centroid_ras(fa.mask, a.ijk_to_ras), _centroid_ras(fb.mask, b.ijk_to_ras), atol=1e-6)
    # same HU at the same physical voxel: canonicalising b gives back a exactly
    canon, sp = to_canonical(b.volume, b.ijk_to_ras)
    assert np.array_equal(canon, a.volume)
    np.testing.assert_allclose(sp, a.meta["spacing"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_orientation_transform_maps_indices_exactly(seed):
    rng = np.random.default_rng(seed)
    shape = (4, 5, 6)
    arr = np.arange(np.prod(shape)).reshape(shape)
    perm, flips, T = orient_transform(shape, rng)
    new = apply_orientation(arr, perm, flips)
    for kji in np.argwhere(np.ones(new.shape, bool))[::7]:
        old = (T @ np.array([kji[2], kji[1], kji[0], 1.0])).astype(int)
        assert new[tuple(kji)] == arr[old[2], old[1], old[0]]


def test_spacing_option_is_exact():
    c = generate_case(5, spacing=(2.5, 2.0, 4.0), orient=False)
    np.testing.assert_allclose(np.diag(c.ijk_to_ras)[:3], [2.5, 2.0, 4.0])


def test_unusable_spacing_is_refused():
    from ctlanguage.errors import InputError

    with pytest.raises(InputError):
        generate_case(5, spacing=0.1)
    with pytest.raises(InputError):
        generate_case(5, spacing=0.35)  # far too many voxels: refused before allocating


# ----------------------------------------------------------------------------- HU
def test_hu_ranges_per_tissue(normal_case):
    c = normal_case
    v, lab = c.volume, c.structures

    def med(name):
        return float(np.median(v[c.anatomy_mask(name)]))

    assert float(np.median(v[lab == 0])) < -950  # outside air
    assert -920 < med("lung_lower_lobe_left") < -700
    assert 20 < med("liver") < 140 and 20 < med("spleen") < 150
    assert 25 < med("heart") < 320 and 25 < med("aorta") < 320
    assert -10 < med("gallbladder") < 45
    assert float(np.percentile(v[c.anatomy_mask("spine")], 90)) > 400
    assert float(np.median(v[c.anatomy_mask("trachea")])) < -300
    # subcutaneous fat: body voxels within a few mm of the skin
    body = c.anatomy_mask("body")
    from scipy import ndimage

    rim = body & ~ndimage.binary_erosion(body, iterations=2)
    core = ndimage.binary_erosion(body, iterations=2) & ~ndimage.binary_erosion(body, iterations=4)
    assert -140 < float(np.median(v[core])) < -40 or float(np.median(v[rim])) < -40
    # noise in air outside the body: CT-like 8-25 HU (before the -1024 clip)
    air = (lab == 0) & ~ndimage.binary_dilation(body, iterations=4)
    sd = float(np.std(v[air][v[air] > -1020]))
    assert 3 < sd < 40


def test_findings_change_attenuation(all_findings_case, normal_case):
    c = all_findings_case
    by = {f.key: f for f in c.findings}
    fluid = c.volume[by["pleural_effusion_left"].mask.astype(bool)] if "pleural_effusion_left" in by else c.volume[by["pleural_effusion_right"].mask.astype(bool)]
    assert -30 < float(np.median(fluid)) < 50
    stone = by[[k for k in by if k.startswith("kidney_stone")][0]]
    assert float(c.volume[stone.mask.astype(bool)].max()) > 200
    calc = by["arterial_calcification"]
    assert float(c.volume[calc.mask.astype(bool)].max()) > 250
    # steatosis: liver below spleen
    liver = np.median(c.volume[c.anatomy_mask("liver")])
    spleen = np.median(c.volume[c.anatomy_mask("spleen")])
    assert liver < spleen - 10


# ----------------------------------------------------------------------------- report
KEYWORDS = {
    "lung_nodule": ["nodule"], "lung_mass": ["mass"], "pleural_effusion": ["pleural"],
    "emphysema": ["emphysema"], "consolidation": ["consolidation", "opacity"],
    "atelectasis": ["atelectasis", "collapse"],
    "cardiomegaly": ["cardiomegaly", "heart is enlarged", "enlarged heart", "cardiac silhouette"],
    "pericardial_effusion": ["pericardial"], "aortic_aneurysm": ["aneurysm"],
    "arterial_calcification": ["calcif"], "liver_lesion": ["lesion", "hepatic mass"],
    "liver_cyst": ["cyst"], "steatosis": ["steatosis", "fatty"],
    "hepatomegaly": ["hepatomegaly", "liver is enlarged", "enlarged liver"],
    "splenomegaly": ["splenomegaly", "spleen is enlarged", "enlarged spleen"],
    "kidney_cyst": ["renal", "kidney"], "kidney_stone": ["calcul", "stone", "nephrolithiasis"],
    "ascites": ["ascites", "fluid"], "lymphadenopathy": ["lymph"],
    "gallstone": ["gallstone", "cholelithiasis", "calcul"],
}


def test_report_mentions_present_findings(all_findings_case):
    rep = all_findings_case.report.lower()
    assert "findings:" in rep and "impression:" in rep
    for f in all_findings_case.findings:
        assert any(k in rep for k in KEYWORDS[f.name]), f.name
    for f in all_findings_case.findings:
        if f.name in ("lung_nodule", "lung_mass", "liver_lesion", "liver_cyst"):
            assert " mm" in rep or " cm" in rep


def test_report_negates_absent_findings(normal_case):
    rep = normal_case.report
    for group in ("liver", "spleen", "kidneys", "pleura", "heart", "peritoneum", "gallbladder", "nodes"):
        assert any(s in rep for s in NORMALS[group]), group
    assert all(v == 0 for v in normal_case.labels.values())
    assert "IMPRESSION:" in rep and normal_case.findings == []


def test_report_negatives_track_the_case():
    # a liver lesion case must not also say the liver is normal
    c = generate_case(12, spacing=SP, orient=False, findings=["liver_cyst"], fov="chest_abdomen")
    assert c.labels["liver_cyst"] == 1
    assert not any(s in c.report for s in NORMALS["liver"])
    assert any(s in c.report for s in NORMALS["kidneys"])


def test_phrasings_inventory_excludes_lay_wording():
    used = phrasings_used()
    allp = " | ".join(p for ps in used["findings"].values() for p in ps)
    assert "fluid around the lung" not in allp and "pleural effusion" in allp
    assert set(used["findings"]) == set(FINDING_KEYS)


# ----------------------------------------------------------------------------- files
def test_nifti_affine_round_trip(tmp_path):
    nib = pytest.importorskip("nibabel")
    c = generate_case(8, spacing=SP, orient=True)
    p = str(tmp_path / "x.nii.gz")
    write_nifti(c.structures, c.ijk_to_ras, p)
    img = nib.load(p)
    np.testing.assert_allclose(img.affine, c.ijk_to_ras, atol=1e-4)
    arr = np.asarray(img.dataobj)  # nibabel is [i, j, k]
    assert np.array_equal(arr.transpose(2, 1, 0), c.structures)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_write_corpus_manifest_schema(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    stats = write_corpus(str(tmp_path), 2, seed=40, spacing=SP, montage=True)
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 and stats["n"] == 2
    for n, line in enumerate(lines):
        rec = json.loads(line)
        assert rec["case_id"] == f"case_{40 + n:05d}" and rec["seed"] == 40 + n
        for k in ("image", "report", "structures", "structure_labels", "findings", "labels"):
            assert k in rec
        assert set(rec["labels"]) == set(FINDING_KEYS)
        assert all(v in (0, 1) for v in rec["labels"].values())
        assert rec["structure_labels"]["1"] == "lung_upper_lobe_left"
        img = sitk.ReadImage(str(tmp_path / rec["image"]))
        st = sitk.ReadImage(str(tmp_path / rec["structures"]))
        assert img.GetSize() == st.GetSize()
        assert (tmp_path / rec["report"]).read_text().startswith("TECHNIQUE")
        assert (tmp_path / rec["montage"]).stat().st_size > 1000
        names = {f["name"] for f in rec["findings"]}
        assert names == {k for k, v in rec["labels"].items() if v}
        for f in rec["findings"]:
            assert set(f) == {"name", "anatomy", "laterality", "mask", "volume_ml"}
            m = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f["mask"])))
            assert m.shape == sitk.GetArrayFromImage(img).shape and m.any()
            suffix = f"_{f['laterality']}.nii.gz" if f["laterality"] else f"{f['name']}.nii.gz"
            assert f["mask"].endswith(suffix)


def test_montage_renders(all_findings_case):
    img = render_montage(all_findings_case.volume, all_findings_case.ijk_to_ras, all_findings_case.findings[:3])
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[2] == 3
    assert (a[..., 0] > 200).sum() > 10  # some coloured outline pixels


def test_cli_end_to_end(tmp_path):
    from ctlanguage.cli import main

    out = tmp_path / "corpus"
    rc = main(["--quiet", "phantom", "--n", "2", "--seed", "5", "--out", str(out), "--spacing", "3", "--no-montage"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in recs] == [5, 6]
    assert not (out / "case_00005" / "montage.png").exists()
    assert main(["--quiet", "phantom", "--n", "0", "--out", str(out)]) == 2
