"""The embedded grounded model (``model.GroundedCTModel``) as a backend.

``encode`` computes, once per volume: the model-space image (``preprocess.to_model_space``), the
dense features, every anatomy's mask logits (from the stage-1 segmentation head when the model has
one, ``model/seg_head.py``; else the mask head driven by the anatomy's canonical phrase), the seg
head's finding channels, and the organ-grounded embeddings pooled inside the binarised predicted anatomy masks --
the recipe the calibration was fitted with (``training.train.collect_predictions``).

With another anatomy backend in the pipeline (``anatomy``: ``protocol.AnatomyMasks``), the
organ embeddings are pooled inside *its* masks wherever it has the anatomy (the fVLM recipe with
TotalSegmentator masks); anatomy prompts are then answered by that backend.

``answer`` (no image network pass): anatomy -> the stored anatomy logits; finding -> the seg
head's channel for that finding and side (else the mask head for the finding's canonical phrase;
free text the vocabulary does not know never gets here), restricted to (a dilation of) the anatomy it is judged
in, and presence from the prompt ensembles against that anatomy's embedding, calibrated.
Masks are returned as logits on the feature grid; the engine maps them to the source voxels.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .. import phrases as P
from ..engine.protocol import Answer, Capabilities, ModelInfo, Request
from ..engine.progress import check_cancel, report
from ..engine.scoring import Calibration, site_calibration
from ..errors import CTLanguageError, InputError

log = logging.getLogger(__name__)

KIND = "grounded"
# dilation (in feature voxels) of the anatomy region a finding mask is restricted to
RESTRICT_DILATION = 2
OUTSIDE_LOGIT = np.float32(-30.0)   # mask logit given outside the anatomy a finding is judged in


def dilate6(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the 6-neighbour cross, ``iterations`` times, outside = background
    (what ``scipy.ndimage.binary_dilation`` does with ``generate_binary_structure(3, 1)``; with
    numpy shifts, so a prompt does not pay scipy.ndimage's ~0.5 s import)."""
    r = np.asarray(mask, dtype=bool).copy()
    for _ in range(max(int(iterations), 0)):
        grown = r.copy()
        for axis in range(r.ndim):
            n = r.shape[axis]
            if n < 2:
                continue
            lo = [slice(None)] * r.ndim
            hi = [slice(None)] * r.ndim
            lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
            grown[tuple(lo)] |= r[tuple(hi)]
            grown[tuple(hi)] |= r[tuple(lo)]
        r = grown
    return r


@dataclass
class GroundedState:
    """Feature-grid tensors of one volume: ``dense`` [C,d,h,w], ``organ_logits`` [A,d,h,w],
    ``organ_embeddings`` [A,E], ``global_embedding`` [E] (on the backend's device)."""

    model_grid: Any                  # preprocess.ModelGrid
    feature_grid: Any                # model_grid.scaled(feature_stride)
    anatomies: list
    dense: Any
    organ_logits: Any
    organ_embeddings: Any
    global_embedding: Any
    finding_logits: Any = None       # [F,d,h,w] seg-head finding channels (models with a seg head)
    timings: dict = field(default_factory=dict)
    _organ_logit_np: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    _regions: dict = field(default_factory=dict, repr=False, compare=False)
    _head_cache: dict = field(default_factory=dict, repr=False, compare=False)

    TENSORS = ("dense", "organ_logits", "organ_embeddings", "global_embedding")
    OPTIONAL = ("finding_logits",)

    def tensors(self) -> Mapping[str, Any]:
        return {k: getattr(self, k).detach().float().cpu().contiguous()
                for k in self.TENSORS + self.OPTIONAL if getattr(self, k) is not None}

    def metadata(self) -> dict:
        return {"model_grid": self.model_grid.to_dict(), "feature_grid": self.feature_grid.to_dict(),
                "anatomies": list(self.anatomies)}

    def nbytes(self) -> int:
        return int(sum(getattr(self, k).numel() * getattr(self, k).element_size()
                       for k in self.TENSORS + self.OPTIONAL if getattr(self, k) is not None))

    def organ_logit_array(self) -> np.ndarray:
        """[A,d,h,w] float32 anatomy mask logits on the CPU (cached)."""
        if self._organ_logit_np is None:
            self._organ_logit_np = np.ascontiguousarray(
                self.organ_logits.detach().float().cpu().numpy(), dtype=np.float32)
        return self._organ_logit_np

    def anatomy_index(self, key: str) -> int:
        try:
            return self.anatomies.index(key)
        except ValueError:
            raise InputError(f"The model has no mask for anatomy '{key}'.") from None

    def region(self, keys: Sequence[str], dilation: int) -> np.ndarray:
        """Boolean feature-grid region: union of the anatomies' predicted masks, dilated."""
        cache_key = (tuple(sorted(keys)), int(dilation))
        r = self._regions.get(cache_key)
        if r is None:
            logit = self.organ_logit_array()
            r = np.zeros(logit.shape[1:], dtype=bool)
            for k in keys:
                r |= logit[self.anatomy_index(k)] >= 0.0
            r = dilate6(r, int(dilation))
            self._regions[cache_key] = r
        return r


class GroundedBackend:
    """Backend over one ``GroundedCTModel`` (anatomy masks, finding masks, calibrated scores)."""

    def __init__(self, model, model_dir: Optional[Path] = None, device: str = "cpu",
                 sha256: Optional[str] = None, license: str = "", calibration_name: str = "",
                 notice: str = ""):
        self.model = model
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        cfg = model.config
        self.config = cfg
        self.anatomies = list(cfg.anatomies)
        self.presence_source = getattr(cfg, "presence_source", "organ")
        sha = sha256 or _state_sha256(model)
        site = site_calibration(str(cfg.model_id), sha, self.model_dir)
        self.calibration = site or Calibration.from_model_config(cfg, name=calibration_name)
        self.info = ModelInfo(id=str(cfg.model_id), version=str(cfg.version), sha256=sha, kind=KIND,
                              license=license, path=str(self.model_dir) if self.model_dir else None,
                              calibration=self.calibration.label, notice=notice)
        self.capabilities = Capabilities(anatomy=tuple(self.anatomies), finding_masks=True,
                                         scores=True, calibrated=True, heatmaps=True)
        self._text_cache: dict = {}
        self._phrase_index = None

    # ---- text ------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]):
        """[N,E] joint-space embeddings (cached per string)."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.inference_mode():
                emb = self.model.embed_text(list(missing))
            for t, e in zip(missing, emb):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts], 0)

    def _all_phrases(self):
        """Every phrase a known prompt can need: canonical phrases, ensembles (per side) and the
        vocabulary phrase index of the semantic fallback."""
        from .. import vocabulary as V
        from ..prompts import vocabulary_phrases

        rows = vocabulary_phrases()
        out = [P.canonical_phrase(a) for a in self.anatomies]
        for f in V.findings():
            for lat in ([None, "left", "right"] if V.is_sided(f) else [None]):
                out.append(P.canonical_phrase(f, lat))
                pos, neg = P.ensemble(f, lat)
                out += list(pos) + list(neg)
        out += [r[0] for r in rows]
        return list(dict.fromkeys(out)), rows

    def warm_up(self, progress=None) -> None:
        """Embed every vocabulary phrase once (frozen LM outputs cached on disk per text encoder),
        so that the first query of a known prompt needs no language-model pass."""
        import torch

        from ..catalog import cache_dir

        phrases, rows = self._all_phrases()
        enc_name = str(getattr(self.config, "text_encoder", ""))
        digest = hashlib.sha256(("\n".join(phrases) + "|" + enc_name).encode()).hexdigest()[:16]
        cache_file = cache_dir() / "text_base" / f"{digest}.npy"
        base = None
        if cache_file.is_file():
            try:
                base = np.load(cache_file, allow_pickle=False)
                if base.shape[0] != len(phrases):
                    base = None
            except (OSError, ValueError):
                base = None
        if base is None:
            report(progress, 0.0, "Embedding the vocabulary (first use of this text encoder)")
            base = self.model.text_base(phrases).float().cpu().numpy()
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.npy")
                np.save(tmp, base)
                os.replace(tmp, cache_file)
            except OSError:
                log.debug("could not write the text embedding cache", exc_info=True)
        base_t = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
        self.model.text_encoder.remember(phrases, base_t)
        with torch.inference_mode():
            proj = self.model.text_projection(base_t.to(self.device))
        for ph, e in zip(phrases, proj):
            self._text_cache.setdefault(ph, e)
        idx = {ph: i for i, ph in enumerate(phrases)}
        emb = base[[idx[r[0]] for r in rows]]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
        self._phrase_index = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                              emb.astype(np.float32))

    def nearest_phrase(self, text: str) -> tuple:
        """(phrase, key, laterality, cosine similarity) of the closest vocabulary phrase in the
        frozen text encoder's space."""
        import torch

        if self._phrase_index is None:
            self.warm_up()
        phrases, keys, lats, emb = self._phrase_index
        with torch.inference_mode():
            q = self.model.text_base([text]).float().cpu().numpy()[0]
        q = q / max(float(np.linalg.norm(q)), 1e-8)
        sims = emb @ q
        i = int(np.argmax(sims))
        return phrases[i], keys[i], lats[i], float(sims[i])

    # ---- mask head on stored features ---------------------------------------------------------
    def mask_logits(self, dense, text, cache: Optional[dict] = None):
        """Mask logits [N,d,h,w] for one volume's dense [C,d,h,w] and N prompt embeddings; the
        text-independent part of the head is computed once per volume and kept in ``cache``."""
        head = self.model.mask_head
        emb = None if cache is None else cache.get("phi")
        if emb is None:
            emb = head.voxel_embedding(dense)
            if cache is not None:
                cache["phi"] = emb
        return head.logits_from_embedding(emb, text, dense.shape[1:])

    # ---- contract --------------------------------------------------------------------------
    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> GroundedState:
        import torch

        from ..preprocess import to_model_space

        timings = {}
        report(progress, 0.05, "Resampling to model space")
        t = _now()
        mi = to_model_space(volume, self.config.spec)
        timings["preprocess"] = _now() - t
        check_cancel(cancel)
        x = torch.from_numpy(np.ascontiguousarray(mi.array, dtype=np.float32))[None, None].to(self.device)
        report(progress, 0.25, "Encoding image")
        t = _now()
        with torch.inference_mode(), _ProgressHooks(self.model, progress, cancel, 0.25, 0.8):
            feats = self.model.encode_image(x)
        timings["image_encoder"] = _now() - t
        del x
        check_cancel(cancel)
        report(progress, 0.8, "Segmenting anatomy")
        t = _now()
        head_cache: dict = {}
        with torch.inference_mode():
            dense = feats.dense
            ta = self.embed([P.canonical_phrase(a) for a in self.anatomies])
            finding_logits = None
            if self.model.seg_head is not None:
                organ_logits = self.model.anatomy_mask_logits(dense, self.anatomies, ta)[0]
                fl = self.model.seg_logits(dense)[1]
                finding_logits = None if fl is None else fl[0].float().contiguous()
            else:
                organ_logits = self.mask_logits(dense[0], ta, head_cache)
            check_cancel(cancel)
            report(progress, 0.9, "Organ embeddings")
            masks = (organ_logits > 0).to(dense.dtype)[None]
            if anatomy is not None:   # pool inside the anatomy backend's masks where it has them
                feature_grid = mi.grid.scaled(int(self.config.feature_stride))
                for a, key in enumerate(self.anatomies):
                    if key in anatomy.keys:
                        m = feature_grid.labels_to_model(anatomy.mask((key,)), volume)
                        masks[0, a] = torch.from_numpy(m > 0).to(masks.dtype)
            organ_emb = self.model.organ_embeddings(dense, masks)[0]
        timings["organs"] = _now() - t
        grid = mi.grid
        state = GroundedState(
            model_grid=grid, feature_grid=grid.scaled(int(self.config.feature_stride)),
            anatomies=list(self.anatomies), dense=dense[0].contiguous(),
            organ_logits=organ_logits.float().contiguous(), organ_embeddings=organ_emb.float(),
            global_embedding=feats.global_embedding[0].float(), finding_logits=finding_logits,
            timings=timings,
            _head_cache=head_cache)
        if tuple(state.dense.shape[1:]) != tuple(state.feature_grid.shape):
            raise CTLanguageError(
                f"The model's feature map {tuple(state.dense.shape[1:])} does not match the feature "
                f"grid {state.feature_grid.shape}; the model and preprocessing disagree.")
        return state

    def restore(self, metadata: dict, tensors: Mapping[str, Any]) -> GroundedState:
        import torch

        from ..preprocess import ModelGrid

        missing = [k for k in GroundedState.TENSORS if k not in tensors]
        if missing:
            raise InputError(f"incomplete encoding (missing {', '.join(missing)})")
        t = {k: torch.as_tensor(tensors[k]).to(self.device) for k in GroundedState.TENSORS
             + GroundedState.OPTIONAL if k in tensors}
        state = GroundedState(model_grid=ModelGrid.from_dict(metadata["model_grid"]),
                              feature_grid=ModelGrid.from_dict(metadata["feature_grid"]),
                              anatomies=list(metadata["anatomies"]), **t)
        fshape = tuple(state.feature_grid.shape)
        if tuple(state.dense.shape[1:]) != fshape or \
                tuple(state.organ_logits.shape) != (len(state.anatomies),) + fshape:
            raise InputError("inconsistent encoding (tensor shapes do not match its grid)")
        self.prepare(state)
        return state

    def prepare(self, state: GroundedState) -> None:
        """The text-independent part of the mask head, so that the first prompt is fast."""
        import torch

        with torch.inference_mode():
            state._head_cache["phi"] = self.model.mask_head.voxel_embedding(state.dense)

    def answer(self, state: GroundedState, request: Request) -> Answer:
        import torch

        with torch.inference_mode():
            if request.kind == "anatomy":
                logit = state.organ_logit_array()
                idx = [state.anatomy_index(k) for k in request.anatomies]
                lg = logit[idx[0]] if len(idx) == 1 else np.max(logit[idx], axis=0)
                return Answer(model=self.info.id, logit=lg, grid=state.feature_grid)
            lg, scores = self._finding(state, request)
        return Answer(model=self.info.id, logit=lg, grid=state.feature_grid, scores=scores,
                      calibrated=True, calibration=self.calibration.label)

    def _finding(self, state: GroundedState, req: Request):
        """Mask logits restricted to each judged anatomy (max over sides) and presence per side."""
        from .. import vocabulary as V

        sides = [V.get(a).side if V.get(a).kind == "anatomy" else None for a in req.anatomies]
        logits = None
        if req.want_mask and V.get(req.finding).mask_is_anatomy:   # enlargement: the organ itself
            organ = state.organ_logit_array()
            logits = np.stack([organ[state.anatomy_index(a)] for a in req.anatomies])
        elif req.want_mask:
            chans = self.model.finding_channels([(req.finding, s) for s in sides]) \
                if state.finding_logits is not None else [None] * len(sides)
            if all(c is not None for c in chans):   # the seg head's finding channels
                logits = state.finding_logits[chans].float().cpu().numpy()
            else:
                t = self.embed([P.canonical_phrase(req.finding, s) for s in sides])
                logits = self.mask_logits(state.dense, t, state._head_cache).float().cpu().numpy()
        out, scores = None, {}
        for n, (a, s) in enumerate(zip(req.anatomies, sides)):
            if logits is not None:
                lg = logits[n]
                if a != "body" and not V.get(req.finding).mask_is_anatomy:
                    region = req.region
                    keys = [region] if (region and region in state.anatomies and
                                        V.get(region).side in (None, s)) else [a]
                    lg = np.where(state.region(keys, RESTRICT_DILATION), lg, OUTSIDE_LOGIT)
                out = lg if out is None else np.maximum(out, lg)
            if req.want_scores:
                scores[a] = self.presence(state, req.finding, a, s)
        if out is not None:
            out = np.ascontiguousarray(out, dtype=np.float32)
        return out, scores

    def presence(self, state: GroundedState, finding: str, anatomy: str, side: Optional[str],
                 positives: Optional[Sequence[str]] = None, raw: bool = False) -> float:
        """Calibrated presence of ``finding`` judged in ``anatomy`` (``raw``: the uncalibrated
        logit, what calibration fits on); ``positives`` replaces the positive phrasings of the
        ensemble (paraphrase evaluation)."""
        import torch

        pos, neg = P.ensemble(finding, side)
        if positives is not None:
            pos = list(positives)
        with torch.inference_mode():
            pe, ne = self.embed(list(pos)), self.embed(list(neg))
            src = state.global_embedding if self.presence_source == "global" else \
                state.organ_embeddings[state.anatomy_index("body" if self.presence_source == "body"
                                                           else anatomy)]
            logit = float(self.model.presence_logit(src, pe, ne))
        return logit if raw else self.calibration.probability(logit, finding)


# ---- module interface (backends/__init__.py) -------------------------------------------------
def load(entry=None, device: Optional[str] = None, progress=None, model_dir=None,
         warm_text: bool = True) -> GroundedBackend:
    """The backend for a catalog entry (or an explicit model folder)."""
    from ..catalog import resolve_model
    from ..model import GroundedCTModel
    from ..model.checkpoint import weights_sha256

    if model_dir is None:
        model_dir, entry = resolve_model(entry.id if entry is not None else "default")
    model_dir = Path(model_dir)
    report(progress, 0.1, f"Loading model {model_dir.name}")
    net = GroundedCTModel.from_pretrained(model_dir, device=device)
    net.eval()
    name = "held-out synthetic phantoms" if entry is not None and entry.embedded else ""
    backend = GroundedBackend(net, model_dir, device, sha256=weights_sha256(model_dir),
                              license=getattr(entry, "license", "") or "", calibration_name=name,
                              notice=demo_model_notice(entry))
    if warm_text:
        report(progress, 0.6, "Loading text encoder")
        backend.warm_up()
    return backend


def demo_model_notice(entry) -> str:
    """The measured limits of a model trained on synthetic anatomy (from its catalog entry)."""
    m = getattr(entry, "metrics", None) or {}
    if entry is None or not entry.embedded or not m:
        return ""
    return (f"{entry.id} is a demonstration model trained only on synthetic anatomy. On held-out "
            f"phantoms: organ Dice {m.get('mean_organ_dice')}, finding AUC "
            f"{m.get('mean_finding_auc')}, finding Dice {m.get('mean_finding_dice')}. On real CT it "
            "is not meaningful (blind check: organ Dice 0.15 over 13 organs, lesions missed).")


def describe(entry) -> Capabilities:
    """What the model can do, from its folder's config.json (no weights read, no torch); when the
    folder is not on disk, how to get the weights."""
    import json

    from ..catalog import resolve_model

    spec = entry.id if entry is not None else "default"
    try:
        model_dir, _ = resolve_model(spec)
        anatomies = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["anatomies"]
        present, hint = True, ""
    except (CTLanguageError, OSError, ValueError, KeyError):
        anatomies, present = (), False
        hint = f"run `ctlanguage models download {spec}`"
    return Capabilities(anatomy=tuple(anatomies), finding_masks=True, scores=True, calibrated=True,
                        heatmaps=True, weights_present=present, weights_hint=hint)


# ---- helpers -------------------------------------------------------------------------------
def _now() -> float:
    import time

    return time.perf_counter()


def _state_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _ProgressHooks:
    """Forward hooks on the image encoder's blocks: progress and cancel between blocks."""

    def __init__(self, model, progress, cancel, lo, hi):
        self.handles = []
        self.progress, self.cancel, self.lo, self.hi = progress, cancel, lo, hi
        enc = getattr(model, "image_encoder", None)
        self.blocks = list(enc.children()) if enc is not None else []
        self.n = max(len(self.blocks), 1)
        self.done = 0

    def _hook(self, *_):
        self.done += 1
        check_cancel(self.cancel)
        report(self.progress, self.lo + (self.hi - self.lo) * min(self.done / self.n, 1.0),
               "Encoding image")

    def __enter__(self):
        if self.progress is None and self.cancel is None:
            return self
        import torch

        for b in self.blocks:
            mods = list(b.children()) if isinstance(b, torch.nn.ModuleList) else [b]
            for m in mods:
                self.handles.append(m.register_forward_hook(self._hook))
        self.n = max(len(self.handles), 1)
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False
