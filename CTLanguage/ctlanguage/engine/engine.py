"""The Engine: composes backends, encodes a CT once, answers any number of prompts.

::

    engine = Engine.load("default")                     # a catalog id, pipeline or model folder
    enc = engine.encode(volume, progress=cb, cancel=stop)   # cached by volume hash + pipeline
    for f in engine.query(enc, "liver lesion; fluid around the left lung"):
        f.mask           # uint8, exactly volume.array.shape, on the source voxel grid
        f.probability    # the answer's number (None for anatomy); f.score_label says what it is
        f.mask_model, f.score_model    # which model produced each part

A pipeline assigns backends to roles (``protocol.ROLES``): ``anatomy`` masks anatomy prompts,
``masks`` masks findings, ``scores`` scores findings; one backend may hold several roles. Per
prompt the engine parses the text (``prompts``; unknown text falls back to the nearest vocabulary
phrase of a backend that can embed text, with a confidence from the similarity), asks the
backends, maps masks onto the source voxels (``resample``) and labels every number.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import CheckpointError, CTLanguageError, InputError, PromptError
from .encoding import Encoding
from .finding import Finding, check_threshold
from .progress import check_cancel, report, scaled
from .protocol import ROLES, AnatomyMasks, Backend, ConceptMatcher, ModelInfo, Request
from .scoring import answer_value, combine_sides, judged_absent
from .threads import TorchThreads

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "ctlanguage-synth-v3"
MAX_PROMPTS_PER_QUERY = 64
# similarity -> confidence for the semantic fallback (cosine of the frozen LM's embeddings)
FALLBACK_SIM_LOW = 0.35
FALLBACK_SIM_HIGH = 0.85
FALLBACK_MAX_CONFIDENCE = 0.8
# below this prompt confidence the text is "not understood": no mask, no number
MIN_UNDERSTOOD_CONFIDENCE = 0.2
# a finding whose presence probability is below this gets no mask unless absent masks are asked for
PRESENCE_THRESHOLD = 0.5


def resolve_device(device) -> str:
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CTLanguageError("CUDA was requested but no CUDA GPU is available; use --device cpu.")
    if dev not in ("cpu",) and not dev.startswith("cuda"):
        raise CTLanguageError(f"Unknown device {dev!r}; use 'cpu' or 'cuda'.")
    return dev


def resolve_model_dir(model: str | os.PathLike | None = "default") -> Path:
    """Model folder for "default", a catalog id or an explicit folder path."""
    from ..catalog import resolve_model

    return Path(resolve_model(model)[0])


class Engine:
    """Holds a pipeline of backends; encodes volumes and answers prompts. Thread-safe (one
    encode at a time)."""

    def __init__(self, roles: dict, info: Optional[ModelInfo] = None, device: str = "cpu",
                 cache_size: int = 4):
        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise CTLanguageError(f"The pipeline assigns no backend to {', '.join(missing)}.")
        self.roles: dict = dict(roles)
        self.backends: list = list({id(b): b for b in (roles[r] for r in ROLES)}.values())
        self.info = info or _pipeline_info(self.backends)
        self.device = device
        self._cache: "OrderedDict[tuple, Encoding]" = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.RLock()
        self._encoding_active = False
        self.single_thread_queries = device == "cpu"

    # ---- identity ----------------------------------------------------------------------------
    model_id = property(lambda self: self.info.id)
    model_version = property(lambda self: self.info.version)
    model_sha256 = property(lambda self: self.info.sha256)

    @property
    def model_dir(self) -> Optional[Path]:
        return Path(self.info.path) if self.info.path else None

    @property
    def anatomies(self) -> list:
        return list(self.roles["anatomy"].capabilities.anatomy)

    def describe(self) -> dict:
        d = {"id": self.model_id, "version": self.model_version, "sha256": self.model_sha256,
             "path": self.info.path, "device": self.device, "calibration": self.info.calibration,
             "license": self.info.license, "notice": self.info.notice,
             "roles": {r: b.info.id for r, b in self.roles.items()}}
        if len(self.backends) > 1:
            d["backends"] = [dict(b.info.to_dict(), capabilities=b.capabilities.summary())
                             for b in self.backends]
        return d

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, model: Any = "default", device: Optional[str] = None, progress=None,
             warm_text: bool = True) -> "Engine":
        """Load "default" (the embedded model), a catalog id (a model or a pipeline), a model
        folder, an already constructed ``GroundedCTModel`` or a backend. ``device`` None picks
        CUDA when available."""
        from .. import catalog
        from ..model import GroundedCTModel

        dev = resolve_device(device)
        if isinstance(model, GroundedCTModel):
            from ..backends.grounded import GroundedBackend

            model.to(dev).eval()
            b = GroundedBackend(model, None, dev)
            return cls(dict.fromkeys(ROLES, b), device=dev)
        if isinstance(model, Backend):
            return cls(dict.fromkeys(ROLES, model), device=dev)
        report(progress, 0.0, "Locating model")
        path, entry = catalog.resolve_model(model)
        pipeline = getattr(entry, "pipeline", None) if entry is not None else None
        if not pipeline:
            b = _load_backend(entry, path, dev, progress, warm_text)
            report(progress, 1.0, "Model ready")
            return cls(dict.fromkeys(ROLES, b), device=dev)
        loaded: dict = {}
        roles = {}
        for i, role in enumerate(ROLES):
            member = pipeline.get(role) or pipeline.get("scores")
            if member not in loaded:
                sub_path, sub = catalog.resolve_model(member)
                loaded[member] = _load_backend(sub, sub_path, dev,
                                               scaled(progress, i / 3, (i + 1) / 3), warm_text)
            roles[role] = loaded[member]
        info = _pipeline_info(list(loaded.values()), entry)
        report(progress, 1.0, "Pipeline ready")
        return cls(roles, info=info, device=dev)

    # ---- text ----------------------------------------------------------------------------------
    def _matcher(self) -> Optional[ConceptMatcher]:
        for role in ("scores", "masks", "anatomy"):
            if isinstance(self.roles[role], ConceptMatcher):
                return self.roles[role]
        return None

    def nearest_phrase(self, text: str):
        m = self._matcher()
        if m is None:
            raise PromptError(f"'{text}' was not understood and no model of this pipeline can "
                              "match free text.")
        return m.nearest_phrase(text)

    def warm_up(self, progress=None) -> None:
        for b in self.backends:
            if callable(getattr(b, "warm_up", None)):
                b.warm_up(progress)

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, volume, progress=None, cancel=None, use_cache: bool = True) -> Encoding:
        """Encode ``volume`` (a CTVolume) once with every backend; the same content and pipeline
        return the cached encoding. ``cancel()`` returning True raises CancelledError."""
        t0 = time.perf_counter()
        report(progress, 0.0, "Checking volume")
        check_cancel(cancel)
        if not hasattr(volume, "array") or not hasattr(volume, "ijk_to_ras"):
            raise InputError("encode() needs a CTVolume (array + ijk_to_ras).")
        vhash = volume.content_hash()
        key = (vhash, self.model_sha256)
        with self._lock:
            if use_cache and key in self._cache:
                self._cache.move_to_end(key)
                enc = self._cache[key]
                enc._volume = volume
                report(progress, 1.0, "Encoding reused (same volume and model)")
                return enc
        timings = {"hash": time.perf_counter() - t0}
        with self._lock, _Flag(self, "_encoding_active"):
            parts: dict = {}
            order = sorted(self.backends, key=lambda b: b is not self.roles["anatomy"])
            anatomy_backend = self.roles["anatomy"]
            for i, b in enumerate(order):
                span = scaled(progress, 0.02 + 0.98 * i / len(order), 0.02 + 0.98 * (i + 1) / len(order))
                # a backend that is not the anatomy one gets the anatomy masks to pool in
                anat = None if b is anatomy_backend else AnatomyMasks(
                    anatomy_backend, parts[anatomy_backend.info.id], volume)
                state = b.encode(volume, progress=span, cancel=cancel, anatomy=anat)
                parts[b.info.id] = state
                for k, v in (getattr(state, "timings", None) or {}).items():
                    timings[k if len(order) == 1 else f"{b.info.id}.{k}"] = v
            timings["total"] = time.perf_counter() - t0
            enc = Encoding(model_id=self.model_id, model_version=self.model_version,
                           model_sha256=self.model_sha256, volume_hash=vhash,
                           source_shape=tuple(volume.array.shape),
                           source_ijk_to_ras=np.array(volume.ijk_to_ras, dtype=np.float64),
                           parts=parts, timings=timings, source=getattr(volume, "source", None),
                           _volume=volume)
            if use_cache:
                self._cache[key] = enc
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        report(progress, 1.0, f"Encoded in {timings['total']:.1f} s")
        return enc

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _check_encoding(self, enc: Encoding) -> None:
        if not isinstance(enc, Encoding):
            raise TypeError("query() needs an Encoding from Engine.encode or Encoding.load")
        if enc.model_sha256 != self.model_sha256 or enc.model_id != self.model_id:
            raise CheckpointError(
                f"The encoding was made with model {enc.model_id} ({enc.model_sha256[:12]}…), not "
                f"with the loaded model {self.model_id} ({self.model_sha256[:12]}…); encode again.")

    # ---- query ---------------------------------------------------------------------------------
    def query(self, encoding: Encoding, text: str, mask_threshold: float = 0.5,
              volume=None, compute_masks: bool = True, absent_masks: bool = False,
              presence_threshold: float = PRESENCE_THRESHOLD) -> list:
        """Answer one or several prompts separated by ';', '|' or new lines.

        PromptError for empty text. ``volume`` attaches the source volume to an encoding loaded
        from disk after checking it is the right one. ``compute_masks=False`` skips mapping masks
        to the source grid (``mask`` is then None; for scoring only). A finding judged absent
        (presence probability below ``presence_threshold``) gets an empty mask unless
        ``absent_masks``; text not understood gets neither a mask nor a number."""
        from ..prompts import split_prompts

        self._check_encoding(encoding)
        if volume is not None and encoding._volume is not volume:
            encoding.attach(volume)
        if not isinstance(text, str):
            raise PromptError(f"A prompt must be text, not {type(text).__name__}.")
        mask_threshold = check_threshold(mask_threshold)
        presence_threshold = check_threshold(presence_threshold)
        opts = dict(compute_masks=compute_masks, absent_masks=absent_masks,
                    presence_threshold=presence_threshold)
        parts = split_prompts(text)
        if len(parts) > MAX_PROMPTS_PER_QUERY:
            raise PromptError(f"{len(parts)} prompts in one query; give at most {MAX_PROMPTS_PER_QUERY}.")
        if self._encoding_active or not self.single_thread_queries:
            return [self.query_one(encoding, p, mask_threshold, **opts) for p in parts]
        with TorchThreads(1):
            return [self.query_one(encoding, p, mask_threshold, **opts) for p in parts]

    def _resolve(self, prompt: str) -> tuple:
        """(parsed, Request, confidence, matched phrase, fallback used)."""
        from .. import vocabulary as V
        from ..prompts import parse_prompt

        parsed = parse_prompt(prompt)
        kind, finding, laterality = parsed.kind, parsed.finding, parsed.laterality
        covers = tuple(parsed.anatomies or ())
        confidence, matched, fallback = float(parsed.confidence), parsed.matched, False
        if kind == "unknown" or not covers:
            # semantic fallback: nearest vocabulary phrase in a backend's text space
            phrase, key, lat, sim = self.nearest_phrase(parsed.text)
            fallback, matched = True, phrase
            term = V.get(key)
            kind = term.kind
            if kind == "anatomy":
                finding, laterality, covers = None, term.side, (key,)
            else:
                finding, laterality = key, lat
                covers = tuple(V.resolve_anatomies(key, lat))
            confidence = _similarity_confidence(sim)
        elif kind == "anatomy" and parsed.unknown_tokens and confidence < 1.0:
            # "small round opacity in the lung": an anatomy plus words the parser does not know;
            # a finding of that anatomy close in the text space answers the prompt better
            phrase, key, lat, sim = self.nearest_phrase(parsed.text)
            sim_conf = _similarity_confidence(sim)
            if V.get(key).kind == "finding" and sim_conf > max(confidence, MIN_UNDERSTOOD_CONFIDENCE):
                side = laterality if laterality in ("left", "right") else lat
                judged = tuple(V.resolve_anatomies(key, side))
                if set(judged) & set(covers) or _same_group(judged, covers):
                    kind, finding, laterality, covers = "finding", key, side, judged
                    confidence, matched, fallback = sim_conf, phrase, True
        req = Request(text=prompt, kind=kind, anatomies=covers, finding=finding,
                      laterality=laterality, region=parsed.region)
        return parsed, req, confidence, matched, fallback

    def query_one(self, enc: Encoding, prompt: str, mask_threshold: float = 0.5,
                  compute_masks: bool = True, absent_masks: bool = False,
                  presence_threshold: float = PRESENCE_THRESHOLD) -> Finding:
        from ..resample import SourceMapper
        from ..segment_codes import segment_identity

        t0 = time.perf_counter()
        timings = {}
        parsed, req, confidence, matched, fallback = self._resolve(prompt)
        timings["parse"] = time.perf_counter() - t0
        if fallback and confidence < MIN_UNDERSTOOD_CONFIDENCE:
            return self._not_understood(enc, prompt, parsed, confidence, matched, compute_masks,
                                        mask_threshold, timings)

        t = time.perf_counter()
        probability = probability_present = None
        per_anat: dict = {}
        score_ans = None
        if req.kind == "anatomy":
            b = self.roles["anatomy"]
            mask_ans = b.answer(enc.parts[b.info.id], req)
        else:
            mb, sb = self.roles["masks"], self.roles["scores"]
            mask_ans = mb.answer(enc.parts[mb.info.id], Request(**{**req.__dict__, "want_scores": mb is sb}))
            score_ans = mask_ans if mb is sb else sb.answer(
                enc.parts[sb.info.id], Request(**{**req.__dict__, "want_mask": False}))
            per_anat = dict(score_ans.scores)
            if per_anat:
                probability_present = combine_sides(per_anat.values(), req.laterality)
                probability = answer_value(probability_present, bool(parsed.negated), score_ans.calibrated)
        timings["heads"] = time.perf_counter() - t

        t = time.perf_counter()
        mapper = SourceMapper()
        mask = volume_ml = None
        suppressed = (req.kind == "finding" and not absent_masks and score_ans is not None
                      and judged_absent(probability_present, score_ans.calibrated, presence_threshold,
                                        score_ans.decision_score))
        if compute_masks and suppressed:
            mask, volume_ml = np.zeros(enc.volume.shape, dtype=np.uint8), 0.0
        elif compute_masks:
            if mask_ans.mask is not None:
                mask = mask_ans.mask
            elif mask_ans.logit is not None:
                mask = mapper.mask(mask_ans.logit, mask_ans.grid, enc.volume, mask_threshold)
            else:   # a scores-only model: nothing to draw
                mask = np.zeros(enc.volume.shape, dtype=np.uint8)
            volume_ml = float(np.count_nonzero(mask)) * enc.voxel_volume_ml
        timings["to_source"] = time.perf_counter() - t

        key = req.anatomies[0] if req.kind == "anatomy" else req.finding
        ident = segment_identity(req.kind, key, req.anatomies, req.laterality)
        timings["total"] = time.perf_counter() - t0
        return Finding(
            prompt=prompt, parsed=parsed, kind=req.kind, anatomy=ident["anatomy"],
            finding=req.finding, laterality=ident["laterality"], probability=probability,
            prompt_confidence=round(confidence, 3), mask=mask, volume_ml=volume_ml,
            codes=ident["codes"], color=ident["color"],
            negated=bool(parsed.negated) and req.kind == "finding",
            probability_present=probability_present, anatomy_probabilities=per_anat,
            anatomies=tuple(req.anatomies), matched=matched, fallback=fallback,
            name=prompt.strip()[:120], terminology=ident["terminology"],
            mask_threshold=float(mask_threshold),
            mask_model=mask_ans.model if (mask_ans.mask is not None or mask_ans.logit is not None) else None,
            score_model=score_ans.model if score_ans is not None and per_anat else None,
            calibrated=bool(score_ans and score_ans.calibrated and per_anat),
            calibration=score_ans.calibration if score_ans is not None and per_anat else None,
            decision_score=score_ans.decision_score if score_ans is not None and per_anat else None,
            mask_suppressed=bool(suppressed), timings=timings, _logit=mask_ans.logit,
            _grid=mask_ans.grid, _volume=enc.volume, _mapper=mapper)

    def _not_understood(self, enc, prompt, parsed, confidence, nearest, compute_masks,
                        mask_threshold, timings) -> Finding:
        """A prompt the system does not understand: no concept, no mask, no number; the nearest
        vocabulary phrase is offered as a suggestion."""
        timings["total"] = timings.get("parse", 0.0)
        mask = np.zeros(enc.volume.shape, dtype=np.uint8) if compute_masks else None
        return Finding(prompt=prompt, parsed=parsed, kind="unknown", anatomy=None, finding=None,
                       laterality=None, probability=None, prompt_confidence=round(confidence, 3),
                       mask=mask, volume_ml=0.0 if compute_masks else None, codes=None,
                       color=(128, 128, 128), understood=False,
                       suggestions=(nearest,) if nearest else (), name=prompt.strip()[:120],
                       mask_threshold=float(mask_threshold), timings=timings)

    # ---- direct scoring (evaluation, calibration) --------------------------------------------
    def presence_score(self, enc: Encoding, finding: str, laterality: Optional[str] = None) -> float:
        """The scores backend's raw (uncalibrated) presence logit, max over sides when unsided:
        what ``ctlanguage calibrate`` fits a site's calibration on."""
        return self.presence_probability(enc, finding, laterality, raw=True)

    def presence_probability(self, enc: Encoding, finding: str, laterality: Optional[str] = None,
                             positives=None, raw: bool = False) -> float:
        """Presence of ``finding`` from the scores backend (max over sides when unsided);
        ``positives`` replaces the positive phrasings of the ensemble (paraphrase evaluation)."""
        from .. import vocabulary as V

        sb = self.roles["scores"]
        state = enc.parts[sb.info.id]
        covers = tuple(V.resolve_anatomies(finding, laterality if laterality in ("left", "right") else None))
        if callable(getattr(sb, "presence", None)):
            return float(max(sb.presence(state, finding, a, V.get(a).side, positives=positives, raw=raw)
                             for a in covers))
        if positives is not None or raw:
            raise CTLanguageError(f"{sb.info.id} cannot give custom-phrasing or raw scores.")
        ans = sb.answer(state, Request(text=finding, kind="finding", anatomies=covers, finding=finding,
                                       laterality=laterality, want_mask=False))
        if not ans.scores:
            raise InputError(f"{sb.info.id} gives no score for {finding!r} on this scan")
        return float(max(ans.scores.values()))


def _load_backend(entry, path, device, progress, warm_text: bool):
    from ..backends import backend_module

    kind = getattr(entry, "backend", None) or "grounded"
    if kind == "grounded":
        return backend_module(kind).load(entry, device=device, progress=progress, model_dir=path,
                                         warm_text=warm_text)
    return backend_module(kind).load(entry, device=device, progress=progress)


def _similarity_confidence(sim: float) -> float:
    """Prompt confidence of a match found by text-embedding similarity (cosine ``sim``)."""
    scaled = (sim - FALLBACK_SIM_LOW) / (FALLBACK_SIM_HIGH - FALLBACK_SIM_LOW)
    return float(np.clip(scaled, 0.0, 1.0)) * FALLBACK_MAX_CONFIDENCE


def _same_group(a, b) -> bool:
    from .. import vocabulary as V

    ga = {V.get(k).group or k for k in a}
    gb = {V.get(k).group or k for k in b}
    return bool(ga & gb)


class _Flag:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __enter__(self):
        setattr(self.obj, self.name, True)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, False)
        return False


def _pipeline_info(backends: list, entry=None) -> ModelInfo:
    if len(backends) == 1 and entry is None:
        return backends[0].info
    h = hashlib.sha256("\n".join(f"{b.info.id}:{b.info.sha256}" for b in backends).encode())
    scores = backends[-1].info
    return ModelInfo(id=entry.id if entry is not None else "+".join(b.info.id for b in backends),
                     version=getattr(entry, "version", "") or "", sha256=h.hexdigest(),
                     kind="pipeline", license=" / ".join(dict.fromkeys(b.info.license for b in backends if b.info.license)),
                     calibration=scores.calibration)
