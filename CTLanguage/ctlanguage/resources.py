"""Locate the project's shared resources (embedded models, model catalog).

Order: the CTLANGUAGE_RESOURCES environment variable (the Slicer extension sets it), then the
copy inside an installed wheel (``ctlanguage/_resources``, made by setup.py), then the repository
layout (<root>/Resources next to the CTLanguage module folder; editable installs).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CTLanguageError

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    env = os.environ.get("CTLANGUAGE_RESOURCES")
    candidates = [Path(env)] if env else []
    candidates.append(_PACKAGE_DIR / "_resources")  # wheel
    # repository: <root>/CTLanguage/ctlanguage -> <root>/Resources
    candidates.append(_PACKAGE_DIR.parent.parent / "Resources")
    for c in candidates:
        if (c / "catalog.json").is_file() or (c / "Models").is_dir():
            return c
    raise CTLanguageError(
        "CTLanguage resources (embedded models, catalog) not found; set CTLANGUAGE_RESOURCES to "
        "the folder that holds catalog.json and Models/."
    )


def package_data_dir() -> Path:
    """Data files shipped inside the engine package (vocabulary, paraphrase sets)."""
    return _PACKAGE_DIR / "data"
