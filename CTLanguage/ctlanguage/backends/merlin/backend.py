"""The Merlin backend: one image pass per volume, zero-shot finding scores from prompt ensembles.

score(finding) = mean cosine(image, positive phrasings) - mean cosine(image, negated phrasings),
with the phrasings from our vocabulary (:func:`ctlanguage.vocabulary.prompt_ensemble`). The
score is in [-2, 2] and *uncalibrated*: Merlin publishes no temperature or threshold for it.
A heat map applies the same rule to each voxel of the last feature map (the contrastive head is
linear, so the voxels' mean is the image embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ... import catalog, vocabulary
from ...errors import CheckpointError, InputError
from ...preprocess import ModelGrid
from . import model as model_mod
from . import weights as weights_mod
from .preprocess import to_merlin_input


def _protocol():
    """engine.protocol, also while ``ctlanguage.engine`` is still the old single module."""
    try:
        from ...engine import protocol
        return protocol
    except ImportError:
        import importlib.util
        import sys

        name = "ctlanguage._engine_protocol"
        if name not in sys.modules:
            path = Path(__file__).resolve().parents[2] / "engine" / "protocol.py"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return sys.modules[name]


P = _protocol()

WEIGHTS_HINT = ("Merlin's weights are not downloaded: run `ctlanguage models download merlin` "
                "(1.08 GB from Hugging Face, MIT licence; or add --from FILE for a copy you have).")


def describe(entry) -> "P.Capabilities":
    present = (catalog.cached_model_dir(entry) / catalog.WEIGHTS).is_file()
    return P.Capabilities(scores=True, calibrated=False, heatmaps=True, device="cpu",
                          weights_present=present, weights_hint="" if present else WEIGHTS_HINT)


def pick_device(device: Optional[str]):
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d in ("gpu", "cuda") or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError("a GPU was requested but torch sees no CUDA device; use --device cpu.")
        return torch.device("cuda" if d == "gpu" else d)
    if d == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {device!r}; use cpu, cuda or auto.")


@dataclass
class MerlinState:
    embedding: np.ndarray          # (512,) L2-normalised image embedding
    features: np.ndarray           # (2048,) pooled backbone features
    feature_map: Optional[np.ndarray]  # (2048, S', A', R') or None
    grid: ModelGrid                # the 224 x 224 x 160 input grid
    feature_grid: ModelGrid        # grid of feature_map's voxels
    extra: dict = field(default_factory=dict)

    def tensors(self) -> dict:
        out = {"embedding": self.embedding, "features": self.features}
        if self.feature_map is not None:
            out["feature_map"] = self.feature_map
        return out

    def metadata(self) -> dict:
        return {"grid": self.grid.to_dict(), "feature_grid": self.feature_grid.to_dict()}

    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.tensors().values()))


def feature_grid(grid: ModelGrid, fmap_shape_sar) -> ModelGrid:
    """Grid of the layer4 voxels: strides (S 16, A 32, R 32) input voxels; each voxel's centre is
    put at the centre of the input block it summarises."""
    f = np.array([model_mod.STRIDE_ZXY[2], model_mod.STRIDE_ZXY[2], model_mod.STRIDE_ZXY[0]], float)  # R, A, S
    affine = grid.ijk_to_ras.copy()
    affine[:3, 3] = grid.ijk_to_ras[:3, :3] @ ((f - 1) / 2) + grid.ijk_to_ras[:3, 3]
    affine[:3, :3] = grid.ijk_to_ras[:3, :3] * f
    return ModelGrid(tuple(int(v) for v in fmap_shape_sar), affine)


class MerlinBackend:
    """Implements ``engine.protocol.Backend`` (and answers scores only; no masks)."""

    def __init__(self, net, tokenizer, info, device, keep_feature_map: bool = True):
        net.text.tokenizer = tokenizer
        self.net = net.eval().to(device)
        self.device = device
        self.info = info
        self.capabilities = P.Capabilities(scores=True, calibrated=False, heatmaps=True, device="cpu")
        self.keep_feature_map = keep_feature_map
        self._text_cache: dict = {}

    # ---- image ------------------------------------------------------------------------------
    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> MerlinState:
        import torch

        if progress:
            progress(0.0, "Merlin: resampling to 1.5 x 1.5 x 3 mm RAS")
        x = to_merlin_input(volume)
        if cancel and cancel():
            from ...errors import CancelledError
            raise CancelledError("cancelled before the Merlin image pass")
        if progress:
            progress(0.2, "Merlin: image encoder (I3ResNet-152)")
        with torch.inference_mode():
            out = self.net.image(x.network_input().to(self.device))
        emb = torch.nn.functional.normalize(out["embedding"][0].float(), dim=0)
        fmap = out["feature_map"][0].permute(0, 1, 3, 2)  # (C, Z, X, Y) -> (C, S, A, R)
        state = MerlinState(emb.cpu().numpy(), out["features"][0].float().cpu().numpy(),
                            fmap.float().cpu().numpy() if self.keep_feature_map else None,
                            x.grid, feature_grid(x.grid, fmap.shape[1:]))
        if progress:
            progress(1.0, "Merlin: encoded")
        return state

    def restore(self, metadata: dict, tensors) -> MerlinState:
        fm = tensors.get("feature_map")
        return MerlinState(np.asarray(tensors["embedding"], np.float32),
                           np.asarray(tensors["features"], np.float32),
                           None if fm is None else np.asarray(fm, np.float32),
                           ModelGrid.from_dict(metadata["grid"]),
                           ModelGrid.from_dict(metadata["feature_grid"]))

    # ---- text -------------------------------------------------------------------------------
    def text_embeddings(self, phrases) -> np.ndarray:
        """(N, 512) L2-normalised text embeddings (cached per phrase)."""
        import torch

        todo = [p for p in dict.fromkeys(phrases) if p not in self._text_cache]
        if todo:
            with torch.inference_mode():
                e = torch.nn.functional.normalize(self.net.text(todo).float(), dim=-1).cpu().numpy()
            self._text_cache.update(zip(todo, e))
        return np.stack([self._text_cache[p] for p in phrases])

    def ensemble(self, finding: str, laterality: Optional[str]):
        pos, neg = vocabulary.prompt_ensemble(finding, laterality)
        if not pos or not neg:
            raise InputError(f"the vocabulary has no positive/negated phrasings for {finding!r}")
        return self.text_embeddings(pos), self.text_embeddings(neg)

    def score(self, embedding: np.ndarray, finding: str, laterality: Optional[str] = None) -> float:
        pos, neg = self.ensemble(finding, laterality)
        return float((pos @ embedding).mean() - (neg @ embedding).mean())

    def answer(self, state: MerlinState, request) -> "P.Answer":
        ans = P.Answer(model=self.info.id, calibrated=False)
        if request.kind != "finding" or not request.finding or not request.want_scores:
            return ans
        sided = vocabulary.get(request.finding).sided
        for key in request.anatomies or (None,):
            side = request.laterality
            if sided and key is not None and vocabulary.get(key).kind == "anatomy":
                side = vocabulary.get(key).side or side
            ans.scores[key or "body"] = self.score(state.embedding, request.finding,
                                                   side if sided else None)
        return ans

    def heatmap(self, state: MerlinState, finding: str, laterality: Optional[str] = None):
        """(score map on ``state.feature_grid`` [S', A', R'], that grid): the zero-shot rule per
        voxel of the last feature map."""
        import torch

        if state.feature_map is None:
            raise InputError("this encoding was made without the feature map; encode again")
        head = self.net.image.contrastive_head
        with torch.inference_mode():
            fm = torch.from_numpy(state.feature_map)[None].to(self.device)
            v = torch.nn.functional.normalize(head(fm)[0].float(), dim=0).cpu().numpy()
        pos, neg = self.ensemble(finding, laterality)
        direction = pos.mean(0) - neg.mean(0)
        return np.tensordot(direction, v, axes=1).astype(np.float32), state.feature_grid


# ----------------------------------------------------------------------------- loading

def load_folder(folder, device=None, entry=None) -> MerlinBackend:
    """Backend from a converted model folder (``weights.convert``)."""
    import torch
    from safetensors.torch import load_file

    from .network import MerlinNet
    from .text import load_tokenizer

    folder = Path(folder)
    summary = catalog.verify_model_dir(folder, entry)
    cfg = weights_mod.read_config(folder)
    dev = pick_device(device)
    with torch.device("meta"):
        net = MerlinNet(cfg["text_config"])
    state = load_file(str(folder / catalog.WEIGHTS))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state = weights_mod.check_against(state, expected, f"{folder / catalog.WEIGHTS}")
    net.load_state_dict(state, strict=False, assign=True)  # check_against proved the key set
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder / catalog.WEIGHTS} lacks {len(left)} tensors (e.g. {left[0]!r})")
    tok = load_tokenizer(folder / weights_mod.TOKENIZER_DIR)
    info = P.ModelInfo(id=(entry.id if entry else cfg.get("id", "merlin")),
                       version=(entry.version if entry else cfg.get("version", "")),
                       sha256=summary["weights_sha256"], kind="merlin",
                       license=(entry.license if entry else "MIT"), path=str(folder))
    return MerlinBackend(net, tok, info, dev)


def load(entry, device=None, progress=None) -> MerlinBackend:
    folder = catalog.cached_model_dir(entry)
    if not (folder / catalog.WEIGHTS).is_file():
        raise CheckpointError(WEIGHTS_HINT.replace("merlin`", f"{entry.id}`"))
    if progress:
        progress(0.0, f"loading {entry.id}")
    return load_folder(folder, device=device, entry=entry)
