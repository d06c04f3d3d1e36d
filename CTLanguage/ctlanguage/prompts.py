"""Rule-based prompt parser: free text -> {anatomy, finding, laterality, negated} + confidence.

Steps: normalise (ASCII fold, lower case, truncate), tokenise, lemmatise plurals, pull out
laterality and negation words, correct typos against the vocabulary lexicon (difflib, lower
confidence), then match vocabulary phrases longest-first. Where no whole phrase matches, an
anatomy word plus a finding head word ("hepatic" + "mass") composes a finding. Text that
matches nothing comes back ``kind="unknown"`` with low confidence; it is never forced onto the
nearest term (the engine may still try its embedding index, see :func:`vocabulary_phrases`).
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from . import vocabulary as vocab
from .errors import PromptError

MAX_CHARS = 1000   # longer prompts are cut at a word boundary
MAX_TOKENS = 40

_LEFT = {"left", "l", "lt", "sinistral"}
_RIGHT = {"right", "r", "rt", "dextral"}
_BOTH = {"bilateral", "bilaterally", "both", "bibasilar", "bibasal"}
_NEG = {"no", "not", "without", "absence", "absent", "never", "nor", "none"}
_NEG_BEFORE_OF = {"free", "negative", "clear"}   # negation only as "free of", "negative for"...
_STOP = {
    "the", "a", "an", "of", "in", "on", "at", "to", "for", "and", "or", "with", "within", "around",
    "about", "is", "are", "be", "there", "any", "show", "me", "find", "segment", "highlight",
    "mark", "outline", "where", "please", "do", "does", "did", "patient", "have", "has", "sign",
    "evidence", "this", "that", "scan", "ct", "see", "can", "you", "i", "it", "its", "my",
    "side", "sided", "what", "which", "look", "seen", "present", "region", "area", "structure",
    "size", "by", "from", "into",
}
# words that qualify a term without changing what it is: unmatched, they cost nothing
_QUALIFIERS = {
    "small", "tiny", "mild", "mildly", "moderate", "severe", "large", "massive", "minimal",
    "trace", "simple", "focal", "multiple", "several", "single", "subcentimeter", "new", "old",
    "possible", "probable", "likely", "suspected", "suspicious", "chronic", "acute", "known",
    "mediastinal", "hilar", "diffuse", "scattered", "few", "some", "lesion", "lobe", "lobar",
    "upper", "lower", "middle", "base", "basal", "apical", "apex", "segmental", "subsegmental",
}
# a head word alone that radiologists read one way ("nodules" are lung nodules)
_HEAD_DEFAULTS = {"nodule": "lung_nodule", "nodular": "lung_nodule", "micronodule": "lung_nodule"}
_IRREGULAR = {
    "metastases": "metastasis", "calculi": "calculus", "bullae": "bulla", "vertebrae": "vertebra",
    "lymphadenopathies": "lymphadenopathy", "diagnoses": "diagnosis", "ribs": "rib",
    "oesophagus": "esophagus", "tumour": "tumor", "tumours": "tumor", "haemopericardium":
    "hemopericardium", "nodes": "node", "glands": "gland", "lungs": "lung",
}
_KEEP = {"ascites", "emphysema", "thorax", "hydrothorax", "pancreas", "esophagus", "atelectasis",
         "steatosis", "nephrolithiasis", "cholelithiasis", "cholecystolithiasis", "metastasis",
         "calculus", "lymphadenopathy", "splenomegaly", "hepatomegaly", "cardiomegaly", "gas",
         "was", "has", "is", "this", "its", "bus", "us", "plus", "hilus", "sinus", "status"}


@lru_cache(maxsize=65536)
def lemma(word: str) -> str:
    """Crude singular form for the vocabulary's English plurals."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _KEEP or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sss"):  # "masss": a naive plural of "mass"
        return word[:-1]
    if word.endswith(("sses", "ches", "shes", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _fold(text: str) -> str:
    """Lower-case ASCII text (accents stripped, other scripts dropped to spaces)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.encode("ascii", "replace").decode("ascii").replace("?", " ").lower()


def _tokens(text: str) -> list:
    return [lemma(w) for w in re.findall(r"[a-z0-9]+", _fold(text))]


@dataclass(frozen=True)
class ParsedPrompt:
    text: str                                   # the prompt as given (possibly truncated)
    kind: str                                   # "anatomy" | "finding" | "unknown"
    anatomy: Optional[str] = None               # concrete, side-resolved anatomy key
    finding: Optional[str] = None
    laterality: Optional[str] = None            # "left" | "right" | "bilateral" | None
    negated: bool = False
    question: bool = False
    confidence: float = 0.0                     # 0..1
    matched: Optional[str] = None               # vocabulary phrase (or composition) matched
    unknown_tokens: tuple = ()
    anatomies: tuple = ()                       # every concrete anatomy key the prompt covers
    region: Optional[str] = None                # finer location named (e.g. a lobe), if any
    corrections: tuple = field(default=())      # (typed, corrected) typo fixes


# ------------------------------------------------------------------------------ phrase index

@lru_cache(maxsize=1)
def _index():
    """(phrases: {token tuple: (key, kind, phrase, side)}, heads: {token tuple: {finding}},
    lexicon: set of known tokens)."""
    phrases = {}
    heads = {}

    def add(text, key, kind, side=None, weak=False):
        text = re.sub(r"\s+", " ", text.replace("{side}", " ")).strip()
        toks = tuple(t for t in _tokens(text) if t not in _STOP)
        if toks and (toks not in phrases or not weak):
            phrases.setdefault(toks, (key, kind, text, side))

    groups = vocab.groups()
    for key in vocab.findings():
        t = vocab.get(key)
        for p in t.synonyms + t.lay:
            add(p, key, "finding")
        add(t.display, key, "finding")
        for h in t.heads:
            heads.setdefault(tuple(_tokens(h)), set()).add(key)
    for key in vocab.all_anatomies():
        t = vocab.get(key)
        target = key
        for s in t.synonyms + t.lay:
            # side-less synonyms of a sided structure name its group ("lung" -> lung)
            add(s, t.group if t.group else target, "anatomy")
        add(t.display, key, "anatomy")
        for a in t.abbreviations:
            add(a, key, "anatomy", side=t.side)
        for a in t.adjectives:
            add(a, t.group or key, "anatomy", weak=True)
    for g, d in groups.items():
        add(d["display"], g, "anatomy")
    lexicon = {tok for toks in list(phrases) + list(heads) for tok in toks}
    return phrases, heads, lexicon


def _group_of(key: str) -> str:
    """Group name for a sided anatomy key, the key itself otherwise."""
    if key in vocab.groups():
        return key
    t = vocab.get(key)
    return t.group or key if t.kind == "anatomy" else key


def _correct(tok: str, lexicon) -> Optional[str]:
    if tok in lexicon or tok in _STOP or tok.isdigit() or len(tok) < 4:
        return None
    # typos rarely change the first letter; requiring it keeps "material" from becoming "arterial"
    close = difflib.get_close_matches(tok, [w for w in lexicon if w[0] == tok[0]], n=1, cutoff=0.8)
    return close[0] if close else None


# ------------------------------------------------------------------------------------ parser

def _truncate(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    cut = text[:MAX_CHARS]
    space = cut.rfind(" ")
    return cut[:space] if space > MAX_CHARS // 2 else cut


def check_text(text: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate, e.g. a non-UTF-8 byte from argv
    (Python keeps those as U+DC80..U+DCFF), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = (f"a byte that is not UTF-8 (0x{code - 0xDC00:02X})" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate (U+{code:04X})")
        raise PromptError(f"The prompt has {what} at character {exc.start + 1}, after "
                          f"{text[:exc.start][-30:]!r}; give prompts as UTF-8 text.") from None


def _claim(words: list, covered: list, table: dict, lengths) -> list:
    """(start, length, table value) for each run of ``lengths`` words (tried in that order) that
    ``table`` knows and that no earlier hit covers; marks the runs in ``covered``."""
    hits = []
    for length in lengths:
        for start in range(0, len(words) - length + 1):
            if any(covered[start:start + length]):
                continue
            value = table.get(tuple(words[start:start + length]))
            if value:
                hits.append((start, length, value))
                covered[start:start + length] = [True] * length
    return hits


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse one prompt. Raises PromptError for empty or punctuation-only text."""
    if not isinstance(text, str):
        raise PromptError(f"A prompt must be text, not {type(text).__name__}.")
    check_text(text)
    raw = _truncate(text.strip())
    if not any(ch.isalnum() for ch in raw):
        raise PromptError("The prompt is empty; type an anatomy or a finding, e.g. 'liver lesion'.")
    question = raw.rstrip().endswith("?")
    phrases, heads, lexicon = _index()

    words = [lemma(w) for w in re.findall(r"[a-z0-9]+", _fold(raw))][: MAX_TOKENS * 3]
    sides, negated, content = set(), False, []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in _LEFT and not (w == "l" and nxt.isdigit()):
            sides.add("left")
        elif w in _RIGHT:
            sides.add("right")
        elif w in _BOTH:
            sides.update(("left", "right"))
        elif w in _NEG or (w in _NEG_BEFORE_OF and nxt in ("of", "for")):
            negated = True
        elif (w == "rule" and nxt == "out") or (w == "out" and i and words[i - 1] == "rule"):
            question = True   # "rule out X" asks whether X is there
        elif w not in _STOP:
            content.append(w)
    content = content[:MAX_TOKENS]

    corrections = []
    for i, w in enumerate(content):
        fixed = _correct(w, lexicon)
        if fixed:
            corrections.append((w, fixed))
            content[i] = fixed

    # longest-first phrase matching over the content tokens, then head words in what is left
    covered = [False] * len(content)
    matches = _claim(content, covered, phrases, range(min(len(content), 8), 0, -1))  # entry
    head_hits = _claim(content, covered, heads, (2, 1))                             # {findings}

    unknown = tuple(w for w, c in zip(content, covered) if not c and w not in _QUALIFIERS)
    n_real = sum(1 for w, c in zip(content, covered) if c or w not in _QUALIFIERS) or 1
    coverage = sum(covered) / max(n_real, sum(covered), 1)
    typo_factor = 0.8 ** len(corrections)

    finding_m = [m for m in matches if m[2][1] == "finding"]
    anatomy_m = [m for m in matches if m[2][1] == "anatomy"]
    base, finding, anatomy_key, matched, region = 0.0, None, None, None, None

    # sides and lobes named through abbreviations ("RLL") or concrete anatomy keys
    for _, _, (key, kind, _, side) in anatomy_m:
        if key not in vocab.groups() and vocab.get(key).side:
            sides.add(vocab.get(key).side)

    if finding_m:
        start, length, (finding, _, matched, _) = max(finding_m, key=lambda m: m[1])
        base = 1.0 if len(finding_m) == 1 else 0.8
        if any(not _fits(finding, m[2][0]) for m in anatomy_m):
            base *= 0.6   # "kidney stone in the gallbladder": the organs disagree
    elif anatomy_m:
        # anatomy + head word -> finding judged in that anatomy
        for _, _, (akey, _, aphrase, _) in sorted(anatomy_m, key=lambda m: -m[1]):
            for _, _, cands in head_hits:
                fit = [f for f in sorted(cands) if _fits(f, akey)]
                if fit:
                    finding, matched, base = fit[0], f"{aphrase} + {fit[0]}", 0.85
                    break
            if finding:
                break
        if not finding:
            start, length, (anatomy_key, _, matched, _) = max(anatomy_m, key=lambda m: m[1])
            base = 1.0 if len({_group_of(m[2][0]) for m in anatomy_m}) == 1 else 0.7
            if head_hits:  # a finding word we could not place in this anatomy
                unknown = unknown + tuple(content[s] for s, _, _ in head_hits)
                coverage *= 0.6
    elif head_hits:
        # head words alone: decide only if the words that name a single finding agree
        specific = [c for _, _, c in head_hits if len(c) == 1]
        cands = set.union(*specific) if specific else set.union(*[c for _, _, c in head_hits])
        defaults = {_HEAD_DEFAULTS[content[s]] for s, n, _ in head_hits
                    if n == 1 and content[s] in _HEAD_DEFAULTS}
        if len(cands) > 1 and len(defaults) == 1:
            cands = defaults
        if len(cands) == 1:
            finding = next(iter(cands))
            matched, base = vocab.get(finding).display.lower(), 0.6
        else:
            unknown = unknown + tuple(content[s] for s, _, _ in head_hits)

    laterality = None
    if sides:
        laterality = "bilateral" if len(sides) == 2 else next(iter(sides))
    if finding:
        kind = "finding"
        t = vocab.get(finding)
        if not t.sided and laterality:
            laterality, base = None, base * 0.9      # side words on an unsided finding: ignored
        covers = vocab.resolve_anatomies(finding, laterality)
        anatomy = covers[0] if len(covers) == 1 else None
        region = _region(anatomy_m, finding, laterality)
    elif anatomy_key:
        kind = "anatomy"
        anatomy, covers, laterality, base = _resolve_anatomy_prompt(anatomy_key, laterality, base)
    else:
        kind, anatomy, covers = "unknown", None, ()

    confidence = 0.05 if kind == "unknown" else round(base * coverage * typo_factor, 3)
    if kind == "unknown" and not content:
        confidence = 0.0
    return ParsedPrompt(
        text=raw, kind=kind, anatomy=anatomy, finding=finding, laterality=laterality,
        negated=negated, question=question, confidence=max(0.0, min(1.0, confidence)),
        matched=matched, unknown_tokens=unknown, anatomies=tuple(covers), region=region,
        corrections=tuple(corrections))


def _fits(finding: str, anatomy_key: str) -> bool:
    """Is the anatomy (key or group) the one the finding is judged in, or a part of it (a lobe)?"""
    t = vocab.get(finding)
    group = _group_of(anatomy_key)
    for target in (_group_of(t.anatomy),) + t.also_in:
        if group == target or group.startswith(target + "_"):
            return True
    return False


def _region(anatomy_matches, finding: str, laterality) -> Optional[str]:
    """A concrete sub-structure named next to a finding (a lobe), if it fits the finding."""
    target = _group_of(vocab.get(finding).anatomy)
    for _, _, (key, _, _, _) in anatomy_matches:
        if key in vocab.groups() and laterality in ("left", "right"):
            key = vocab.groups()[key].get(laterality, key)
        if key.startswith(target + "_") and key not in vocab.groups():
            return key
    return None


def _resolve_anatomy_prompt(key: str, laterality, base):
    grps = vocab.groups()
    if key in grps:
        sides = [laterality] if laterality in ("left", "right") else ["left", "right"]
        covers = tuple(grps[key][s] for s in sides if s in grps[key])
        if not covers:  # e.g. "left middle lobe": there is none
            return None, (), laterality, base * 0.3
        if laterality is None and len(covers) == 1:
            laterality = vocab.get(covers[0]).side
        return (covers[0] if len(covers) == 1 else None), covers, laterality, base
    t = vocab.get(key)
    part = vocab.sided_part(key, laterality)
    if part:   # "left ribs"
        return part, (part,), laterality, base
    if t.side:
        if laterality not in (None, t.side):
            base *= 0.5  # contradictory side words ("left RLL")
        return key, (key,), t.side, base
    if laterality:
        base *= 0.9
    return key, (key,), None, base


def split_prompts(text: str) -> list:
    """Split "liver lesion; fluid around the left lung" into separate prompts (on ';',
    '|' and new lines). Raises PromptError if nothing usable remains."""
    if not isinstance(text, str):
        raise PromptError(f"Prompts must be text, not {type(text).__name__}.")
    check_text(text)
    parts = [p.strip() for p in re.split(r"[;|\n]+", text)]
    parts = [p for p in parts if any(ch.isalnum() for ch in p)]
    if not parts:
        raise PromptError("No prompt given; type one or more prompts separated by ';'.")
    return parts


def vocabulary_phrases() -> list:
    """(phrase, key, laterality) for every training phrase, for the engine's embedding index."""
    out = []
    for key in vocab.anatomies():
        out.extend((p, key, vocab.get(key).side) for p in vocab.training_phrases(key))
    for key in vocab.findings():
        lats = [None, "left", "right"] if vocab.get(key).sided else [None]
        for lat in lats:
            out.extend((p, key, lat) for p in vocab.training_phrases(key, lat))
    return out
