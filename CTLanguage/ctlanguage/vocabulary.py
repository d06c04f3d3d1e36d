"""Clinical vocabulary: anatomies, findings, phrasings, colours and SNOMED CT codes.

The data live in ``data/vocabulary.json`` (loaded once, validated, cached). Phrases in the JSON
may contain ``{side}``; it is replaced by "left"/"right" or removed for unsided use.

Keys are the stable identifiers of docs/architecture.md. Sided anatomies (``lung_left``) belong
to a *group* (``lung``); sided findings name the group as their anatomy and are resolved to a
concrete key with :func:`resolve_anatomy`.

Beyond the 25 core anatomies (``ANATOMY_KEYS``, what the embedded model masks) every class of
TotalSegmentator's ``total`` task is an anatomy too: codes and colours from
``data/totalseg_total.json`` (generated from the installed package by
scripts/make_totalseg_classes.py), our phrasings, groups, union anatomies and the classes each
core anatomy is made of from ``data/anatomy_totalseg.json`` (:func:`all_anatomies`,
:func:`components`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

from .errors import CTLanguageError
from .resources import package_data_dir

SIDES = ("left", "right")
LATERALITIES = ("left", "right", "bilateral")

ANATOMY_KEYS = (
    "body", "lung_left", "lung_right", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "heart", "aorta",
    "esophagus", "trachea", "liver", "spleen", "kidney_left", "kidney_right", "gallbladder",
    "pancreas", "stomach", "spine", "ribs", "pleural_space_left", "pleural_space_right",
    "pericardium", "peritoneal_cavity",
)
FINDING_KEYS = (
    "lung_nodule", "lung_mass", "pleural_effusion", "emphysema", "consolidation", "atelectasis",
    "cardiomegaly", "pericardial_effusion", "aortic_aneurysm", "arterial_calcification",
    "liver_lesion", "liver_cyst", "steatosis", "hepatomegaly", "splenomegaly", "kidney_cyst",
    "kidney_stone", "ascites", "lymphadenopathy", "gallstone",
)


class VocabularyError(CTLanguageError):
    """The vocabulary file is inconsistent, or a key / laterality is not known."""


@dataclass(frozen=True)
class Code:
    """One coded concept: (value, scheme, meaning), plus where it was taken from."""

    value: Optional[str]
    scheme: str
    meaning: Optional[str]
    source: Optional[str] = None
    note: Optional[str] = None

    @property
    def known(self) -> bool:
        return bool(self.value)

    def triple(self):
        return (self.value, self.scheme, self.meaning)

    def slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}" if self.known else "^^"


@dataclass(frozen=True)
class Term:
    """One anatomy or finding."""

    key: str
    kind: str                      # "anatomy" | "finding"
    display: str
    color: tuple
    category: Code
    type: Code
    synonyms: tuple                # may contain "{side}"
    lay: tuple = ()
    negated: tuple = ()
    heads: tuple = ()              # head words that, next to an anatomy word, name this finding
    also_in: tuple = ()            # findings: other anatomies whose words may carry the head
                                   # word ("fluid around the lung")
    abbreviations: tuple = ()
    adjectives: tuple = ()         # anatomies: parser-only adjective forms ("hepatic")
    parts: tuple = ()              # anatomies: the anatomy keys this one is the union of
    side: Optional[str] = None     # anatomies: fixed side of a concrete sided structure
    group: Optional[str] = None    # anatomies: sided group ("lung"); findings: see anatomy
    anatomy: Optional[str] = None  # findings: anatomy key or group it is judged in
    sided: bool = False            # findings: needs left/right to resolve its anatomy
    region: Optional[Code] = None  # findings: anatomic region
    type_modifier: Optional[Code] = None
    mask_is_anatomy: bool = False  # findings: the finding's extent is its whole organ
                                   # (enlargement: cardiomegaly outlines the heart)


def _phrase(template: str, side: Optional[str]) -> str:
    text = template.replace("{side}", side or "")
    return re.sub(r"\s+", " ", text).strip()


def _code(d) -> Optional[Code]:
    if d is None:
        return None
    return Code(d.get("value"), d.get("scheme", "SCT"), d.get("meaning"), d.get("source"), d.get("note"))


@lru_cache(maxsize=1)
def _load():
    """(terms, groups, modifiers, slicer terminology contexts, extras) where extras holds
    ``extra_keys`` (non-core anatomy keys, in order), ``sided_parts`` and ``totalseg``
    ({class name: label} of TotalSegmentator's total task)."""
    raw = _read_json("vocabulary.json")
    groups = dict(raw["groups"])
    terms = {}
    for key, d in raw["anatomies"].items():
        terms[key] = _anatomy_term(key, d, _code(d["category"]), _code(d["type"]))
    for key, d in raw["findings"].items():
        typ = _code(d["type"])
        terms[key] = Term(
            key=key, kind="finding", display=d["display"], color=tuple(d["color"]),
            category=_code(d["category"]), type=typ, synonyms=tuple(d["synonyms"]),
            lay=tuple(d.get("lay", ())), negated=tuple(d.get("negated", ())),
            heads=tuple(d.get("heads", ())), also_in=tuple(d.get("also_in", ())),
            anatomy=d["anatomy"], sided=bool(d["sided"]),
            region=_code(d.get("region")), type_modifier=_code(d.get("type_modifier")),
            mask_is_anatomy=d.get("mask") == "anatomy")
    modifiers = {k: _code(v) for k, v in raw["modifiers"].items()}
    modifiers["_fallback_type"] = _code(raw["fallback_type"])
    _validate(terms, groups, modifiers)
    extras = _add_totalseg(terms, groups)
    return terms, groups, modifiers, raw["slicer_terminology"], extras


def _read_json(name: str) -> dict:
    path = package_data_dir() / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VocabularyError(f"Cannot read the vocabulary file {path}: {exc}.") from exc


def _anatomy_term(key, d, category, typ, **kw) -> Term:
    return Term(
        key=key, kind="anatomy", display=d["display"], color=tuple(d["color"]),
        category=category, type=typ, synonyms=tuple(d["synonyms"]), lay=tuple(d.get("lay", ())),
        abbreviations=tuple(d.get("abbreviations", ())), adjectives=tuple(d.get("adjectives", ())),
        side=d.get("side"), group=d.get("group"), parts=tuple(d.get("parts", ())), **kw)


def _add_totalseg(terms: dict, groups: dict) -> dict:
    """Add TotalSegmentator's classes, our union anatomies and groups to ``terms``/``groups``
    (in place); return the extras of :func:`_load`."""
    facts = _read_json("totalseg_total.json")
    ours = _read_json("anatomy_totalseg.json")
    src = facts["source"]
    coded = lambda c, what: Code(c["value"], c["scheme"], c["meaning"], f"{src} ({what})") if c else None  # noqa: E731
    extra_keys, ts = [], {}
    for c in facts["classes"]:
        name = c["name"]
        ts[name] = int(c["label"])
        cat, typ = coded(c["category"], name), coded(c["type"], name)
        if name in terms:   # a core anatomy: the codes must agree
            t = terms[name]
            if (t.category.value, t.type.value) != (cat.value, typ.value):
                raise VocabularyError(f"Core anatomy '{name}' is coded differently from TotalSegmentator.")
            continue
        d = ours["terms"].get(name)
        if d is None:
            raise VocabularyError(f"TotalSegmentator class '{name}' has no entry in anatomy_totalseg.json.")
        mod = c["region_modifier"] if c["region"] else c["type_modifier"]
        side = mod["meaning"].lower() if mod and mod["meaning"].lower() in SIDES else None
        terms[name] = _anatomy_term(
            name, {**d, "color": c["color"], "side": side}, cat, typ, region=coded(c["region"], name))
        extra_keys.append(name)
    for key, d in ours["aggregates"].items():
        color = list(terms[d["parts"][0]].color)
        terms[key] = _anatomy_term(key, {**d, "color": color}, _code(d["category"]), _code(d["type"]))
        extra_keys.append(key)
    for key, parts in ours["parts"].items():
        terms[key] = replace(terms[key], parts=tuple(parts))
    for key, lay in ours["lay"].items():
        terms[key] = replace(terms[key], lay=tuple(lay))
    groups.update(ours["groups"])
    extras = {"extra_keys": tuple(extra_keys), "sided_parts": ours["sided_parts"], "totalseg": ts}
    _validate_extras(terms, groups, extras)
    return extras


def _validate_extras(terms, groups, extras):
    for name, g in groups.items():
        if name in terms:
            raise VocabularyError(f"Group name '{name}' is also a term key.")
        for side in SIDES:
            if side in g and (g[side] not in terms or terms[g[side]].side != side):
                raise VocabularyError(f"Group '{name}' maps {side} to an unknown or wrong-sided key.")
    for key, sides in extras["sided_parts"].items():
        for side, part in sides.items():
            if part not in terms or terms[part].side != side:
                raise VocabularyError(f"'{key}' names an unknown or wrong-sided {side} part '{part}'.")
    for key in extras["extra_keys"]:
        t = terms[key]
        _check_term(t)
        if not t.synonyms or any(w in _SIDE_WORDS for s in t.synonyms for w in s.lower().split()):
            raise VocabularyError(f"Anatomy '{key}' needs synonyms without side words.")
    for t in terms.values():
        for p in t.parts:
            if p not in terms or terms[p].kind != "anatomy" or p == t.key:
                raise VocabularyError(f"Anatomy '{t.key}' is made of unknown part '{p}'.")
    for t in terms.values():   # every union ends in TotalSegmentator classes (no cycles)
        if t.parts and not set(_components(terms, t.key, 0)) <= set(extras["totalseg"]):
            raise VocabularyError(f"Anatomy '{t.key}' does not resolve to TotalSegmentator classes.")


_SIDE_WORDS = {"left", "right", "bilateral"}


def _components(terms, key, depth):
    if depth > 8:
        raise VocabularyError(f"Anatomy '{key}' is part of itself.")
    t = terms[key]
    if not t.parts:
        return (key,)
    return tuple(c for p in t.parts for c in _components(terms, p, depth + 1))


def _check_term(t: Term):
    key = t.key
    if not t.synonyms:
        raise VocabularyError(f"Term '{key}' has no synonyms.")
    if len(t.color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in t.color):
        raise VocabularyError(f"Term '{key}' has an invalid RGB colour {t.color}.")
    for c in (t.category, t.type, t.region, t.type_modifier):
        if c is not None and not c.known and not c.note:
            raise VocabularyError(f"Term '{key}' has a missing code without a note saying why.")
        if c is not None and c.known and not (c.source and c.meaning and c.value.isdigit()):
            raise VocabularyError(f"Term '{key}' has a code without source or meaning: {c}.")
    if not t.category.known:
        raise VocabularyError(f"Term '{key}' has no segmented property category code.")


def _validate(terms, groups, modifiers):
    anat = [k for k, t in terms.items() if t.kind == "anatomy"]
    find = [k for k, t in terms.items() if t.kind == "finding"]
    if set(anat) != set(ANATOMY_KEYS) or set(find) != set(FINDING_KEYS):
        raise VocabularyError(
            "vocabulary.json keys differ from docs/architecture.md: missing "
            f"{sorted(set(ANATOMY_KEYS + FINDING_KEYS) - set(terms))}, extra "
            f"{sorted(set(terms) - set(ANATOMY_KEYS + FINDING_KEYS))}.")
    if not (modifiers.get("_fallback_type") and modifiers["_fallback_type"].known):
        raise VocabularyError("vocabulary.json lacks a usable fallback_type code.")
    for side in SIDES:
        if side not in modifiers:
            raise VocabularyError(f"vocabulary.json lacks the '{side}' modifier code.")
    for name, g in groups.items():
        for side in SIDES:
            if side in g and (g[side] not in terms or terms[g[side]].side != side):
                raise VocabularyError(f"Group '{name}' maps {side} to an unknown or wrong-sided key.")
    for key, t in terms.items():
        _check_term(t)
        if t.kind == "finding":
            if t.sided and t.anatomy not in groups:
                raise VocabularyError(f"Sided finding '{key}' must name an anatomy group.")
            if not t.sided and t.anatomy not in terms:
                raise VocabularyError(f"Finding '{key}' is judged in unknown anatomy '{t.anatomy}'.")


# ----------------------------------------------------------------------------------- lookups

def anatomies() -> list:
    """Anatomy keys, in the order of docs/architecture.md."""
    return list(ANATOMY_KEYS)


def findings() -> list:
    """Finding keys, in the order of docs/architecture.md."""
    return list(FINDING_KEYS)


def all_anatomies() -> list:
    """Every promptable anatomy key: the core ones, then TotalSegmentator's classes and the
    unions built from them (backends say which of these they can mask)."""
    return list(ANATOMY_KEYS) + list(_load()[4]["extra_keys"])


def components(key: str) -> tuple:
    """The finest anatomy keys ``key`` is made of, e.g. lung_left -> its two lobes, spine ->
    C1 ... S1 and the sacrum; a key without parts is its own component. For TotalSegmentator
    these are class names (see :func:`totalseg_classes`)."""
    terms = _load()[0]
    get(key)
    return _components(terms, key, 0)


def sided_part(key: str, side: Optional[str]) -> Optional[str]:
    """The one-sided anatomy of an unsided one ("ribs", "left") -> "ribs_left"; None if none."""
    return _load()[4]["sided_parts"].get(key, {}).get(side)


def totalseg_classes() -> dict:
    """{class name: label number} of TotalSegmentator's ``total`` task (totalseg_total.json)."""
    return dict(_load()[4]["totalseg"])


def groups() -> dict:
    """Sided anatomy groups: {"lung": {"display":..., "left": "lung_left", "right": "lung_right"}}."""
    return {k: dict(v) for k, v in _load()[1].items()}


def get(key: str) -> Term:
    terms = _load()[0]
    if key not in terms:
        raise VocabularyError(f"'{key}' is not a CTLanguage anatomy or finding key.")
    return terms[key]


def is_sided(key: str) -> bool:
    """True for sided findings and for anatomy keys/groups that have a side."""
    if key in _load()[1]:
        return True
    t = get(key)
    return t.sided if t.kind == "finding" else t.side is not None


def _check_laterality(laterality):
    if laterality is not None and laterality not in LATERALITIES:
        raise VocabularyError(f"Laterality must be one of {LATERALITIES} or None, not {laterality!r}.")


def resolve_anatomies(key: str, laterality: Optional[str] = None) -> tuple:
    """Concrete anatomy keys for a finding, group or anatomy; unsided -> both sides."""
    _check_laterality(laterality)
    grps = _load()[1]
    if key in grps:
        group = key
    else:
        t = get(key)
        if t.kind == "anatomy":
            return (key,)
        if not t.sided:
            return (t.anatomy,)
        group = t.anatomy
    sides = [laterality] if laterality in SIDES else list(SIDES)
    return tuple(grps[group][s] for s in sides if s in grps[group])


def resolve_anatomy(finding_key: str, laterality: Optional[str] = None) -> str:
    """The one concrete anatomy key a finding (or group) is judged in, e.g.
    ('pleural_effusion', 'left') -> 'pleural_space_left'. Sided findings need left or right."""
    keys = resolve_anatomies(finding_key, laterality)
    if len(keys) != 1:
        raise VocabularyError(
            f"'{finding_key}' is sided: give laterality 'left' or 'right' to resolve its anatomy "
            f"(use resolve_anatomies for both sides).")
    return keys[0]


def color(key: str) -> tuple:
    return get(key).color


# ---------------------------------------------------------------------------------- phrasings

def _side_for(t: Term, laterality: Optional[str]) -> Optional[str]:
    _check_laterality(laterality)
    if t.kind == "anatomy":
        return t.side
    return laterality if (t.sided and laterality in SIDES) else None


def display_name(key: str, laterality: Optional[str] = None) -> str:
    t = get(key)
    side = _side_for(t, laterality)
    if t.kind == "finding" and side:
        return f"{side.capitalize()} {t.display[0].lower()}{t.display[1:]}"
    return t.display


def _dedupe(seq):
    seen, out = set(), []
    for s in seq:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def training_phrases(key: str, laterality: Optional[str] = None) -> list:
    """Phrasings used to train the text side of the model (lower case, deduplicated)."""
    t = get(key)
    side = _side_for(t, laterality)
    if t.kind == "anatomy":
        base = list(t.synonyms)
        if side:
            out = [f"{side} {s}" for s in base] + [f"{s} on the {side}" for s in base[:1]]
        else:
            out = base
        out += [a for a in t.abbreviations if len(a) > 3]  # "lingula"; 3-letter codes stay parser-only
        return _dedupe([t.display.lower()] + out)
    phrases = [_phrase(p, side) for p in t.synonyms + t.lay]
    return _dedupe([display_name(key, laterality).lower()] + phrases)


def negated_phrases(key: str, laterality: Optional[str] = None) -> list:
    t = get(key)
    side = _side_for(t, laterality)
    if t.kind == "anatomy":
        return [f"no {p}" for p in training_phrases(key, laterality)[:2]]
    return _dedupe(_phrase(p, side) for p in t.negated)


def prompt_ensemble(finding: str, laterality: Optional[str] = None, n: int = 6) -> tuple:
    """(positive phrases, negated phrases) for zero-shot presence scoring: a few clinical
    phrasings and one lay phrasing, against the explicit negatives ("no left pleural effusion",
    "the left pleural space is clear")."""
    t = get(finding)
    if t.kind != "finding":
        raise VocabularyError(f"'{finding}' is an anatomy; prompt ensembles are built for findings.")
    side = _side_for(t, laterality)
    clinical = [_phrase(p, side) for p in t.synonyms]
    lay = [_phrase(p, side) for p in t.lay]
    pos = _dedupe([display_name(finding, laterality).lower()] + clinical[: max(1, n - 2)] + lay[:1])
    return pos[:n], negated_phrases(finding, laterality)[:n]


def all_training_phrases() -> set:
    """Every phrase any call of training_phrases / prompt_ensemble can return."""
    out = set()
    for key in ANATOMY_KEYS + FINDING_KEYS:
        lats = [None] + (list(SIDES) if get(key).kind == "finding" and get(key).sided else [])
        for lat in lats:
            out.update(training_phrases(key, lat))
            out.update(negated_phrases(key, lat))
    return out
