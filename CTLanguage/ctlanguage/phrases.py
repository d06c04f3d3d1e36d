"""Canonical phrases and prompt ensembles: the inference contract between text and model.

The engine drives the mask head with :func:`canonical_phrase` and scores presence with
:func:`ensemble`; training uses exactly these (it imports this module, never the other way
round), so the calibration fitted after training holds at inference. Held-out paraphrases
(``data/paraphrases_heldout.json``, used to measure paraphrase robustness) are never part of an
ensemble or a training phrasing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional

from . import vocabulary as V
from .resources import package_data_dir


def canonical_phrase(key: str, laterality: Optional[str] = None) -> str:
    """The one text a concept is driven with ("left pleural effusion", "liver")."""
    lat = laterality if laterality in ("left", "right") else None
    return V.display_name(key, lat).lower()


@lru_cache(maxsize=1)
def heldout_phrases() -> frozenset:
    """Every string in data/paraphrases_heldout.json (lower case)."""
    path = package_data_dir() / "paraphrases_heldout.json"
    out: set = set()
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


def _clean(phrases) -> list:
    bad = heldout_phrases()
    out = [p for p in phrases if p.strip().lower() not in bad]
    return out or list(phrases[:1])


@lru_cache(maxsize=None)
def phrasings(key: str, laterality: Optional[str] = None) -> tuple:
    """Training phrasings of a concept (held-out paraphrases removed)."""
    return tuple(_clean(V.training_phrases(key, laterality)))


@lru_cache(maxsize=None)
def ensemble(finding: str, laterality: Optional[str] = None) -> tuple:
    """(positive phrasings, negated phrasings) for presence scoring (held-out ones removed)."""
    pos, neg = V.prompt_ensemble(finding, laterality)
    return tuple(_clean(pos)), tuple(_clean(neg))
