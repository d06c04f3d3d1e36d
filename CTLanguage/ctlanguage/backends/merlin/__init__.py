"""Merlin (Stanford MIMI, MIT): CT image + report contrastive model used for zero-shot finding
scores. Modules: ``model`` (I3ResNet-152 image encoder), ``text`` (Clinical-Longformer side),
``network`` (both, our parameter names), ``preprocess`` (Merlin's grid on our geometry),
``weights`` (download, safe read, conversion), ``backend`` (the engine's Backend).

Importing this package is cheap; torch and transformers load when a function below is called.
"""

from __future__ import annotations


WEIGHTS_HINT = ("Merlin's weights are not downloaded: run `ctlanguage models download merlin` "
                "(1.08 GB from Hugging Face, MIT licence; or add --from FILE for a copy you have).")


def describe(entry):
    """Capabilities without loading anything (model menus call this for every entry)."""
    from ... import catalog
    from ...engine.protocol import Capabilities

    present = (catalog.cached_model_dir(entry) / catalog.WEIGHTS).is_file()
    return Capabilities(scores=True, calibrated=False, heatmaps=True, device="cpu",
                        weights_present=present, weights_hint="" if present else WEIGHTS_HINT)


def load(entry, device=None, progress=None):
    from .backend import load as _load

    return _load(entry, device=device, progress=progress)


def download(entry, progress=None, force=False, source=None, tokenizer=None):
    from .weights import download as _download

    return _download(entry, progress=progress, force=force, source=source, tokenizer=tokenizer)
