"""Vocabulary: keys match the architecture contract, codes are sourced, phrasings are usable."""

import collections
import csv
import json
import re

import pytest

import ctlanguage.segment_codes as C
from ctlanguage import vocabulary as v
from ctlanguage.prompts import _tokens
from ctlanguage.resources import package_data_dir

ARCH = (package_data_dir().parents[2] / "docs" / "architecture.md")


def _arch_keys(label):
    text = ARCH.read_text()
    block = text.split(f"{label}:", 1)[1].split("\n\n", 1)[0]
    if label == "Anatomies":
        return re.findall(r"\b([a-z_]+)\b", block.split(".", 1)[0].replace("`", " "))
    return re.findall(r"`([a-z_]+) ->", block)


def test_keys_match_architecture():
    assert v.anatomies() == _arch_keys("Anatomies")
    assert v.findings() == _arch_keys("Findings (key -> anatomy it is judged in)")
    assert len(v.anatomies()) >= 15 and len(v.findings()) >= 15


@pytest.mark.parametrize("finding,lat,anatomy", [
    ("pleural_effusion", "left", "pleural_space_left"), ("lung_nodule", "right", "lung_right"),
    ("kidney_stone", "left", "kidney_left"), ("kidney_cyst", "right", "kidney_right"),
    ("cardiomegaly", None, "heart"), ("pericardial_effusion", None, "pericardium"),
    ("ascites", None, "peritoneal_cavity"), ("lymphadenopathy", None, "body"),
    ("gallstone", None, "gallbladder"), ("steatosis", "left", "liver"),
])
def test_resolve_anatomy(finding, lat, anatomy):
    assert v.resolve_anatomy(finding, lat) == anatomy


def test_resolve_anatomy_sided_needs_side_and_rejects_bad_laterality():
    with pytest.raises(v.VocabularyError, match="laterality"):
        v.resolve_anatomy("pleural_effusion", None)
    assert v.resolve_anatomies("pleural_effusion") == ("pleural_space_left", "pleural_space_right")
    with pytest.raises(v.VocabularyError):
        v.resolve_anatomy("lung_nodule", "middle")
    with pytest.raises(v.VocabularyError, match="not a CTLanguage"):
        v.get("toenail")


def test_every_term_has_display_synonyms_colour_and_category():
    for key in v.anatomies() + v.findings():
        t = v.get(key)
        assert t.display and t.synonyms
        assert len(t.color) == 3 and all(0 <= c <= 255 for c in t.color)
        assert t.category.known and t.category.source
    for key in v.findings():
        assert v.get(key).lay, f"{key} needs lay phrasings"


def _ts_mapping():
    """{code value: meanings} from the TotalSegmentator mapping, if its wheel was unpacked on
    this machine (optional: TotalSegmentator is not a dependency)."""
    import glob
    import importlib.util
    paths = glob.glob("/tmp/ts/**/totalsegmentator_snomed_mapping.csv", recursive=True)
    spec = importlib.util.find_spec("totalsegmentator")
    if spec and spec.origin:
        paths = glob.glob(spec.origin.replace("__init__.py", "resources/*snomed_mapping.csv")) + paths
    if not paths:
        return None
    out = collections.defaultdict(set)
    with open(paths[0]) as f:
        for row in csv.reader(f):
            for i in (2, 5, 8, 11, 14):   # category, type, type modifier, region, region modifier
                if len(row) > i + 1 and row[i].isdigit():
                    out[row[i]].add(row[i + 1].lower())
    return out


def _pydicom_meanings():
    """{SCT code value: meanings} over all of pydicom's SR concept tables."""
    from pydicom.sr._concepts_dict import concepts
    out = collections.defaultdict(set)
    for entries in concepts["SCT"].values():
        for value, (meaning, _cids) in entries.items():
            out[value].add(meaning.lower())
    return out


def _all_codes():
    mods = v._load()[2]
    yield "modifiers", mods["left"]
    yield "modifiers", mods["right"]
    yield "fallback", mods["_fallback_type"]
    for key in v.all_anatomies() + v.findings():
        t = v.get(key)
        for c in (t.category, t.type, t.region, t.type_modifier):
            if c is not None:
                yield key, c


def test_codes_are_sourced_and_match_their_source():
    pd = _pydicom_meanings()
    ts = _ts_mapping()
    checked = 0
    for key, c in _all_codes():
        if not c.known:
            assert c.note, f"{key}: a missing code must say why"
            continue
        assert c.scheme == "SCT" and c.value.isdigit() and c.meaning and c.source, (key, c)
        assert "pydicom" in c.source or "totalsegmentator" in c.source, (key, c.source)
        if "pydicom" in c.source:
            assert c.meaning.lower() in pd[c.value], (key, c, pd[c.value])
            checked += 1
        elif ts is not None:
            assert c.meaning.lower() in ts[c.value], (key, c, ts[c.value])
            checked += 1
    assert checked >= 20


def test_slicer_terminology_string_format():
    s = C.slicer_terminology_string("kidney_left")
    parts = s.split("~")
    assert len(parts) == 7
    assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert parts[1] == "SCT^123037004^Anatomical Structure"
    assert parts[2] == "SCT^64033007^Kidney" and parts[3] == "SCT^7771000^Left"
    assert parts[4] == "Anatomic codes - DICOM master list" and parts[5] == "^^"
    f = C.slicer_terminology_string("pleural_effusion", "right").split("~")
    assert f[1] == "SCT^49755003^Morphologically Altered Structure"
    assert f[2] == "SCT^41699000^Effusion" and f[5] == "SCT^91381003^Pleural cavity"
    assert f[6] == "SCT^24028007^Right"
    b = C.slicer_terminology_string("pleural_effusion", "bilateral").split("~")
    assert b[6] == "SCT^51440002^Bilateral"
    # the middle lobe's type already says "right": no extra modifier
    assert C.slicer_terminology_string("lung_middle_lobe_right").split("~")[3] == "^^"


def test_slicer_terminology_string_round_trips_through_slicer():
    slicer = pytest.importorskip("slicer")
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for key, lat in (("liver", None), ("lung_left", None), ("kidney_cyst", "left"), ("ascites", None)):
        s = C.slicer_terminology_string(key, lat)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(s, entry)
        assert entry.GetTypeObject().GetCodeValue() == C.dicom_seg_codes(key, lat)["type"][0]
        assert logic.SerializeTerminologyEntry(entry) == s


def test_dicom_seg_codes_usable_by_highdicom():
    hd = pytest.importorskip("highdicom")
    for key in v.anatomies() + v.findings():
        lats = ("left", "right") if v.get(key).kind == "finding" and v.get(key).sided else (None,)
        for lat in lats:
            d = C.dicom_seg_codes(key, lat)
            assert d["category"] and d["type"]
            for field in ("category", "type", "type_modifier", "anatomic_region"):
                if d[field]:
                    hd.sr.CodedConcept(*d[field])
            if lat:
                assert d["anatomic_region_modifier"][2].lower() == lat
    assert C.dicom_seg_codes("emphysema", "left")["complete"] is False
    assert C.dicom_seg_codes("emphysema", "left")["notes"]
    assert C.dicom_seg_codes("liver_cyst")["complete"] is True


def test_training_phrases_and_ensemble():
    tp = v.training_phrases("pleural_effusion", "left")
    assert "left pleural effusion" in tp and "fluid around the left lung" in tp
    assert all("right" not in p for p in tp) and all("{" not in p for p in tp)
    assert "water on the lung" in v.training_phrases("pleural_effusion")
    pos, neg = v.prompt_ensemble("pleural_effusion", "right")
    assert len(pos) >= 3 and len(neg) >= 2
    assert all("right" in p for p in pos + neg)
    assert all(p.startswith(("no ", "the ", "normal")) or " no " in p for p in neg)
    assert not set(pos) & set(neg)
    for f in v.findings():
        pos, neg = v.prompt_ensemble(f, "left" if v.get(f).sided else None)
        assert len(pos) >= 3 and len(neg) >= 2, f
    with pytest.raises(v.VocabularyError):
        v.prompt_ensemble("liver")
    assert "enlarged heart" in v.training_phrases("cardiomegaly")
    assert "fatty liver" in v.training_phrases("steatosis")
    assert "left lung" in v.training_phrases("lung_left")


def _norm(text):
    return tuple(w for w in _tokens(text) if w not in ("the", "a", "an"))


def test_heldout_paraphrases_are_disjoint_from_training():
    data = json.loads((package_data_dir() / "paraphrases_heldout.json").read_text())
    items = data["items"]
    assert len(items) >= 40
    training = {_norm(p) for p in v.all_training_phrases()}
    for it in items:
        assert _norm(it["text"]) not in training, it["text"]
        assert it["kind"] in ("finding", "anatomy")
        t = v.get(it["key"])
        assert t.kind == it["kind"]
        if it["laterality"]:
            assert (t.sided if t.kind == "finding" else t.side == it["laterality"])
    # every finding is exercised at least once
    assert {it["key"] for it in items if it["kind"] == "finding"} == set(v.findings())


def test_vocabulary_file_validation_catches_errors(tmp_path, monkeypatch):
    raw = json.loads((package_data_dir() / "vocabulary.json").read_text())
    raw["findings"]["ascites"]["type"]["source"] = None
    (tmp_path / "vocabulary.json").write_text(json.dumps(raw))
    monkeypatch.setattr(v, "package_data_dir", lambda: tmp_path)
    v._load.cache_clear()
    try:
        with pytest.raises(v.VocabularyError, match="ascites"):
            v._load()
        del raw["anatomies"]["spleen"]
        raw["findings"]["ascites"]["type"]["source"] = "x"
        (tmp_path / "vocabulary.json").write_text(json.dumps(raw))
        v._load.cache_clear()
        with pytest.raises(v.VocabularyError, match="spleen"):
            v._load()
    finally:
        monkeypatch.undo()
        v._load.cache_clear()
    assert v.get("spleen").display == "Spleen"
