"""Backends: one module per model family, each implementing ``engine.protocol.Backend``.

A backend module provides::

    load(entry, device=None, progress=None) -> Backend      # entry: catalog.ModelEntry
    describe(entry) -> Capabilities                         # static: no weights loaded

and is named in ``REGISTRY`` by the ``backend`` field of its catalog entries ("grounded" when
absent). Modules are imported only when a model of their family is used, so an optional extra
(``ctlanguage[totalseg]``, ``[merlin]``, ...) that is not installed breaks nothing else.
"""

from __future__ import annotations

import importlib

from ..errors import InputError

REGISTRY = {
    "grounded": "ctlanguage.backends.grounded",   # the embedded grounded model (ours)
    "merlin": "ctlanguage.backends.merlin",       # Merlin zero-shot finding scores
    "fvlm": "ctlanguage.backends.fvlm",           # fVLM per-anatomy zero-shot scores
    "totalsegmentator": "ctlanguage.backends.totalsegmentator",   # TotalSegmentator 'total' anatomy
    "voxtell": "ctlanguage.backends.voxtell",     # VoxTell free-text masks (voxtell package)
}
# pip extra that provides each family's third-party package (for the error message)
EXTRAS: dict = {"merlin": "merlin", "fvlm": "fvlm", "totalsegmentator": "totalseg", "voxtell": "voxtell"}


def backend_module(kind: str):
    """The module implementing backend family ``kind``."""
    name = REGISTRY.get(kind or "grounded")
    if name is None:
        raise InputError(f"Unknown model backend {kind!r}; known: {', '.join(sorted(REGISTRY))}.")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = EXTRAS.get(kind)
        hint = f" (pip install 'ctlanguage[{extra}]')" if extra else ""
        raise InputError(f"The {kind} backend is not installed{hint}: {exc}.") from None
