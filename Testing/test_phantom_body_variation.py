"""Patient/table variation of the phantom (arms, table, fat, warp, calcifications; preset "full"):
each field changes what it should and nothing else, and the existing presets are unchanged.

Small cases (3-6 mm, canonical order) keep the file to a few seconds of CPU.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from ctlanguage.errors import InputError
from ctlanguage.phantom import anatomy as an
from ctlanguage.phantom import corpus, generate_case, write_corpus
from ctlanguage.phantom.variation import PRESETS, Variation

# sha256 of (int16 volume, label map, affine, finding masks, report, meta as JSON) at 6 mm, computed
# with main's phantom code (d5471f3) before the patient/table fields existed.
PRESET_HASHES = {
    ("realistic", 30000): "ea0f46713abe4c99bb0da0b6b0ff10d75af69b91612365586c3e7e036847cd38",
    ("realistic", 30007): "2b1ac56e8f73f711aac83bd88b6e232ecb2e7fbc7d1349ac07fa8546f3c6e5f9",
    ("fov", 30001): "8d3ecea8503cdbe7897bca4500a2679ea5e0c45b4d6ddbcb977e5df8fb239eb2",
    ("phase", 30005): "30d5d69b3c1fc9609ec841170c472b0a75d8d682975fa067e670722ea0775003",
    (None, 3): "992fbdcf547e84a03b18bc2fbb818bfb034fea248c08a1310365337644b14767",
}


def _hash(c) -> str:
    m = hashlib.sha256()
    for a in (np.rint(c.volume).astype(np.int16), c.structures, np.round(c.ijk_to_ras, 6)):
        m.update(np.ascontiguousarray(a).tobytes())
    for f in c.findings:
        m.update(f.name.encode())
        m.update(np.ascontiguousarray(f.mask).tobytes())
    m.update(c.report.encode())
    m.update(json.dumps(c.meta, sort_keys=True, default=str).encode())
    return m.hexdigest()


@pytest.mark.parametrize("preset,seed", sorted(PRESET_HASHES, key=str))
def test_existing_presets_and_default_are_bit_identical(preset, seed):
    assert _hash(generate_case(seed, spacing=6.0, variation=preset)) == PRESET_HASHES[(preset, seed)]


def test_full_preset_draws_what_realistic_draws():
    keys = ("fov", "slab_slices", "phase", "phase_hu", "hu_shift", "noise_sd", "psf_fwhm_factor", "slice_mm",
            "organ_texture")
    for s in (30002, 30021):  # 5 mm chest (arms up), 3 mm abdominal slab (arms down)
        r = generate_case(s, spacing=6.0, variation="realistic").meta["variation"]
        f = generate_case(s, spacing=6.0, variation="full").meta["variation"]
        assert {k: f[k] for k in keys} == {k: r[k] for k in keys}
        assert f["arms"] in ("up", "down") and isinstance(f["table"], bool) and "patient" in f
        assert not {"arms", "table", "patient"} & set(r)  # realistic records are unchanged


def _pair(var, seed=21, sp=4.0, findings=(), fov="chest_abdomen"):
    base = generate_case(seed, spacing=sp, orient=False, findings=list(findings), fov=fov)
    return base, generate_case(seed, spacing=sp, orient=False, findings=list(findings), fov=fov, variation=var)


def _sub(case, ref):
    """``case``'s arrays on ``ref``'s voxel grid (same spacing; the origin shifted by whole voxels)."""
    sp = ref.ijk_to_ras[:3, :3].diagonal()
    assert np.allclose(case.ijk_to_ras[:3, :3], ref.ijk_to_ras[:3, :3])
    off = (ref.ijk_to_ras[:3, 3] - case.ijk_to_ras[:3, 3]) / sp
    assert np.allclose(off, np.rint(off), atol=1e-4)
    i, j, k = (int(v) for v in np.rint(off))
    nk, nj, ni = ref.structures.shape
    sl = (slice(k, k + nk), slice(j, j + nj), slice(i, i + ni))
    return case.structures[sl], case.volume[sl]


def test_arms_down_adds_arm_tissue_beside_the_torso_and_nothing_else():
    base, down = _pair(Variation(arms={"down": 1}))
    _, up = _pair(Variation(arms={"up": 1}))
    assert np.array_equal(up.structures, base.structures) and np.array_equal(up.volume, base.volume)
    assert up.meta["variation"]["patient"]["arm_voxels"] == 0
    assert down.structures.shape[2] > base.structures.shape[2]  # widened along x only
    assert down.structures.shape[:2] == base.structures.shape[:2]
    lab, _ = _sub(down, base)
    diff = lab != base.structures
    assert np.mean(diff) < 1e-3  # the torso is the same on the old grid ...
    # ... and every voxel outside the old grid that is body is an arm: left and right of the torso
    body_x = np.flatnonzero((down.structures > 0).any(axis=(0, 1)))
    xs = down.ijk_to_ras[0, 3] + down.ijk_to_ras[0, 0] * body_x
    tx = base.ijk_to_ras[0, 3] + base.ijk_to_ras[0, 0] * np.flatnonzero((base.structures > 0).any(axis=(0, 1)))
    assert xs.min() < tx.min() - 30 and xs.max() > tx.max() + 30
    x_all = down.ijk_to_ras[0, 3] + down.ijk_to_ras[0, 0] * np.arange(down.structures.shape[2])
    arm = np.zeros(down.structures.shape, bool)
    arm[:, :, (x_all < tx.min() - 5) | (x_all > tx.max() + 5)] = True
    arm &= down.structures > 0
    n_arm = down.meta["variation"]["patient"]["arm_voxels"]
    assert arm.sum() > 500 and n_arm >= arm.sum()
    assert set(np.unique(down.structures[arm])) == {an.LABEL["body"]}
    hu = down.volume[arm]
    assert (hu > 400).mean() > 0.01  # humerus / forearm bones
    assert ((hu > -150) & (hu < -40)).mean() > 0.1 and ((hu > 20) & (hu < 80)).mean() > 0.2  # fat, muscle


def test_table_lies_under_the_patient_outside_the_body_label():
    base, tab = _pair(Variation(table=1.0))
    _, none = _pair(Variation(table=0.0))
    assert np.array_equal(none.volume, base.volume)
    lab, vol = _sub(tab, base)
    assert np.array_equal(lab, base.structures)  # no label changes on the old grid
    assert tab.structures.shape[1] > base.structures.shape[1]  # extended posteriorly (y)
    body_j = np.flatnonzero((tab.structures > 0).any(axis=(0, 2)))
    below = tab.volume[:, : body_j[0], :]
    assert not (tab.structures[:, : body_j[0], :] > 0).any()
    # carbon-fibre skins and mattress (> -600 HU at 4 mm: the skins are diluted by partial volume)
    # where the table-less case has only air
    assert (below > -600).mean() > 0.01
    assert (base.volume[:, : max(1, body_j[0] - (tab.structures.shape[1] - base.structures.shape[1])), :] < -600).all()
    assert tab.meta["variation"]["patient"]["table_voxels"] > 1000


def test_fat_thickness_and_visceral_fat_change_the_habitus_not_the_organs():
    def case(**kw):
        return generate_case(33, spacing=5.0, orient=False, findings=[], fov="chest_abdomen", variation=Variation(**kw))

    def vol(c, name):
        return float(c.anatomy_mask(name).sum()) * float(np.prod(c.meta["spacing"]))

    thin, thick = case(fat_mm=(4.0, 4.0)), case(fat_mm=(55.0, 55.0))
    assert vol(thick, "body") > 1.3 * vol(thin, "body")
    fat = lambda c: float(((c.volume > -150) & (c.volume < -50) & (c.structures > 0)).sum()) * float(np.prod(c.meta["spacing"]))  # noqa: E731
    assert fat(thick) > 2 * fat(thin)
    for organ in ("lung_left", "lung_right", "liver", "heart"):
        assert abs(vol(thick, organ) / vol(thin, organ) - 1) < 0.1, organ
    slim, belly = case(visceral_fat=(0.9, 0.9)), case(visceral_fat=(1.45, 1.45))
    assert vol(belly, "peritoneal_cavity") > 1.15 * vol(slim, "peritoneal_cavity")
    assert abs(vol(belly, "liver") / vol(slim, "liver") - 1) < 0.1
    assert thick.meta["variation"]["fat_mm"] == 55.0 and belly.meta["variation"]["visceral_fat"] == 1.45


def _closed_shell_violations(lab) -> int:
    """Lobe voxels 6-adjacent to anything but lung or pleural space of their own side or the airway
    (the bronchi are painted into the lobes)."""
    n = 0
    for side in ("left", "right"):
        lobes = an.anatomy_labels(f"lung_{side}")
        region = an.isin(lab, lobes + [an.LABEL[f"pleural_space_{side}"], an.LABEL["trachea"]])
        lobe = an.isin(lab, lobes)
        touch = ndimage.binary_dilation(~region, ndimage.generate_binary_structure(3, 1)) & lobe
        n += int(touch.sum())
    return n


def test_warp_deforms_every_organ_keeping_labels_and_findings_consistent():
    finds = ["liver_lesion", "lung_nodule", "kidney_cyst", "pleural_effusion", "splenomegaly"]
    base, w = _pair(Variation(deform_mm=(7.0, 7.0)), seed=14, sp=3.0, findings=finds)
    assert w.structures.shape == base.structures.shape and np.allclose(w.ijk_to_ras, base.ijk_to_ras)
    p = w.meta["variation"]["patient"]
    assert 2.0 < p["peak_mm"] <= 7.0 + 1e-6
    body = base.structures > 0
    assert np.mean(w.structures[body] != base.structures[body]) > 0.01  # visibly moved
    for organ in ("liver", "spleen", "kidney_left", "kidney_right", "heart", "aorta", "lung_left", "lung_right",
                  "stomach", "pancreas"):
        a, b = base.anatomy_mask(organ), w.anatomy_mask(organ)
        assert abs(b.sum() / a.sum() - 1) < 0.15, organ
        assert (a != b).any(), organ  # every organ is deformed
    # one label per voxel by construction; no unlabelled pocket inside the body (background connected
    # through faces, edges or corners counts as outside: the skin may get one-voxel pits)
    full = np.ones((3, 3, 3), bool)
    holes = lambda c: int((ndimage.binary_fill_holes(c.structures > 0, full) & (c.structures == 0)).sum())  # noqa: E731
    assert holes(w) <= holes(base)
    # the warp does not open the one-voxel pleural shell (the unwarped phantom lets the mediastinal
    # veins, painted after the lungs, touch a few lobe voxels)
    assert _closed_shell_violations(w.structures) <= _closed_shell_violations(base.structures) < 200
    assert sorted(f.key for f in w.findings) == sorted(f.key for f in base.findings)
    for f in w.findings:
        m = f.mask.astype(bool)
        assert m.any() and not (m & ~w.anatomy_mask(f.anatomy)).any(), f.key
        assert np.isclose(f.volume_ml, m.sum() * np.prod(w.meta["spacing"]) / 1000)
        assert f.info["centroid"] is not None and f.info["long_mm"] > 0
        assert w.labels[f.name] == 1
    # orientation still exact: the same warped case, re-oriented, has the same RAS organ centroids
    wo = generate_case(14, spacing=3.0, orient=True, findings=finds, fov="chest_abdomen",
                       variation=Variation(deform_mm=(7.0, 7.0)))

    def centroid_ras(c, name):
        kji = np.argwhere(c.anatomy_mask(name)).mean(0)
        return (c.ijk_to_ras @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]

    for organ in ("liver", "heart", "kidney_left"):
        assert np.allclose(centroid_ras(w, organ), centroid_ras(wo, organ), atol=1e-4), organ


def test_calcifications_are_dense_and_inside_their_structures(monkeypatch):
    # the scanner model off (identity), so the painted HU can be read from the image
    monkeypatch.setattr(corpus, "scanner", lambda hu, *a, **k: hu.copy())
    kinds = {"costal_cartilage": 1.0, "lung_granuloma": 1.0, "spleen_granuloma": 1.0, "liver_granuloma": 1.0,
             "coronary": 1.0}
    base, c = _pair(Variation(calcification=kinds), seed=8, sp=3.0, findings=["arterial_calcification"])
    assert np.array_equal(c.structures, base.structures)
    assert [f.mask.tobytes() for f in c.findings] == [f.mask.tobytes() for f in base.findings]
    placed = c.meta["variation"]["patient"]["calcification"]
    assert set(placed) == set(kinds)
    d = c.volume != base.volume
    assert d.sum() == sum(v["voxels"] for v in placed.values())
    assert c.volume[d].min() >= 200  # >= 130 HU calcium threshold, with margin
    lab = c.structures[d]
    allowed = an.anatomy_labels("lung_left") + an.anatomy_labels("lung_right") + [
        an.LABEL[n] for n in ("spleen", "liver", "heart", "pericardium", "body")]
    assert np.isin(lab, allowed).all()
    for kind, names in (("lung_granuloma", an.anatomy_labels(f"lung_{placed['lung_granuloma']['side']}")),
                        ("spleen_granuloma", [an.LABEL["spleen"]]), ("liver_granuloma", [an.LABEL["liver"]]),
                        ("coronary", [an.LABEL["heart"], an.LABEL["pericardium"]])):
        assert np.isin(lab, names).sum() >= placed[kind]["voxels"], kind
    # cartilage foci: body label, in the anterior chest wall outside the thoracic cavity
    kk, jj, ii = np.nonzero(d & (c.structures == an.LABEL["body"]))
    assert kk.size == placed["costal_cartilage"]["voxels"] and (c.ijk_to_ras[1, 3] + 3.0 * jj > 0).all()
    rep = c.report.lower()
    assert "granuloma" in rep and "coronary" in rep and "no vascular calcification" not in rep
    # no arterial_calcification finding -> no coronary calcification (the report may say none)
    _, c2 = _pair(Variation(calcification={"coronary": 1.0}), seed=8, sp=3.0, findings=[])
    assert "coronary" not in c2.meta["variation"]["patient"]["calcification"]
    assert "coronary" not in c2.report.lower()


def test_incidental_sentences_assert_no_finding():
    """The report parser (training labels from text) reads no finding into an incidental sentence."""
    from ctlanguage.phantom.report_writer import INCIDENTAL
    from ctlanguage.training.report_parsing import parse_report

    texts = [t.format(n="Three", lobe="left lower lobe", side="left") for one, many in INCIDENTAL.values()
             for t in one + many]
    assert len(texts) >= 10
    for t in texts:
        assert not any(parse_report("FINDINGS: " + t).labels.values()), t


def test_full_preset_manifest_record_and_bad_fields(tmp_path):
    stats = write_corpus(str(tmp_path / "c"), n=1, seed=30021, spacing=6.0, montage=False, variation="full")
    recs = [json.loads(line) for line in open(stats["manifest"])]
    for r in recs:
        v = r["phantom"]["variation"]
        assert {"arms", "table", "fat_mm", "visceral_fat", "deform_mm", "calcification", "patient"} <= set(v)
        assert v["patient"]["table_voxels"] >= 0
    for bad in (Variation(arms={"sideways": 1}), Variation(table=1.5), Variation(fat_mm=(10.0, 5.0)),
                Variation(deform_mm=(0.0, 30.0)), Variation(calcification={"kidney": 0.5})):
        with pytest.raises(InputError):
            generate_case(1, spacing=6.0, variation=bad)
    assert "full" in PRESETS and PRESETS["full"].fov == PRESETS["realistic"].fov
    from ctlanguage.cli import main

    assert main(["--quiet", "phantom", "--n", "1", "--seed", "30002", "--spacing", "6", "--no-montage",
                 "--variation", "full", "--out", str(tmp_path / "cli")]) == 0
