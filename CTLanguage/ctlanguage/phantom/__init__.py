"""Synthetic torso CT phantoms: anatomy, findings with exact masks, generated reports, montages.

Public API::

    from ctlanguage.phantom import generate_case, write_corpus
    case = generate_case(seed=3)            # PhantomCase
    write_corpus("out/", n=100, seed=0)     # out/case_00000/... + out/manifest.jsonl
"""

from .corpus import PhantomCase, generate_case, write_corpus  # noqa: F401
from .findings import FINDING_ANATOMY, FINDING_KEYS, Finding  # noqa: F401
from .anatomy import STRUCTURE_LABELS, STRUCTURE_NAMES  # noqa: F401
