"""fVLM (Shui et al., ICLR 2025; github.com/alibaba-damo-academy/fvlm): the anatomy-grounded CT
vision-language model this product's method comes from, as a *scores* backend. It needs the
pipeline's anatomy backend (TotalSegmentator) for its four regions. Modules: ``network`` (3D ViT-B
+ CXR-BERT, the checkpoint's names), ``preprocess`` (its grid on our geometry), ``weights`` (safe
read, conversion, terms), ``backend`` (the engine's Backend).

Importing this package is cheap; torch and transformers load when a function below is called.
"""

from __future__ import annotations

WEIGHTS_HINT = ("fVLM's weights are not converted yet: download the CT-RATE checkpoint from the "
                "authors' Google Drive folder (linked in github.com/alibaba-damo-academy/fvlm), "
                "then run `ctlanguage models download fvlm --from FILE --accept-licence`.")
NEEDS_ANATOMY = ("fVLM scores findings inside anatomy regions and needs an anatomy backend: use "
                 "the pipeline `totalseg+fvlm` (e.g. --model totalseg+fvlm).")


def describe(entry):
    """Capabilities without loading anything (model menus call this for every entry)."""
    from ... import catalog
    from ...engine.protocol import Capabilities

    present = (catalog.cached_model_dir(entry) / catalog.WEIGHTS).is_file()
    return Capabilities(scores=True, calibrated=False, device="cpu",
                        weights_present=present, weights_hint="" if present else WEIGHTS_HINT)


def load(entry, device=None, progress=None):
    from .backend import load as _load

    return _load(entry, device=device, progress=progress)


def download(entry, progress=None, force=False, source=None, tokenizer=None, accept_licence=False):
    from .weights import download as _download

    return _download(entry, progress=progress, force=force, source=source, tokenizer=tokenizer,
                     accept_licence=accept_licence)
