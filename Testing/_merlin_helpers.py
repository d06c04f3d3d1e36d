"""Test helpers for the Merlin backend: the reference package (merlin-vlm) built offline, a tiny
Clinical-Longformer stand-in folder (random weights, a byte-level BPE tokenizer trained here) and
random upstream-named state dicts.

merlin-vlm's constructors download ImageNet weights (``resnet152(pretrained=True)``) and pull
Clinical-Longformer from the Hub; the tests redirect exactly those calls (never our code):
``torchvision.models.resnet152`` -> the same function with ``weights=None``, and
``AutoTokenizer/AutoModel.from_pretrained("yikuan8/Clinical-Longformer")`` -> a local folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

CLINICAL_LONGFORMER = "yikuan8/Clinical-Longformer"
TINY_TEXT = {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12,  # upstream: Linear(768, 512)
             "intermediate_size": 256, "max_position_embeddings": 258, "attention_window": 16,
             "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0,
             "eos_token_id": 2, "sep_token_id": 2}
CORPUS = ["no pleural effusion", "large left pleural effusion with atelectasis",
          "the lungs are clear", "emphysema", "hepatic steatosis", "kidney stone, 4 mm",
          "small pericardial effusion.", "cardiomegaly; no ascites", "Lung nodule (6 mm) RUL!"]


def import_torchvision():
    """torchvision's PyPI wheel is built against CUDA torch: with the CPU torch its detection ops
    library does not load and registering their meta kernels fails at import. ResNet does not use
    those ops, so their registration is skipped."""
    import torch.library as L

    try:
        import torchvision  # noqa: F401
        return torchvision
    except RuntimeError:
        pass
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    with mock.patch.object(L, "register_fake", lambda *a, **k: (lambda f: f)), \
            mock.patch.object(L, "register_autograd", lambda *a, **k: None):
        import torchvision
    return torchvision


REF_ENV = "CTLANGUAGE_MERLIN_REF"


def reference_dir() -> Path | None:
    """Folder holding the reference stack (``pip install --target``; scripts/setup_env.sh puts it
    in ``<venv>/merlin-ref``), or None."""
    import os
    import sys

    d = Path(os.environ.get(REF_ENV) or Path(sys.prefix) / "merlin-ref")
    return d if (d / "merlin" / "models" / "build.py").is_file() and (d / "torchvision").is_dir() else None


def run_reference(out: Path, niftis=()) -> Path:
    """Run _merlin_reference_run.py in a subprocess with the reference stack on its path; skip
    (with the reason) when that stack is not installed."""
    import os
    import subprocess
    import sys

    ref = reference_dir()
    if ref is None:
        pytest.skip(f"merlin-vlm reference stack not installed (scripts/setup_env.sh installs it "
                    f"into <venv>/merlin-ref; or set {REF_ENV})")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ref), str(here)] + [p for p in sys.path if p.endswith("CTLanguage")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, str(here / "_merlin_reference_run.py"), str(out), *map(str, niftis)],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"the reference run failed:\n{r.stderr[-4000:]}")
    return out


def tiny_longformer_folder(folder: Path, seed: int = 0) -> Path:
    """A Clinical-Longformer-shaped folder: config.json, random weights, vocab.json + merges.txt."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LongformerConfig, LongformerModel

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    cfg = dict(TINY_TEXT)
    cfg["attention_window"] = [cfg["attention_window"]] * cfg["num_hidden_layers"]
    torch.manual_seed(seed)
    model = LongformerModel(LongformerConfig(vocab_size=bpe.get_vocab_size(), **cfg))
    model.save_pretrained(str(folder))
    return folder


@contextmanager
def offline_upstream(build, longformer_dir: Path):
    """Patch only merlin-vlm's downloads (see module docstring)."""
    import transformers

    tv = import_torchvision()
    real_resnet = tv.models.resnet152

    def resnet152(*args, **kwargs):
        return real_resnet(weights=None)

    def redirect(cls):
        real = cls.from_pretrained

        def from_pretrained(name, *a, **k):
            assert name == CLINICAL_LONGFORMER, name
            return real(str(longformer_dir), *a, local_files_only=True, **k)
        return from_pretrained

    with mock.patch.object(build.torchvision.models, "resnet152", resnet152), \
            mock.patch.object(build.AutoTokenizer, "from_pretrained",
                              redirect(transformers.AutoTokenizer)), \
            mock.patch.object(build.AutoModel, "from_pretrained", redirect(transformers.AutoModel)):
        yield


def randomise_(module, seed: int = 0) -> dict:
    """Give every float parameter/buffer of ``module`` seeded random values that keep a deep
    ResNet's activations finite (BN statistics included); returns the state dict."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif k.endswith("running_mean"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
            elif k.endswith("LayerNorm.weight"):
                v.copy_(1.0 + torch.randn(v.shape, generator=g) * 0.1)
            elif ".bn" in k or "downsample.1" in k or k.endswith("bn1.weight") or k.endswith("bn1.bias"):
                v.copy_(torch.rand(v.shape, generator=g) * 0.5 + 0.25 if k.endswith("weight")
                        else torch.randn(v.shape, generator=g) * 0.1)
            elif v.ndim >= 2:
                fan_in = v[0].numel()
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    return sd
