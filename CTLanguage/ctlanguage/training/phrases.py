"""Phrase plans for training: organ/finding phrasings (vocabulary.training_phrases), per-anatomy
report texts, abnormality dictionary, prompt ensembles. Held-out paraphrases are never used."""

from __future__ import annotations

from functools import lru_cache

from .. import phrases as P
from .. import vocabulary as V

# anatomies that findings are judged in (report-sentence / presence targets)
SIDED = ("left", "right")


# the inference contract (canonical phrases, ensembles, held-out paraphrases) lives in
# ctlanguage.phrases; these names keep the training code's vocabulary
heldout_phrases = P.heldout_phrases
phrases_for = P.phrasings
ensemble_for = P.ensemble


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


# wordings of "this organ is normal"; the first is the one sentence of v1-v3 training. With one
# fixed sentence, false-negative calibration is a no-op (identical texts already share their
# loss; docs/model_comparison.md), so losses.varied_normal_sentences draws among all of them.
NORMAL_TEMPLATES = ("{} shows no significant abnormalities", "{} is unremarkable",
                    "no abnormality of the {}", "normal {}", "{}: within normal limits",
                    "the {} appears normal")


def normal_sentence(anatomy: str, rng=None) -> str:
    t = NORMAL_TEMPLATES[0] if rng is None else NORMAL_TEMPLATES[int(rng.integers(len(NORMAL_TEMPLATES)))]
    return t.format(P.canonical_phrase(anatomy))


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
