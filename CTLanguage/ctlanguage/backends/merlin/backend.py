"""The Merlin backend: one image pass per volume, zero-shot finding scores from prompt ensembles.

score(finding) = mean cosine(image, positive phrasings) - mean cosine(image, negated phrasings),
with the phrasings every backend scores with (:func:`ctlanguage.phrases.ensemble`). The
score is in [-2, 2] and *uncalibrated*: Merlin publishes no temperature or threshold for it. Its
zero-shot rule calls a finding present when the score is above 0 (closer to the positive phrasings).
A site calibration (``ctlanguage calibrate --model merlin``) turns it into a probability.
A heat map applies the same rule to each voxel of the last feature map (the contrastive head is
linear, so the voxels' mean is the image embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ... import catalog, phrases, vocabulary
from ...engine.progress import check_cancel, report
from ...engine.protocol import Answer, Capabilities, ModelInfo
from ...engine.scoring import site_calibration
from ...errors import CheckpointError, InputError
from ...preprocess import ModelGrid
from . import model as model_mod
from . import weights as weights_mod
from . import WEIGHTS_HINT
from .preprocess import to_merlin_input

def pick_device(device=None):
    import torch

    from ...engine.engine import resolve_device

    return torch.device(resolve_device(device))


@dataclass
class MerlinState:
    embedding: np.ndarray          # (512,) L2-normalised image embedding
    features: np.ndarray           # (2048,) pooled backbone features
    feature_map: Optional[np.ndarray]  # (2048, S', A', R') or None
    grid: ModelGrid                # the 224 x 224 x 160 input grid
    feature_grid: ModelGrid        # grid of feature_map's voxels

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

    def __init__(self, net, tokenizer, info, device, keep_feature_map: bool = True,
                 text_cache_file=None):
        net.text.tokenizer = tokenizer
        self.net = net.eval().to(device)
        self.device = device
        self.info = info
        # a site's `ctlanguage calibrate` of these exact weights, else raw zero-shot scores
        self.calibration = site_calibration(info.id, info.sha256 or "", Path(info.path) if info.path else None)
        self.capabilities = Capabilities(scores=True, calibrated=self.calibration is not None,
                                         heatmaps=True, device="cpu")
        self.keep_feature_map = keep_feature_map
        # Clinical-Longformer pads every text to 512 tokens: seconds per phrase on a CPU, so the
        # embeddings are kept on disk per weights hash and computed once per phrase
        self.text_cache_file = Path(text_cache_file) if text_cache_file else None
        self._text_cache: dict = _read_text_cache(self.text_cache_file)

    # ---- image ------------------------------------------------------------------------------
    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> MerlinState:
        import torch

        report(progress, 0.0, "Merlin: resampling to 1.5 x 1.5 x 3 mm RAS")
        x = to_merlin_input(volume)
        check_cancel(cancel)
        report(progress, 0.2, "Merlin: image encoder (I3ResNet-152)")
        with torch.inference_mode():
            out = self.net.image(x.network_input().to(self.device))
        emb = torch.nn.functional.normalize(out["embedding"][0].float(), dim=0)
        fmap = out["feature_map"][0].permute(0, 1, 3, 2)  # (C, Z, X, Y) -> (C, S, A, R)
        state = MerlinState(emb.cpu().numpy(), out["features"][0].float().cpu().numpy(),
                            fmap.float().cpu().numpy() if self.keep_feature_map else None,
                            x.grid, feature_grid(x.grid, fmap.shape[1:]))
        report(progress, 1.0, "Merlin: encoded")
        return state

    def restore(self, metadata: dict, tensors) -> MerlinState:
        fm = tensors.get("feature_map")
        return MerlinState(np.asarray(tensors["embedding"], np.float32),
                           np.asarray(tensors["features"], np.float32),
                           None if fm is None else np.asarray(fm, np.float32),
                           ModelGrid.from_dict(metadata["grid"]),
                           ModelGrid.from_dict(metadata["feature_grid"]))

    # ---- text -------------------------------------------------------------------------------
    def text_embeddings(self, texts) -> np.ndarray:
        """(N, 512) L2-normalised text embeddings (cached per text)."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            with torch.inference_mode():
                e = torch.nn.functional.normalize(self.net.text(todo).float(), dim=-1).cpu().numpy()
            self._text_cache.update(zip(todo, e))
            _write_text_cache(self.text_cache_file, self._text_cache)
        return np.stack([self._text_cache[t] for t in texts])

    def ensemble(self, finding: str, laterality: Optional[str], positives=None):
        """Text embeddings of the positive and negated phrasings (``phrases.ensemble``, the
        same prompts every backend scores with; ``positives`` replaces the positive ones)."""
        pos, neg = phrases.ensemble(finding, laterality)
        if positives is not None:
            pos = tuple(positives)
        if not pos or not neg:
            raise InputError(f"the vocabulary has no positive/negated phrasings for {finding!r}")
        return self.text_embeddings(list(pos)), self.text_embeddings(list(neg))

    def score(self, embedding: np.ndarray, finding: str, laterality: Optional[str] = None,
              positives=None) -> float:
        pos, neg = self.ensemble(finding, laterality, positives)
        return float((pos @ embedding).mean() - (neg @ embedding).mean())

    def presence(self, state: MerlinState, finding: str, anatomy: str, side: Optional[str],
                 positives=None, raw: bool = False) -> float:
        """The zero-shot score of ``finding`` (a probability once a site calibrated it, unless
        ``raw``); Merlin judges the whole image, so ``anatomy`` only selects the side."""
        sided = vocabulary.get(finding).sided
        s = self.score(state.embedding, finding, side if sided else None, positives)
        return s if raw or self.calibration is None else self.calibration.probability(s, finding)

    def answer(self, state: MerlinState, request) -> Answer:
        cal = self.calibration
        ans = Answer(model=self.info.id, calibrated=cal is not None,
                     calibration=cal.label if cal is not None else None,
                     decision_score=None if cal is not None else 0.0)
        if request.kind != "finding" or not request.finding or not request.want_scores:
            return ans
        for key in request.anatomies or ("body",):
            side = vocabulary.get(key).side or request.laterality
            ans.scores[key] = self.presence(state, request.finding, key, side)
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


def _read_text_cache(path) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            texts, emb = z["texts"], z["embeddings"]
        if emb.ndim != 2 or len(texts) != len(emb):
            return {}
        return {str(t): e.astype(np.float32) for t, e in zip(texts, emb)}
    except (OSError, ValueError, KeyError):
        return {}   # a damaged cache is only recomputed


def _write_text_cache(path, cache: dict) -> None:
    if path is None or not cache:
        return
    import os
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".text-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, texts=np.array(list(cache)), embeddings=np.stack(list(cache.values())))
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass        # a read-only cache only costs time
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


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
    info = ModelInfo(id=(entry.id if entry else cfg.get("id", "merlin")),
                     version=(entry.version if entry else cfg.get("version", "")),
                     sha256=summary["weights_sha256"], kind="merlin",
                     license=(entry.license if entry else "MIT"), path=str(folder))
    cache = catalog.cache_dir() / "text-embeddings" / f"merlin-{summary['weights_sha256'][:16]}.npz"
    return MerlinBackend(net, tok, info, dev, text_cache_file=cache)


def load(entry, device=None, progress=None) -> MerlinBackend:
    folder = catalog.cached_model_dir(entry)
    if not (folder / catalog.WEIGHTS).is_file():
        raise CheckpointError(WEIGHTS_HINT.replace("merlin`", f"{entry.id}`"))
    report(progress, 0.0, f"loading {entry.id}")
    return load_folder(folder, device=device, entry=entry)
