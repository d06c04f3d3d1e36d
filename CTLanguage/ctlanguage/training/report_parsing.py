"""Radiology report -> sentences -> anatomies, finding status, per-anatomy text and labels.

Sentences are split with care for section headers ("Findings:", "Liver:"), abbreviations,
decimals ("1.2 cm") and numbered lists. Findings and anatomies are found with the vocabulary's
phrases (the prompt parser's index), plus anatomy + head-word composition ("left lower lobe
... nodule"). Negation and uncertainty follow ConText-style rules written for this project:
forward triggers ("no", "without", "possible") scope to the end of their clause, backward
triggers ("... is not seen", "... cannot be excluded") to its start; clauses end at
conjunctions such as "but" / "however" or at semicolons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from .. import vocabulary as vocab
from ..errors import InputError
from ..prompts import _BOTH, _LEFT, _RIGHT, _STOP, _fits, _fold, _index, lemma

PRESENT, ABSENT, UNCERTAIN = "present", "absent", "uncertain"

# --------------------------------------------------------------------------------- triggers
# (phrase, kind, direction): kind "neg" | "unc" | "pseudo"; direction "fwd" | "bwd"
_TRIGGERS = [
    ("no evidence of", "neg", "fwd"), ("no sign of", "neg", "fwd"), ("no signs of", "neg", "fwd"),
    ("negative for", "neg", "fwd"), ("free of", "neg", "fwd"), ("absence of", "neg", "fwd"),
    ("without", "neg", "fwd"), ("no", "neg", "fwd"), ("not", "neg", "fwd"), ("nor", "neg", "fwd"),
    ("neither", "neg", "fwd"), ("resolution of", "neg", "fwd"), ("rule out", "unc", "fwd"),
    ("is absent", "neg", "bwd"), ("are absent", "neg", "bwd"), ("not seen", "neg", "bwd"),
    ("not identified", "neg", "bwd"), ("not present", "neg", "bwd"), ("not visualized", "neg", "bwd"),
    ("has resolved", "neg", "bwd"), ("have resolved", "neg", "bwd"), ("resolved", "neg", "bwd"),
    ("ruled out", "neg", "bwd"), ("not demonstrated", "neg", "bwd"), ("is clear", "neg", "bwd"),
    ("are clear", "neg", "bwd"), ("not enlarged", "neg", "bwd"), ("not dilated", "neg", "bwd"),
    ("not aneurysmal", "neg", "bwd"), ("is normal", "neg", "bwd"), ("are normal", "neg", "bwd"),
    ("is unremarkable", "neg", "bwd"), ("are unremarkable", "neg", "bwd"),
    ("possible", "unc", "fwd"), ("possibly", "unc", "fwd"), ("probable", "unc", "fwd"),
    ("probably", "unc", "fwd"), ("likely", "unc", "fwd"), ("suspicious for", "unc", "fwd"),
    ("suspected", "unc", "fwd"), ("suspicion of", "unc", "fwd"), ("may represent", "unc", "fwd"),
    ("could represent", "unc", "fwd"), ("might represent", "unc", "fwd"), ("concerning for", "unc", "fwd"),
    ("questionable", "unc", "fwd"), ("equivocal", "unc", "fwd"), ("suggestive of", "unc", "fwd"),
    ("question of", "unc", "fwd"), ("differential includes", "unc", "fwd"), ("indeterminate", "unc", "fwd"),
    ("versus", "unc", "both"), ("vs", "unc", "both"), ("cannot be excluded", "unc", "bwd"),
    ("can not be excluded", "unc", "bwd"),
    ("not excluded", "unc", "bwd"), ("cannot be ruled out", "unc", "bwd"), ("is suspected", "unc", "bwd"),
    ("are suspected", "unc", "bwd"), ("is questioned", "unc", "bwd"), ("is not excluded", "unc", "bwd"),
    # pseudo-triggers: look like triggers, negate nothing
    ("no change", "pseudo", "fwd"), ("no significant change", "pseudo", "fwd"),
    ("no interval change", "pseudo", "fwd"), ("not only", "pseudo", "fwd"), ("no increase", "pseudo", "fwd"),
    ("not changed", "pseudo", "fwd"), ("no longer", "neg", "fwd"),
    ("not significantly changed", "pseudo", "fwd"),
    ("no new", "unc", "fwd"),  # "no new nodules": older ones may remain
]
_TRIGGER_PHRASES = tuple(t[0] for t in _TRIGGERS)
_TRIGGER_KINDS = {t[0]: (t[1], t[2]) for t in _TRIGGERS}
_TERMINATORS = ["but", "however", "although", "though", "except", "aside from", "apart from",
                "which", "whereas", "while", "yet", "otherwise", "there is", "there are",
                "is present", "are present", "is seen", "are seen", "is noted", "are noted"]
# statements of normality that rule out a finding: (anatomy group, words, finding)
_SIZE_NORMAL = (r"normal (in )?size|size (is |are |was |were )?(normal|within normal)|not enlarged"
                r"|within normal limits")
_NORMAL_RULES = [   # regular expressions over the sentence's lemmatised words
    ("heart", _SIZE_NORMAL + "|normal heart size", "cardiomegaly"),
    ("liver", _SIZE_NORMAL, "hepatomegaly"),
    ("spleen", _SIZE_NORMAL, "splenomegaly"),
    ("aorta", r"normal (in )?calib(er|re)|calib(er|re|ration) (is |was )?normal|normal diameter"
              r"|diameter (is |was )?(normal|within normal|at the upper limit of normal)"
              r"|not dilated|not aneurysmal", "aortic_aneurysm"),
    ("pleural_space", r"\bclear\b|unremarkable", "pleural_effusion"),
    ("pericardium", r"unremarkable|\bnormal\b|\bclear\b", "pericardial_effusion"),
]
_ABBREVIATIONS = {"e.g", "i.e", "approx", "dr", "vs", "nos", "fig", "cf", "etc", "mr", "mrs",
                  "st", "ca", "incl", "max", "min", "sec", "ser", "img", "im"}
_HEADER = re.compile(r"^\s*([A-Za-z][A-Za-z /&\-]{1,40}):\s*")


@dataclass(frozen=True)
class Sentence:
    text: str
    anatomies: tuple = ()                 # concrete anatomy keys the sentence speaks about
    findings: dict = field(default_factory=dict)   # {finding: "present"|"absent"|"uncertain"}
    laterality: Optional[str] = None      # "left" | "right" | "bilateral" | None
    finding_laterality: dict = field(default_factory=dict)  # {finding: laterality or None}
    section: Optional[str] = None         # "findings", "impression", "liver", ...


@dataclass(frozen=True)
class ReportParse:
    sentences: list
    per_anatomy_text: dict                # {anatomy: joined sentences about it}
    labels: dict                          # {finding: 0/1} for every vocabulary finding
    status: dict = field(default_factory=dict)   # {finding: strongest status seen}
    present: tuple = ()                   # ((finding, laterality), ...) asserted present


# ------------------------------------------------------------------------- sentence splitting

def split_sentences(text: str) -> list:
    """[(section, sentence)] for a report. Headers become sections, not sentences."""
    out = []
    major = None                      # "findings", "impression": last until the next header
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = re.sub(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+", "", line)  # list markers
        minor = None                  # "Liver:", "Lungs and pleura:": this line only
        while True:
            m = _HEADER.match(line)
            if not m:
                break
            name = m.group(1).strip().lower()
            if _section_anatomies(name):
                minor = name
            else:
                major, minor = name, None
            line = line[m.end():]
        for sent in _split_line(line):
            out.append((minor or major, sent))
    return out


def _split_line(line: str) -> list:
    protected = re.sub(r"(?<=\d)\.(?=\d)", "\x00", line)           # decimals 1.2
    protected = re.sub(r"\b([A-Za-z]\.){2,}", lambda m: m.group(0).replace(".", "\x00"), protected)
    pieces, start = [], 0
    for m in re.finditer(r"[.!?]+(?=\s+|$)", protected):
        word = re.findall(r"([A-Za-z.]+)$", protected[start:m.start()])
        if m.group(0) == "." and word and word[0].lower().strip(".") in _ABBREVIATIONS:
            continue   # "approx. 2 cm", "vs. atelectasis"
        pieces.append(protected[start:m.end()])
        start = m.end()
    pieces.append(protected[start:])
    return [p.replace("\x00", ".").strip() for p in pieces if re.search(r"[A-Za-z]", p)]


# --------------------------------------------------------------------------------- analysis

def _words(text: str) -> list:
    """Lower-case lemmatised words; punctuation that ends a clause becomes ';'."""
    folded = _fold(text)
    return [w if w in ";:" else lemma(w) for w in re.findall(r"[a-z0-9]+|;|:", folded)]


@lru_cache(maxsize=8)
def _phrase_table(phrases: tuple) -> dict:
    """{first token: [(tokens, phrase)]}, longest phrases first."""
    table: dict = {}
    for p in sorted(phrases, key=lambda p: -len(p.split())):
        toks = tuple(lemma(w) for w in p.split())
        table.setdefault(toks[0], []).append((toks, p))
    return table


def _find_phrases(words: list, phrases: tuple) -> list:
    """[(start, end, phrase)] for whole-word occurrences, longest first, non-overlapping."""
    table = _phrase_table(phrases)
    cands = []
    for i, w in enumerate(words):
        for toks, p in table.get(w, ()):
            if tuple(words[i:i + len(toks)]) == toks:
                cands.append((-len(toks), i, p))
    hits, used = [], set()
    for neg_n, i, p in sorted(cands):
        span = range(i, i - neg_n)
        if not used.intersection(span):
            hits.append((i, i - neg_n, p))
            used.update(span)
    return sorted(hits)


def _clause_bounds(words: list, terms: list) -> list:
    """Indices that end a clause (terminator words and ';')."""
    bounds = {i for i, w in enumerate(words) if w == ";"}
    for s, _, _ in terms:
        bounds.add(s)
    return sorted(bounds)


def _mentions(words: list):
    """Finding and anatomy mentions [(pos, kind, key, side_or_None, end)], head-word hits."""
    phrases, heads, _ = _index()
    content = [(i, w) for i, w in enumerate(words) if w not in _STOP and w not in (";", ":")
               and w not in _LEFT | _RIGHT | _BOTH]
    toks = [w for _, w in content]
    covered = [False] * len(toks)
    found = []
    for length in range(min(len(toks), 8), 0, -1):
        for s in range(len(toks) - length + 1):
            if any(covered[s:s + length]):
                continue
            entry = phrases.get(tuple(toks[s:s + length]))
            if entry and not (length == 1 and toks[s] in ("l", "r")):
                key, kind, _, side = entry
                found.append((content[s][0], kind, key, side, content[s + length - 1][0] + 1))
                covered[s:s + length] = [True] * length
    head_hits = []
    for length in (2, 1):
        for s in range(len(toks) - length + 1):
            if not any(covered[s:s + length]) and tuple(toks[s:s + length]) in heads:
                head_hits.append((content[s][0], heads[tuple(toks[s:s + length])]))
                covered[s:s + length] = [True] * length
    return sorted(found), head_hits


def _side_near(words: list, pos: int, lo: int, end: Optional[int] = None) -> Optional[str]:
    """Laterality word inside the mention [pos, end) or closest before it (within the clause,
    at most 6 words back)."""
    sides = set()
    for i in range((end or pos + 1) - 1, max(lo, pos - 6) - 1, -1):
        w = words[i]
        if w in _BOTH:
            return "bilateral"
        if w in ("left", "lt") or (w == "l" and i + 1 < len(words) and not words[i + 1].isdigit()):
            sides.add("left")
        elif w in ("right", "rt") or w == "r":
            sides.add("right")
        if sides:
            break
    if "and" in words[max(lo, pos - 7):pos] and len(sides) == 1:
        # "left and right lower lobes"
        span = words[max(lo, pos - 7):pos]
        if ("left" in span and "right" in span):
            return "bilateral"
    if not sides:   # trailing side: "... upper lobes bilaterally", "... on the left"
        after = words[(end or pos + 1):(end or pos + 1) + 3]
        if after[:1] and after[0] in _BOTH:
            return "bilateral"
        if after[:2] in (["on", "left"], ["on", "right"]) or (
                len(after) == 3 and after[:2] == ["on", "the"] and after[2] in ("left", "right")):
            return after[-1] if after[-1] in ("left", "right") else after[1]
    return next(iter(sides)) if sides else None


def analyse_sentence(text: str, section: Optional[str] = None) -> Sentence:
    words = _words(text)
    triggers = _find_phrases(words, _TRIGGER_PHRASES)
    kinds = _TRIGGER_KINDS
    terms = _find_phrases(words, tuple(_TERMINATORS))
    bounds = _clause_bounds(words, terms)

    def clause(pos):
        lo = max([b + 1 for b in bounds if b < pos] + [0])
        hi = min([b for b in bounds if b > pos] + [len(words)])
        return lo, hi

    mentions, head_hits = _mentions(words)
    heads = _index()[1]
    anat = [(p, k, s, e) for p, kind, k, s, e in mentions if kind == "anatomy"]
    finds = [(p, k, e) for p, kind, k, _, e in mentions if kind == "finding"]
    # anatomy + head word in the same clause -> finding judged there
    pending = []
    for pos, cands in head_hits:
        lo, hi = clause(pos)
        for apos, akey, _, _ in sorted(anat, key=lambda a: abs(a[0] - pos)):
            if lo <= apos < hi:
                fit = [f for f in sorted(cands) if _fits(f, akey)]
                if fit:
                    finds.append((pos, fit[0], pos + 1))
                    break
        else:
            if len(cands) > 1 and _side_near(words, pos, lo):
                cands = {c for c in cands if vocab.get(c).sided}   # "left calculus": a kidney
                if len(cands) == 1:
                    finds.append((pos, next(iter(cands)), pos + 1))
                    continue
            if len(cands) == 1 and next(iter(cands)) in _STANDALONE_HEADS:
                finds.append((pos, next(iter(cands)), pos + 1))
            elif len(cands) > 1:
                pending.append((pos, cands))

    for apos, akey, _, aend in anat:   # "pleural or pericardial effusion": shared head word
        if aend < len(words) and words[aend] in ("or", "and"):
            nxt = [(p, k, e) for p, k, e in finds if p == aend + 1]
            if nxt:
                fit = [f for f in sorted(heads.get((words[nxt[0][2] - 1],), ())) if _fits(f, akey)]
                if fit and fit[0] not in {k for _, k, _ in finds}:
                    finds.append((apos, fit[0], aend))

    for pos, cands in pending:   # "nodules or masses": the organ of the finding listed with it
        groups = {_group_of_finding(k) for p, k, _ in finds if clause(p) == clause(pos)}
        fit = sorted(c for c in cands if _group_of_finding(c) in groups)
        if len(fit) == 1:
            finds.append((pos, fit[0], pos + 1))

    def status_at(pos):
        lo, hi = clause(pos)
        st = PRESENT
        for s, e, p in triggers:
            kind, direction = kinds[p]
            in_scope = ((direction in ("fwd", "both") and lo <= s < pos)
                        or (direction in ("bwd", "both") and pos < s < hi))
            if not in_scope:
                continue
            if kind == "pseudo":
                continue   # matched longest-first, so it hides the "no" inside "no change"
            if kind == "neg":
                st = ABSENT
            elif kind == "unc" and st != ABSENT:
                st = UNCERTAIN
        return st

    # anatomy mentions with their side (abbreviation, or a side word just before them)
    anat = [(p, k, side or _side_near(words, p, clause(p)[0], e)) for p, k, side, e in anat]
    context = _section_anatomies(section) if section else []

    def side_from_anatomy(key, pos):
        """Side of the anatomies that fit a sided finding: same clause, sentence, then section."""
        fitting = [(p, s) for p, k, s in anat if s and _fits(key, k)]
        for pool in ([s for p, s in fitting if clause(p) == clause(pos)], [s for _, s in fitting],
                     [vocab.get(c).side for c in context if _fits(key, c) and vocab.get(c).side]):
            sides = set(pool)
            if sides:
                return "bilateral" if len(sides) > 1 or "bilateral" in sides else sides.pop()
        return None

    fstatus, flat = {}, {}
    rank = {PRESENT: 3, UNCERTAIN: 2, ABSENT: 1}
    for pos, key, end in finds:
        lo, _ = clause(pos)
        st = status_at(pos)
        lat = None
        if vocab.get(key).sided:
            lat = _side_near(words, pos, lo, end) or side_from_anatomy(key, pos)
        if key not in fstatus or rank[st] > rank[fstatus[key]]:
            fstatus[key], flat[key] = st, lat
        elif st == fstatus[key] and lat != flat[key]:
            flat[key] = "bilateral" if lat and flat[key] else (lat or flat[key])
    # normality statements ("heart size is normal", "pleural spaces are clear")
    joined = " ".join(words)
    for group, pattern, finding in _NORMAL_RULES:
        if finding in fstatus:
            continue
        named = [k for _, k, _ in anat] or context
        if any(_fits_group(k, group) for k in named) and re.search(pattern, joined):
            fstatus[finding], flat[finding] = ABSENT, None

    anatomies = []
    for pos, key, lat in anat:
        anatomies.extend(_concrete(key, lat))
    for key, lat in flat.items():
        anatomies.extend(vocab.resolve_anatomies(key, lat if lat in ("left", "right") else None))
    for key, lat in flat.items():   # a lobe named in the section header ("Right upper lobe:")
        anatomies.extend(c for c in context if _fits(key, c) and vocab.get(c).side in (lat, None)
                         and c not in vocab.resolve_anatomies(key))
    if not anatomies and section:
        anatomies.extend(context)
    anatomies = tuple(dict.fromkeys(anatomies))

    sides = set()
    for w_i, w in enumerate(words):
        if w in ("left",) or (w == "l" and w_i + 1 < len(words) and not words[w_i + 1].isdigit()):
            sides.add("left")
        elif w in ("right",):
            sides.add("right")
        elif w in _BOTH:
            sides.update(("left", "right"))
    for _, _, s in anat:
        if s in ("left", "right"):
            sides.add(s)
        elif s == "bilateral":
            sides.update(("left", "right"))
    lat = "bilateral" if len(sides) == 2 else (next(iter(sides)) if sides else None)
    return Sentence(text=text, anatomies=anatomies, findings=dict(fstatus), laterality=lat,
                    finding_laterality=dict(flat), section=section)


# heads that name a finding on their own, without an anatomy word ("Cardiomegaly.")
_STANDALONE_HEADS = {"cardiomegaly", "lymphadenopathy", "emphysema", "atelectasis", "consolidation",
                     "ascites", "gallstone", "steatosis", "hepatomegaly", "splenomegaly"}


def _group_of_finding(key: str) -> str:
    a = vocab.get(key).anatomy
    return a if a in vocab.groups() else (vocab.get(a).group or a)


def _fits_group(anatomy_key: str, group: str) -> bool:
    g = anatomy_key if anatomy_key in vocab.groups() else (vocab.get(anatomy_key).group or anatomy_key)
    return g == group or g.startswith(group + "_")


def _concrete(key: str, lat: Optional[str]) -> list:
    """Concrete anatomy keys for a mention; lobes also count for their lung."""
    keys = list(vocab.resolve_anatomies(key, lat if lat in ("left", "right") else None))
    for k in list(keys):
        if k.startswith("lung_") and k.endswith(("_left", "_right")) and k not in ("lung_left", "lung_right"):
            keys.append("lung_" + k.rsplit("_", 1)[1])
    return keys


def _section_anatomies(section: str) -> list:
    words = _words(section)
    mentions, _ = _mentions(words)
    out = []
    for pos, kind, key, side, end in mentions:
        if kind == "anatomy":
            out.extend(_concrete(key, side or _side_near(words, pos, 0, end)))
    return out


def parse_report(text: str, uncertain_as: int = 1) -> ReportParse:
    """Parse a report. ``labels[f]`` is 1 when some sentence asserts f (uncertain mentions count
    as ``uncertain_as``), 0 otherwise, for every vocabulary finding."""
    if not isinstance(text, str):
        raise InputError(f"A report must be text, not {type(text).__name__}.")
    sentences = [analyse_sentence(s, sec) for sec, s in split_sentences(text)]
    per_anatomy: dict = {}
    for s in sentences:
        for a in s.anatomies:
            per_anatomy.setdefault(a, []).append(s.text)
    rank = {PRESENT: 3, UNCERTAIN: 2, ABSENT: 1}
    status, present = {}, []
    for s in sentences:
        for f, st in s.findings.items():
            if f not in status or rank[st] > rank[status[f]]:
                status[f] = st
            if st == PRESENT or (st == UNCERTAIN and uncertain_as):
                present.append((f, s.finding_laterality.get(f)))
    labels = {f: int(status.get(f) == PRESENT or (status.get(f) == UNCERTAIN and bool(uncertain_as)))
              for f in vocab.findings()}
    return ReportParse(
        sentences=sentences,
        per_anatomy_text={a: " ".join(dict.fromkeys(t)) for a, t in per_anatomy.items()},
        labels=labels, status=status, present=tuple(dict.fromkeys(present)))
