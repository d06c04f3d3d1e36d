"""Phrase plans for training: organ/finding phrasings (vocabulary.training_phrases), per-anatomy
report texts, abnormality dictionary, prompt ensembles. Held-out paraphrases are never used."""

from __future__ import annotations

import json
from functools import lru_cache

from .. import vocabulary as V
from ..resources import package_data_dir

# anatomies that findings are judged in (report-sentence / presence targets)
SIDED = ("left", "right")


@lru_cache(maxsize=1)
def heldout_phrases() -> frozenset:
    """Every string in data/paraphrases_heldout.json (lower case), never used in training."""
    path = package_data_dir() / "paraphrases_heldout.json"
    out = set()
    if not path.is_file():
        return frozenset()

    def walk(x):
        if isinstance(x, str):
            out.add(x.strip().lower())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(path.read_text()))
    return frozenset(out)


def _clean(phrases):
    bad = heldout_phrases()
    out = [p for p in phrases if p.strip().lower() not in bad]
    return out or list(phrases[:1])


@lru_cache(maxsize=None)
def phrases_for(key: str, laterality: str | None = None) -> tuple:
    return tuple(_clean(V.training_phrases(key, laterality)))


@lru_cache(maxsize=None)
def ensemble_for(finding: str, laterality: str | None = None) -> tuple:
    pos, neg = V.prompt_ensemble(finding, laterality)
    return tuple(_clean(pos)), tuple(_clean(neg))


def finding_items() -> list[tuple[str, str | None, str]]:
    """(finding, laterality, concrete anatomy) for every finding x side."""
    items = []
    for f in V.FINDING_KEYS:
        if V.is_sided(f):
            for s in SIDED:
                items.append((f, s, V.resolve_anatomy(f, s)))
        else:
            items.append((f, None, V.resolve_anatomy(f, None)))
    return items


def judged_anatomies() -> list[str]:
    return list(dict.fromkeys(a for _, _, a in finding_items()))


def normal_sentence(anatomy: str) -> str:
    return f"{V.display_name(anatomy).lower()} shows no significant abnormalities"


def finding_sentence(finding: str, laterality: str | None, rng) -> str:
    ph = phrases_for(finding, laterality)
    return ph[int(rng.integers(len(ph)))]


@lru_cache(maxsize=1)
def abnormality_dictionary() -> tuple:
    """(sentence, finding, laterality) for all training phrasings of every finding x side."""
    out = []
    for f, s, _ in finding_items():
        for p in phrases_for(f, s):
            out.append((p, f, s))
    return tuple(out)
