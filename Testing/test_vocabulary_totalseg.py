"""TotalSegmentator's 117 'total' classes in the vocabulary: codes equal to its own mapping file,
unions of our core anatomies, and the prompt phrasings that reach them."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import ctlanguage.segment_codes as C
from ctlanguage import vocabulary as v
from ctlanguage.prompts import parse_prompt
from ctlanguage.resources import package_data_dir

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"category": "SegmentedPropertyCategoryCodeSequence",
          "type": "SegmentedPropertyTypeCodeSequence",
          "type_modifier": "SegmentedPropertyTypeModifierCodeSequence",
          "anatomic_region": "AnatomicRegionSequence",
          "anatomic_region_modifier": "AnatomicRegionModifierSequence"}


def test_every_total_class_has_our_term_with_totalsegmentators_codes():
    ts = pytest.importorskip("totalsegmentator")
    from importlib import resources

    from totalsegmentator.map_to_binary import class_map

    path = resources.files(ts) / "resources" / "totalsegmentator_snomed_mapping.csv"
    with path.open(encoding="utf-8") as f:
        rows = {r["Structure"]: r for r in csv.DictReader(f)}
    total = class_map["total"]
    assert len(total) == 117
    assert v.totalseg_classes() == {name: label for label, name in total.items()}
    for name in total.values():
        assert name in v.all_anatomies(), name
        codes = C.dicom_seg_codes(name)
        row = rows[name]
        for ours, attr in FIELDS.items():
            want = row[f"{attr}.CodeValue"].strip()
            got = codes[ours]
            if want:
                assert got is not None and got[:2] == (want, row[f"{attr}.CodingSchemeDesignator"]), (name, ours)
                assert got[2] == row[f"{attr}.CodeMeaning"], (name, ours)
            else:
                assert got is None, (name, ours, got)
        assert list(v.color(name)) == [int(c) for c in row["DicomRGBColor"].split(",")], name


def test_committed_class_file_is_what_the_generator_writes():
    pytest.importorskip("totalsegmentator")
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "make_totalseg_classes.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = json.loads((package_data_dir() / "totalseg_total.json").read_text())
    assert gen.build() == committed


def test_class_file_facts_without_the_package():
    facts = json.loads((package_data_dir() / "totalseg_total.json").read_text())
    assert "totalsegmentator" in facts["source"] and facts["task"] == "total"
    labels = [c["label"] for c in facts["classes"]]
    assert labels == list(range(1, 118))
    for c in facts["classes"]:
        t = v.get(c["name"])
        assert t.kind == "anatomy" and t.type.value == c["type"]["value"]
        assert t.type.source and "totalsegmentator" in (t.category.source + t.type.source)
    # core keys that are TotalSegmentator classes keep one key and one code
    for key in ("liver", "kidney_left", "aorta", "lung_middle_lobe_right", "heart"):
        assert key in v.anatomies() and key in v.totalseg_classes()
        assert v.components(key) == (key,)


def test_core_anatomies_are_unions_of_classes():
    ts = v.totalseg_classes()
    assert v.components("lung_left") == ("lung_upper_lobe_left", "lung_lower_lobe_left")
    assert set(v.components("lung_right")) == {
        "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}
    spine = v.components("spine")
    assert len(spine) == 26 and "vertebrae_T12" in spine and "sacrum" in spine
    assert set(spine) <= set(ts) and "spinal_cord" not in spine
    ribs = v.components("ribs")
    assert len(ribs) == 24 and set(ribs) == {n for n in ts if n.startswith("rib_")}
    assert v.components("ribs_left") == tuple(f"rib_left_{i}" for i in range(1, 13))
    # core anatomies TotalSegmentator does not segment have no classes
    for key in ("body", "pleural_space_left", "pericardium", "peritoneal_cavity"):
        assert v.components(key) == (key,) and key not in ts
    # the embedded model's 25 keys are unchanged
    assert v.anatomies() == list(v.ANATOMY_KEYS) and len(v.anatomies()) == 25
    assert len(v.all_anatomies()) == 25 + (117 - 16) + 3


def test_sides_and_groups():
    assert v.get("rib_left_5").side == "left" and v.get("adrenal_gland_right").side == "right"
    assert v.resolve_anatomies("adrenal_gland") == ("adrenal_gland_left", "adrenal_gland_right")
    assert v.resolve_anatomies("rib_5", "right") == ("rib_right_5",)
    assert v.get("vertebrae_T12").side is None and v.get("atrial_appendage_left").side == "left"
    # the finding key kidney_cyst is no group: its TotalSegmentator classes stay sided keys
    assert "kidney_cyst" not in v.groups() and v.get("kidney_cyst_left").side == "left"
    assert C.dicom_seg_codes("kidney_cyst_left")["anatomic_region_modifier"][2] == "Left"
    assert C.dicom_seg_codes("kidney_cyst_left")["type_modifier"] is None


@pytest.mark.parametrize("text,covers,laterality", [
    ("lungs", ("lung_left", "lung_right"), None),
    ("both lungs", ("lung_left", "lung_right"), "bilateral"),
    ("ribs", ("ribs",), None),
    ("left ribs", ("ribs_left",), "left"),
    ("spine", ("spine",), None),
    ("vertebrae", ("spine",), None),
    ("show me the left kidney", ("kidney_left",), "left"),
    ("T12", ("vertebrae_T12",), None),
    ("the twelfth thoracic vertebra", ("vertebrae_T12",), None),
    ("L 1 vertebra", ("vertebrae_L1",), None),
    ("portal vein", ("portal_vein_and_splenic_vein",), None),
    ("the big vessel leaving the heart", ("aorta",), None),
    ("main artery", ("aorta",), None),
    ("right 5th rib", ("rib_right_5",), "right"),
    ("fifth rib on the left", ("rib_left_5",), "left"),
    ("adrenal glands", ("adrenal_gland_left", "adrenal_gland_right"), None),
    ("left adrenal", ("adrenal_gland_left",), "left"),
    ("IVC", ("inferior_vena_cava",), None),
    ("collarbone", ("clavicula_left", "clavicula_right"), None),
    ("gall bladder", ("gallbladder",), None),
    ("urinary bladder", ("urinary_bladder",), None),
    ("cervical spine", ("cervical_spine",), None),
])
def test_prompt_phrasings_reach_totalsegmentator_anatomy(text, covers, laterality):
    p = parse_prompt(text)
    assert (p.kind, p.anatomies, p.laterality) == ("anatomy", covers, laterality), p
    assert p.confidence >= 0.9


def test_every_new_anatomy_is_promptable_by_its_names():
    core = set(v.anatomies())
    wrong = []
    for key in v.all_anatomies():
        if key in core:
            continue
        t = v.get(key)
        names = [t.display] + [f"{t.side or ''} {s}" for s in t.synonyms + t.abbreviations]
        for name in names:
            p = parse_prompt(name)
            if key.startswith("kidney_cyst_"):   # the finding wins; its anatomy is the kidney
                ok = p.finding == "kidney_cyst" and p.laterality == t.side
            else:
                ok = p.kind == "anatomy" and p.anatomies == (key,)
            if not ok:
                wrong.append((name, key, p.anatomies, p.finding))
    assert not wrong, wrong[:20]
