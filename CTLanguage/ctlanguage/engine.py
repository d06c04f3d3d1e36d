"""Inference engine: encode a CT once, then answer any number of free-text prompts.

::

    engine = Engine.load("default")                     # or a model folder / catalog id
    enc = engine.encode(volume, progress=cb, cancel=stop)   # cached by volume hash + model sha
    for f in engine.query(enc, "liver lesion; fluid around the left lung"):
        f.mask          # uint8, exactly volume.array.shape, on the source voxel grid
        f.probability   # calibrated presence (None for anatomy prompts)
        f.heatmap()     # float32 mask probability on the source grid (computed on demand)

What ``encode`` computes (once per volume and model): the model-space image
(``preprocess.to_model_space``), the dense features, every anatomy's mask logits (the mask head
driven by the anatomy's canonical name) and the organ-grounded embeddings pooled inside the
binarised predicted anatomy masks -- exactly the recipe the calibration temperature was fitted
with (``training.train.collect_predictions``).

What ``query`` does per prompt (no image network pass): parse (``prompts.parse_prompt``; an
unknown prompt falls back to the nearest vocabulary phrase in the text encoder's embedding space,
with a confidence that reflects the similarity), run the mask head for the prompt's canonical
phrase on the stored features, restrict a finding's mask to (a dilation of) the anatomy it is
judged in, score presence with the prompt ensembles against that anatomy's embedding, and map the
mask to the source grid (bounding-box limited; uint8 only).

See docs/architecture.md "Engine API" for the contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import CancelledError, CheckpointError, CTLanguageError, InputError, PromptError

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

DEFAULT_MODEL_ID = "ctlanguage-synth-v2"
ENCODING_FORMAT = "ctlanguage-encoding-v1"
MAX_PROMPTS_PER_QUERY = 64
# dilation (in feature voxels) of the anatomy region a finding mask is restricted to
DEFAULT_RESTRICT_DILATION = 2
# similarity -> confidence for the semantic fallback (cosine of the frozen LM's embeddings)
FALLBACK_SIM_LOW = 0.35
FALLBACK_SIM_HIGH = 0.85
FALLBACK_MAX_CONFIDENCE = 0.8
_BILATERAL_CODE = ("51440002", "SCT", "Bilateral")
OUTSIDE_LOGIT = np.float32(-30.0)   # mask logit given outside the anatomy a finding is judged in


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _report(progress: Optional[ProgressFn], fraction: float, message: str) -> None:
    if progress is not None:
        try:
            progress(float(min(max(fraction, 0.0), 1.0)), message)
        except CancelledError:
            raise
        except Exception:  # a broken progress callback must not break inference
            log.debug("progress callback failed", exc_info=True)


def _check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise CancelledError("Encoding was cancelled.")


def _resolve_device(device) -> str:
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
    spec = "default" if model is None else model
    s = str(spec)
    p = Path(s).expanduser()
    if isinstance(spec, os.PathLike) or p.exists() or os.sep in s or s.startswith("."):
        if p.is_file():
            p = p.parent
        if not p.is_dir():
            raise CheckpointError(f"The model folder {p} does not exist.")
        return p
    try:  # catalog (embedded default, per-user cache)
        from . import catalog
    except ImportError:
        catalog = None
    if catalog is not None and hasattr(catalog, "resolve_model"):
        return Path(catalog.resolve_model(s)[0])
    from .resources import resources_dir

    key = DEFAULT_MODEL_ID if s == "default" else s
    d = resources_dir() / "Models" / key
    if not d.is_dir():
        raise CheckpointError(f"The model {key!r} is not installed (looked in {d}).")
    return d


def _geometry_volume(shape: Sequence[int], ijk_to_ras: np.ndarray):
    """A CTVolume that only carries a grid (a read-only broadcast view: no voxel memory)."""
    from .volume import CTVolume

    return CTVolume(np.broadcast_to(np.float32(-1000.0), tuple(int(s) for s in shape)),
                    np.asarray(ijk_to_ras, dtype=np.float64))


class _TorchThreads:
    """Temporarily run torch ops with ``n`` intra-op threads.

    The per-prompt work is a handful of small ops (a [16 x C] x [C x voxels] GEMM, ...); on a
    2-core machine that is busy with anything else, torch's 2-thread fork/join makes each of them
    wait for the slower core (measured here: 16 ms vs 1.2 ms per GEMM, 72 ms vs 5 ms per prompt).
    One thread is both faster and steadier for queries."""

    _depth = 0
    _saved = None
    _lock = threading.Lock()

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self):
        import torch

        with _TorchThreads._lock:
            if _TorchThreads._depth == 0:
                _TorchThreads._saved = torch.get_num_threads()
                if _TorchThreads._saved != self.n:
                    torch.set_num_threads(self.n)
            _TorchThreads._depth += 1
        return self

    def __exit__(self, *exc):
        import torch

        with _TorchThreads._lock:
            _TorchThreads._depth -= 1
            if _TorchThreads._depth == 0 and _TorchThreads._saved is not None:
                if torch.get_num_threads() != _TorchThreads._saved:
                    torch.set_num_threads(_TorchThreads._saved)
                _TorchThreads._saved = None
        return False


def _sigmoid_inplace(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    np.negative(x, out=x)
    with np.errstate(over="ignore"):
        np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    from scipy import ndimage

    struct = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(mask, structure=struct, iterations=int(iterations))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float32)
    np.negative(x, out=out)
    with np.errstate(over="ignore"):   # exp overflow -> inf -> probability 0: intended
        np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
@dataclass
class Encoding:
    """Everything ``query`` needs from one volume (small: feature-grid tensors only).

    ``dense`` [C,d,h,w], ``organ_logits`` [A,d,h,w] and ``organ_embeddings`` [A,E] live on the
    engine's device; ``feature_grid`` maps feature-grid arrays back to the source grid."""

    model_id: str
    model_version: str
    model_sha256: str
    volume_hash: str
    source_shape: tuple
    source_ijk_to_ras: np.ndarray
    model_grid: Any                  # preprocess.ModelGrid
    feature_grid: Any                # preprocess.ModelGrid (model_grid.scaled(feature_stride))
    anatomies: list
    dense: Any                       # torch.Tensor [C,d,h,w]
    organ_logits: Any                # torch.Tensor [A,d,h,w]
    organ_embeddings: Any            # torch.Tensor [A,E]
    global_embedding: Any            # torch.Tensor [E]
    timings: dict = field(default_factory=dict)
    source: Optional[str] = None
    _volume: Any = field(default=None, repr=False, compare=False)
    _organ_prob: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    _organ_logit_np: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    _regions: dict = field(default_factory=dict, repr=False, compare=False)
    _head_cache: dict = field(default_factory=dict, repr=False, compare=False)   # text-independent head parts

    # ---- derived ------------------------------------------------------------------------------
    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.source_ijk_to_ras[:3, :3]))) / 1000.0

    @property
    def volume(self):
        """The source volume (or a geometry-only stand-in for an encoding loaded from disk)."""
        if self._volume is None:
            self._volume = _geometry_volume(self.source_shape, self.source_ijk_to_ras)
        return self._volume

    def organ_probabilities(self) -> np.ndarray:
        """[A,d,h,w] float32 sigmoid of the anatomy mask logits (CPU, cached)."""
        if self._organ_prob is None:
            self._organ_prob = _sigmoid(self.organ_logit_array())
        return self._organ_prob

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
            r = _dilate(r, dilation)
            self._regions[cache_key] = r
        return r

    def check_volume(self, volume) -> None:
        """Raise InputError unless ``volume`` is the volume this encoding was computed from."""
        if tuple(volume.array.shape) != tuple(self.source_shape) or not np.allclose(
                volume.ijk_to_ras, self.source_ijk_to_ras, atol=1e-4):
            raise InputError(
                "The encoding was computed for another volume (grid "
                f"{tuple(self.source_shape)} vs {tuple(volume.array.shape)}); encode this volume again.")
        if volume.content_hash() != self.volume_hash:
            raise InputError("The encoding was computed for another volume (its voxel content "
                             "differs); encode this volume again.")

    def attach(self, volume) -> "Encoding":
        """Check that ``volume`` is this encoding's volume and keep it for mapping masks."""
        self.check_volume(volume)
        self._volume = volume
        return self

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in
                       (self.dense, self.organ_logits, self.organ_embeddings, self.global_embedding)))

    # ---- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": ENCODING_FORMAT,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "volume_hash": self.volume_hash,
            "source_shape": [int(s) for s in self.source_shape],
            "source_ijk_to_ras": np.asarray(self.source_ijk_to_ras, dtype=np.float64).tolist(),
            "model_grid": self.model_grid.to_dict(),
            "feature_grid": self.feature_grid.to_dict(),
            "anatomies": list(self.anatomies),
            "timings": self.timings,
            "source": self.source,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoding as one safetensors file whose metadata holds the JSON header.

        Written atomically (temporary file + rename); ``ExportError`` when it cannot be written."""
        from safetensors.torch import save_file

        from .errors import ExportError
        from .io import atomic_write

        path = Path(path)
        tensors = {
            "dense": self.dense.detach().float().cpu().contiguous(),
            "organ_logits": self.organ_logits.detach().float().cpu().contiguous(),
            "organ_embeddings": self.organ_embeddings.detach().float().cpu().contiguous(),
            "global_embedding": self.global_embedding.detach().float().cpu().contiguous(),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"The encoding could not be written to {path} ({exc.strerror or exc}).") from exc
        header = {"ctlanguage_encoding": json.dumps(self.metadata())}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, engine: "Engine", volume=None) -> "Encoding":
        """Read an encoding written by :meth:`save` for use with ``engine``.

        Raises CheckpointError when it was made by another model (id or weights differ), and
        InputError when it is not an encoding file or ``volume`` is given and is not the volume
        it was made from."""
        from safetensors import SafetensorError, safe_open

        from .preprocess import ModelGrid

        path = Path(path)
        if not path.is_file():
            raise InputError(f"The encoding file {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = (f.metadata() or {}).get("ctlanguage_encoding")
                if meta is None:
                    raise InputError(f"{path} is not a CTLanguage encoding file (no encoding header).")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{path} is not a readable CTLanguage encoding file ({exc}).") from exc
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} has a corrupt encoding header ({exc.msg}).") from exc
        if meta.get("format") != ENCODING_FORMAT:
            raise InputError(f"{path} has encoding format {meta.get('format')!r}; this version reads "
                             f"{ENCODING_FORMAT!r}.")
        if meta.get("model_id") != engine.model_id or meta.get("model_sha256") != engine.model_sha256:
            raise CheckpointError(
                f"The encoding {path.name} was made with model {meta.get('model_id')} "
                f"(weights {str(meta.get('model_sha256'))[:12]}…), not with the loaded model "
                f"{engine.model_id} (weights {engine.model_sha256[:12]}…); encode the volume again.")
        need = ("dense", "organ_logits", "organ_embeddings", "global_embedding")
        missing = [k for k in need if k not in tensors]
        if missing:
            raise InputError(f"{path} is an incomplete encoding file (missing {', '.join(missing)}).")
        dev = engine.device
        enc = cls(
            model_id=meta["model_id"], model_version=meta.get("model_version", ""),
            model_sha256=meta["model_sha256"], volume_hash=meta["volume_hash"],
            source_shape=tuple(int(s) for s in meta["source_shape"]),
            source_ijk_to_ras=np.asarray(meta["source_ijk_to_ras"], dtype=np.float64),
            model_grid=ModelGrid.from_dict(meta["model_grid"]),
            feature_grid=ModelGrid.from_dict(meta["feature_grid"]),
            anatomies=list(meta["anatomies"]),
            dense=tensors["dense"].to(dev), organ_logits=tensors["organ_logits"].to(dev),
            organ_embeddings=tensors["organ_embeddings"].to(dev),
            global_embedding=tensors["global_embedding"].to(dev),
            timings=dict(meta.get("timings") or {}), source=meta.get("source"),
        )
        if tuple(enc.dense.shape[1:]) != tuple(enc.feature_grid.shape) or \
                tuple(enc.organ_logits.shape) != (len(enc.anatomies),) + tuple(enc.feature_grid.shape):
            raise InputError(f"{path} is inconsistent (tensor shapes do not match its grid).")
        if volume is not None:
            enc.attach(volume)
        engine.prepare(enc)
        return enc


# ------------------------------------------------------------------------------------------------
# Finding
# ------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    """The answer to one prompt. ``mask`` is uint8 on the source grid (exactly its shape)."""

    prompt: str
    parsed: Any                          # prompts.ParsedPrompt
    kind: str                            # "anatomy" | "finding"
    anatomy: Optional[str]               # concrete key, or the group ("lung") when both sides
    finding: Optional[str]
    laterality: Optional[str]
    probability: Optional[float]         # calibrated; 1 - p for negated prompts; None for anatomy
    prompt_confidence: float
    mask: np.ndarray
    volume_ml: float
    codes: Optional[dict]
    color: tuple
    negated: bool = False
    probability_present: Optional[float] = None   # p(finding present) before negation
    anatomy_probabilities: dict = field(default_factory=dict)   # per judged concrete anatomy
    anatomies: tuple = ()                # concrete anatomy keys the mask covers / was judged in
    matched: Optional[str] = None        # vocabulary phrase used (parser match or fallback)
    fallback: bool = False               # True when the semantic (embedding) fallback was used
    name: str = ""                       # segment name
    terminology: Optional[str] = None    # Slicer terminology string
    mask_threshold: float = 0.5
    timings: dict = field(default_factory=dict)
    _logit: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # feature grid
    _encoding: Optional[Encoding] = field(default=None, repr=False, compare=False)
    _mapper: Any = field(default=None, repr=False, compare=False)

    def heatmap(self) -> np.ndarray:
        """float32 mask probability in [0, 1] on the source grid (computed on demand)."""
        return self._mapper.probability(self._logit, self._encoding)

    def with_threshold(self, threshold: float) -> "Finding":
        """The same finding with its mask re-thresholded (no re-encoding, no network pass)."""
        import dataclasses

        if not 0.0 < float(threshold) < 1.0:
            raise PromptError(f"The mask threshold must lie strictly between 0 and 1, not {threshold}.")
        mask = self._mapper.mask(self._logit, self._encoding, threshold)
        vol = float(np.count_nonzero(mask)) * self._encoding.voxel_volume_ml
        return dataclasses.replace(self, mask=mask, volume_ml=vol, mask_threshold=float(threshold))

    def to_dict(self) -> dict:
        """JSON-ready summary (without the mask)."""
        return {
            "prompt": self.prompt, "kind": self.kind, "anatomy": self.anatomy,
            "finding": self.finding, "laterality": self.laterality,
            "probability": self.probability, "negated": self.negated,
            "probability_present": self.probability_present,
            "prompt_confidence": self.prompt_confidence, "volume_ml": self.volume_ml,
            "codes": self.codes, "color": list(self.color), "matched": self.matched,
            "fallback": self.fallback, "mask_threshold": self.mask_threshold,
            "anatomy_probabilities": self.anatomy_probabilities,
        }


# ------------------------------------------------------------------------------------------------
# feature grid -> source grid
# ------------------------------------------------------------------------------------------------
def _aligned_axes(grid_ijk_to_ras: np.ndarray, src_ijk_to_ras: np.ndarray):
    """For source voxel axes a = i, j, k: (grid axis b, scale, offset) with
    grid_index_b = scale * source_index_a + offset; None unless the grids are axis-aligned."""
    m = np.linalg.inv(grid_ijk_to_ras) @ src_ijk_to_ras
    out = []
    for a in range(3):
        col = m[:3, a]
        b = int(np.argmax(np.abs(col)))
        if np.any(np.abs(np.delete(col, b)) > 1e-7 * max(1.0, abs(col[b]))):
            return None
        out.append((b, float(col[b]), float(m[b, 3])))
    if len({b for b, _, _ in out}) != 3:
        return None
    return out


def _axis_weights(x: np.ndarray, n: int):
    """Linear interpolation nodes/weights for positions x on an axis of n nodes (edge values
    within half a node outside, as ITK)."""
    xc = np.clip(x, 0.0, n - 1.0)
    i0 = np.floor(xc).astype(np.intp)
    if n > 1:
        i0 = np.minimum(i0, n - 2)
        i1 = i0 + 1
    else:
        i0 = np.zeros_like(i0)
        i1 = i0
    f = (xc - i0).astype(np.float32)
    return i0, i1, f


def threshold_to_source(array: np.ndarray, grid, volume, threshold: float) -> np.ndarray:
    """uint8 mask on ``volume``'s grid: (trilinear interpolation of ``array`` on ``grid``)
    >= ``threshold``, for axis-aligned grids (any permutation/flip/spacing/origin); otherwise
    ``grid.to_source(..., threshold=...)``.

    Separable, bounding-box limited and sparse along the source's slowest axis: between two
    grid planes, only the pixels where the two planes disagree about the threshold are
    interpolated; every other output slice is a copy. No full-resolution float array is made
    (the largest temporary is one in-plane float slice of the mask's bounding box)."""
    array = np.asarray(array, dtype=np.float32)
    axes = _aligned_axes(grid.ijk_to_ras, volume.ijk_to_ras)
    shape = tuple(volume.shape)
    if axes is None or array.ndim != 3:
        return grid.to_source(array, volume, mode="linear", threshold=threshold)
    thr = np.float32(threshold)
    out = np.zeros(shape, dtype=np.uint8)
    # grid array [k, j, i] -> G indexed like the source array [k, j, i]
    g = array.transpose([2 - axes[2][0], 2 - axes[1][0], 2 - axes[0][0]])
    above = g >= thr
    if not above.any():
        return out
    lo_hi = []
    for ax in range(3):  # G axis ax == source array axis ax
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(above.any(axis=other))
        lo_hi.append((int(hit[0]), int(hit[-1])))
    sel = []   # per source array axis: (start, stop, i0, i1, f) over the selected source indices
    for ax in range(3):
        b, scale, offset = axes[2 - ax]
        n_src, n_grid = shape[ax], g.shape[ax]
        x = scale * np.arange(n_src, dtype=np.float64) + offset
        lo, hi = lo_hi[ax]
        keep = (x >= -0.5) & (x <= n_grid - 0.5) & (x > lo - 1.0) & (x < hi + 1.0)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return out
        start, stop = int(idx[0]), int(idx[-1]) + 1   # x is monotone in the source index
        i0, i1, f = _axis_weights(x[start:stop], n_grid)
        sel.append((start, stop, i0, i1, f))
    (ks, ke, k0, k1, kf), (js, je, j0, j1, jf), (is_, ie, i0, i1, if_) = sel
    # along i (fastest source axis) on the small grid array, only rows the k pass will use
    rows = np.union1d(k0, k1)
    r = g[rows]                                                      # [rk, gj, gi]
    r = r[:, :, i0] * (1.0 - if_) + r[:, :, i1] * if_                 # [rk, gj, ni] float32
    rb = r >= thr                                                    # its threshold decisions
    row_pos = {int(kg): n for n, kg in enumerate(rows)}
    ni = r.shape[2]
    jw0 = (1.0 - jf).astype(np.float32)

    def values(kg: int, idx: np.ndarray) -> np.ndarray:
        """Interpolated (along j) values of plane kg at flat in-plane indices idx."""
        rr = r[row_pos[kg]]
        yy, xx = np.divmod(idx, ni)
        return rr[j0[yy], xx] * jw0[yy] + rr[j1[yy], xx] * jf[yy]

    cache: dict = {}

    def plane(kg: int) -> np.ndarray:
        """Boolean plane kg on the source in-plane grid: rows copied from the grid rows' decisions,
        interpolated only where the two neighbouring grid rows disagree."""
        p = cache.get(kg)
        if p is None:
            rbb = rb[row_pos[kg]]
            p = rbb[j0]
            idx = np.flatnonzero(p != rbb[j1])
            if idx.size:
                p.ravel()[idx] = values(kg, idx) >= thr
            cache[kg] = p
        return p

    # output slices in order of their pair of grid planes; between two planes only the pixels
    # where the planes disagree need interpolation
    order = np.argsort(k0, kind="stable")
    target = out[ks:ke, js:je, is_:ie]
    prev = None
    for n in order:
        a, b_, f = int(k0[n]), int(k1[n]), float(kf[n])
        if prev != (a, b_):
            for kg in [k for k in cache if k not in (a, b_)]:
                del cache[kg]
            ba = plane(a)
            if b_ != a:
                diff = np.flatnonzero(ba != plane(b_))
                ta, tb = values(a, diff), values(b_, diff)
            else:
                diff = np.zeros(0, dtype=np.intp)
            prev = (a, b_)
        if diff.size and f > 0.0:
            buf = ba.copy()          # contiguous: ravel() is a view
            buf.ravel()[diff] = (ta * np.float32(1.0 - f) + tb * np.float32(f)) >= thr
            target[n] = buf
        else:                        # f == 0: exactly on plane a
            target[n] = ba
    return out


def interpolate_to_source(array: np.ndarray, grid, volume, fill: float = 0.0) -> np.ndarray:
    """float32 trilinear interpolation of ``array`` (on ``grid``) at every source voxel centre;
    ``fill`` outside the grid (beyond half a grid voxel). Separable and slice by slice for
    axis-aligned grids (the output is the only full-size array); otherwise ``grid.to_source``."""
    array = np.asarray(array, dtype=np.float32)
    axes = _aligned_axes(grid.ijk_to_ras, volume.ijk_to_ras)
    shape = tuple(volume.shape)
    if axes is None:
        return grid.to_source(array, volume, mode="linear", fill_value=fill).astype(np.float32, copy=False)
    fill32 = np.float32(fill)
    g = array.transpose([2 - axes[2][0], 2 - axes[1][0], 2 - axes[0][0]])
    per_axis = []
    for ax in range(3):
        _, scale, offset = axes[2 - ax]
        x = scale * np.arange(shape[ax], dtype=np.float64) + offset
        valid = (x >= -0.5) & (x <= g.shape[ax] - 0.5)
        per_axis.append((valid,) + _axis_weights(x, g.shape[ax]))
    (kv, k0, k1, kf), (jv, j0, j1, jf), (iv, i0, i1, if_) = per_axis
    r = g[:, :, i0] * (1.0 - if_) + g[:, :, i1] * if_                # [gk, gj, ni]
    r[:, :, ~iv] = fill32
    jw0, jw1 = (1.0 - jf)[:, None], jf[:, None]
    out = np.empty(shape, dtype=np.float32)
    cache: dict = {}

    def plane(kg: int) -> np.ndarray:
        p = cache.get(kg)
        if p is None:
            p = r[kg][j0] * jw0 + r[kg][j1] * jw1
            p[~jv] = fill32
            cache[kg] = p
        return p

    for n in np.argsort(k0, kind="stable"):
        if not kv[n]:
            out[n] = fill32
            continue
        a, b_, f = int(k0[n]), int(k1[n]), np.float32(kf[n])
        for kg in [k for k in cache if k not in (a, b_)]:
            del cache[kg]
        pa = plane(a)
        if f == 0.0 or a == b_:
            out[n] = pa
        else:
            np.multiply(pa, np.float32(1.0) - f, out=out[n])
            out[n] += plane(b_) * f
    return out


class SourceMapper:
    """Maps feature-grid mask logits to the source grid: masks as uint8 (only the bounding box of
    the mask is resampled), heat maps as float32 probabilities.

    ``interpolate="logit"`` (default) interpolates the logits linearly and thresholds at
    logit(threshold): smoother boundaries than interpolating probabilities, the same decision
    at the feature-grid voxel centres. ``"probability"`` interpolates sigmoid(logits)."""

    def __init__(self, interpolate: str = "logit", fast: bool = True):
        if interpolate not in ("logit", "probability"):
            raise ValueError("interpolate must be 'logit' or 'probability'")
        self.interpolate = interpolate
        self.fast = fast

    def mask(self, logit: np.ndarray, enc: Encoding, threshold: float) -> np.ndarray:
        t = float(threshold)
        if self.interpolate == "logit":
            arr, thr = logit, math.log(t / (1.0 - t))
        else:
            arr, thr = _sigmoid(logit), t
        if self.fast:
            return threshold_to_source(arr, enc.feature_grid, enc.volume, thr)
        return enc.feature_grid.to_source(np.asarray(arr, dtype=np.float32), enc.volume,
                                          mode="linear", threshold=thr)

    def probability(self, logit: np.ndarray, enc: Encoding) -> np.ndarray:
        """Heat map: sigmoid of the feature-grid logits, interpolated linearly (probabilities, not
        logits: no exponential per source voxel), 0 outside the model grid."""
        out = interpolate_to_source(_sigmoid(logit), enc.feature_grid, enc.volume, fill=0.0)
        return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------------
# Engine
# ------------------------------------------------------------------------------------------------
class Engine:
    """Holds one model; encodes volumes and answers prompts. Thread-safe (one encode at a time)."""

    def __init__(self, model, model_dir: Optional[Path] = None, device: str = "cpu",
                 model_sha256: Optional[str] = None, cache_size: int = 4):
        self.model = model
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        cfg = model.config
        self.config = cfg
        self.model_id = str(cfg.model_id)
        self.model_version = str(cfg.version)
        self.model_sha256 = model_sha256 or _state_sha256(model)
        self.anatomies = list(cfg.anatomies)
        self.presence_source = getattr(cfg, "presence_source", "organ")
        self.temperature = float(cfg.calibration_temperature)
        self.restrict_dilation = DEFAULT_RESTRICT_DILATION
        self.mapper = SourceMapper()
        self._cache: "OrderedDict[tuple, Encoding]" = OrderedDict()
        self._cache_size = int(cache_size)
        self._text_cache: dict[str, Any] = {}
        self._phrase_index = None
        self._head_kind = None
        self._lock = threading.RLock()
        self._encoding_active = False
        self.single_thread_queries = device == "cpu"

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, model: Any = "default", device: Optional[str] = None,
             progress: Optional[ProgressFn] = None, warm_text: bool = True) -> "Engine":
        """Load a model: "default" (the embedded model), a catalog id, a folder path, or an
        already constructed ``GroundedCTModel``. ``device`` None picks CUDA when available."""
        import torch

        from .model import GroundedCTModel

        dev = _resolve_device(device)
        if isinstance(model, GroundedCTModel):
            model.to(dev).eval()
            _report(progress, 1.0, "Model ready")
            return cls(model, None, dev)
        _report(progress, 0.0, "Locating model")
        model_dir = resolve_model_dir(model)
        _report(progress, 0.1, f"Loading model {model_dir.name}")
        net = GroundedCTModel.from_pretrained(model_dir, device=dev)
        net.eval()
        sha = _weights_sha256(model_dir)
        engine = cls(net, model_dir, dev, model_sha256=sha)
        if warm_text:
            _report(progress, 0.6, "Loading text encoder")
            engine.warm_up()
        _report(progress, 1.0, "Model ready")
        return engine

    def describe(self) -> dict:
        return {"id": self.model_id, "version": self.model_version, "sha256": self.model_sha256,
                "path": str(self.model_dir) if self.model_dir else None, "device": self.device,
                "presence_source": self.presence_source,
                "calibration_temperature": self.temperature,
                "calibration_offsets": bool(getattr(self.config, "calibration_bias", None))}

    # ---- text ------------------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str]):
        """[N,E] joint-space embeddings (engine-level cache per string)."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.inference_mode():
                emb = self.model.embed_text(list(missing))
            for t, e in zip(missing, emb):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts], 0)

    @staticmethod
    def _anatomy_phrase(key: str) -> str:
        from . import vocabulary as V

        return V.display_name(key).lower()

    @staticmethod
    def _finding_phrase(finding: str, laterality: Optional[str]) -> str:
        from . import vocabulary as V

        lat = laterality if laterality in ("left", "right") else None
        return V.display_name(finding, lat).lower()

    @staticmethod
    def _ensemble(finding: str, laterality: Optional[str]):
        try:  # the training's ensembles (held-out paraphrases removed): what calibration saw
            from .training.phrases import ensemble_for

            pos, neg = ensemble_for(finding, laterality)
        except ImportError:  # pragma: no cover - training package not installed
            from .vocabulary import prompt_ensemble

            pos, neg = prompt_ensemble(finding, laterality)
        return list(pos), list(neg)

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, volume, progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelFn] = None, use_cache: bool = True) -> Encoding:
        """Encode ``volume`` (a CTVolume) once; repeated calls with the same content and model
        return the cached encoding. ``cancel()`` returning True raises CancelledError."""
        import torch

        from .preprocess import to_model_space

        t0 = time.perf_counter()
        _report(progress, 0.0, "Checking volume")
        _check_cancel(cancel)
        if not hasattr(volume, "array") or not hasattr(volume, "ijk_to_ras"):
            raise InputError("encode() needs a CTVolume (array + ijk_to_ras).")
        vhash = volume.content_hash()
        key = (vhash, self.model_sha256)
        with self._lock:
            if use_cache and key in self._cache:
                self._cache.move_to_end(key)
                enc = self._cache[key]
                enc._volume = volume
                _report(progress, 1.0, "Encoding reused (same volume and model)")
                return enc
        timings = {"hash": time.perf_counter() - t0}
        with self._lock, _Flag(self, "_encoding_active"):
            _report(progress, 0.05, "Resampling to model space")
            t = time.perf_counter()
            mi = to_model_space(volume, self.config.spec)
            timings["preprocess"] = time.perf_counter() - t
            _check_cancel(cancel)
            x = torch.from_numpy(np.ascontiguousarray(mi.array, dtype=np.float32))[None, None].to(self.device)
            _report(progress, 0.25, "Encoding image")
            t = time.perf_counter()
            with torch.inference_mode(), _ProgressHooks(self.model, progress, cancel, 0.25, 0.8):
                feats = self.model.encode_image(x)
            timings["image_encoder"] = time.perf_counter() - t
            del x
            _check_cancel(cancel)
            _report(progress, 0.8, "Segmenting anatomy")
            t = time.perf_counter()
            with torch.inference_mode():
                dense = feats.dense
                ta = self._embed([self._anatomy_phrase(a) for a in self.anatomies])
                head_cache: dict = {}
                organ_logits = self.mask_logits(dense[0], ta, head_cache)
                _check_cancel(cancel)
                _report(progress, 0.9, "Organ embeddings")
                masks = (organ_logits > 0).to(dense.dtype)[None]
                organ_emb = self.model.organ_embeddings(dense, masks)[0]
            timings["organs"] = time.perf_counter() - t
            grid = mi.grid
            enc = Encoding(
                model_id=self.model_id, model_version=self.model_version,
                model_sha256=self.model_sha256, volume_hash=vhash,
                source_shape=tuple(volume.array.shape),
                source_ijk_to_ras=np.array(volume.ijk_to_ras, dtype=np.float64),
                model_grid=grid, feature_grid=grid.scaled(int(self.model.config.feature_stride)),
                anatomies=list(self.anatomies),
                dense=dense[0].contiguous(), organ_logits=organ_logits.float().contiguous(),
                organ_embeddings=organ_emb.float(), global_embedding=feats.global_embedding[0].float(),
                timings=timings, source=getattr(volume, "source", None), _volume=volume,
                _head_cache=head_cache,
            )
            if tuple(enc.dense.shape[1:]) != tuple(enc.feature_grid.shape):
                raise CTLanguageError(
                    f"The model's feature map {tuple(enc.dense.shape[1:])} does not match the feature "
                    f"grid {enc.feature_grid.shape}; the model and preprocessing disagree.")
            timings["total"] = time.perf_counter() - t0
            if use_cache:
                self._cache[key] = enc
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        _report(progress, 1.0, f"Encoded in {timings['total']:.1f} s")
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

    # ---- text warm-up and semantic fallback ------------------------------------------------
    def _all_phrases(self):
        """Every phrase a known prompt can need: canonical names, prompt ensembles (per side) and
        the vocabulary phrase index of the semantic fallback."""
        from . import vocabulary as V
        from .prompts import vocabulary_phrases

        rows = vocabulary_phrases()
        out = [self._anatomy_phrase(a) for a in self.anatomies]
        for f in V.findings():
            for lat in ([None, "left", "right"] if V.is_sided(f) else [None]):
                out.append(self._finding_phrase(f, lat))
                pos, neg = self._ensemble(f, lat)
                out += pos + neg
        out += [r[0] for r in rows]
        return list(dict.fromkeys(out)), rows

    def warm_up(self, progress: Optional[ProgressFn] = None) -> None:
        """Embed every vocabulary phrase once (frozen LM outputs cached on disk per text encoder),
        so that the first query of a known prompt needs no language-model pass."""
        import torch

        phrases, rows = self._all_phrases()
        enc_name = str(getattr(self.config, "text_encoder", ""))
        digest = hashlib.sha256(("\n".join(phrases) + "|" + enc_name).encode()).hexdigest()[:16]
        cache_file = _user_cache_dir() / "text_base" / f"{digest}.npy"
        base = None
        if cache_file.is_file():
            try:
                base = np.load(cache_file, allow_pickle=False)
                if base.shape[0] != len(phrases):
                    base = None
            except (OSError, ValueError):
                base = None
        if base is None:
            _report(progress, 0.0, "Embedding the vocabulary (first use of this text encoder)")
            base = self.model.text_base(phrases).float().cpu().numpy()
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.npy")
                np.save(tmp, base)
                os.replace(tmp, cache_file)
            except OSError:
                log.debug("could not write the text embedding cache", exc_info=True)
        base_t = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
        te_cache = getattr(getattr(self.model, "text_encoder", None), "_cache", None)
        if isinstance(te_cache, dict):  # let the model's own per-string cache serve them too
            for ph, e in zip(phrases, base_t):
                te_cache.setdefault(ph, e)
        with torch.inference_mode():
            proj = self.model.text_projection(base_t.to(self.device))
        for ph, e in zip(phrases, proj):
            self._text_cache.setdefault(ph, e)
        idx = {ph: i for i, ph in enumerate(phrases)}
        emb = base[[idx[r[0]] for r in rows]]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
        self._phrase_index = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                              emb.astype(np.float32))

    def _phrase_table(self):
        """(phrases, keys, lateralities, unit LM embeddings [N,D]) of the vocabulary phrases."""
        if self._phrase_index is None:
            self.warm_up()
        return self._phrase_index

    def nearest_phrase(self, text: str):
        """(phrase, key, laterality, cosine similarity) of the closest vocabulary phrase."""
        phrases, keys, lats, emb = self._phrase_table()
        with __import__("torch").inference_mode():
            q = self.model.text_base([text]).float().cpu().numpy()[0]
        q = q / max(float(np.linalg.norm(q)), 1e-8)
        sims = emb @ q
        i = int(np.argmax(sims))
        return phrases[i], keys[i], lats[i], float(sims[i])

    # ---- query ---------------------------------------------------------------------------------
    def query(self, encoding: Encoding, text: str, mask_threshold: float = 0.5,
              volume=None, compute_masks: bool = True) -> list[Finding]:
        """Answer one or several prompts separated by ';' (see module docstring).

        Raises PromptError for empty text. ``volume`` (optional) attaches the source volume to an
        encoding loaded from disk after checking it is the right one. ``compute_masks=False``
        skips mapping masks to the source grid (``mask`` is then None; for scoring only)."""
        from .prompts import split_prompts

        self._check_encoding(encoding)
        if volume is not None and encoding._volume is not volume:
            encoding.attach(volume)
        if not isinstance(text, str):
            raise PromptError(f"A prompt must be text, not {type(text).__name__}.")
        if not 0.0 < float(mask_threshold) < 1.0:
            raise PromptError(f"The mask threshold must lie strictly between 0 and 1, not {mask_threshold}.")
        parts = split_prompts(text)
        if len(parts) > MAX_PROMPTS_PER_QUERY:
            raise PromptError(f"{len(parts)} prompts in one query; give at most {MAX_PROMPTS_PER_QUERY}.")
        if self._encoding_active or not self.single_thread_queries:
            return [self.query_one(encoding, p, mask_threshold, compute_masks) for p in parts]
        with _TorchThreads(1):
            return [self.query_one(encoding, p, mask_threshold, compute_masks) for p in parts]

    def query_one(self, enc: Encoding, prompt: str, mask_threshold: float = 0.5,
                  compute_masks: bool = True) -> Finding:
        import torch

        from . import vocabulary as V
        from .prompts import parse_prompt

        t0 = time.perf_counter()
        timings = {}
        parsed = parse_prompt(prompt)
        kind, finding, laterality = parsed.kind, parsed.finding, parsed.laterality
        covers = tuple(parsed.anatomies or ())
        confidence = float(parsed.confidence)
        matched, fallback = parsed.matched, False
        if kind == "unknown" or not covers:
            # semantic fallback: nearest vocabulary phrase in the text encoder's space
            phrase, key, lat, sim = self.nearest_phrase(parsed.text)
            fallback, matched = True, phrase
            term = V.get(key)
            kind = term.kind
            if kind == "anatomy":
                finding, laterality, covers = None, term.side, (key,)
            else:
                finding, laterality = key, lat
                covers = tuple(V.resolve_anatomies(key, lat))
            sim_conf = (sim - FALLBACK_SIM_LOW) / (FALLBACK_SIM_HIGH - FALLBACK_SIM_LOW)
            confidence = float(np.clip(sim_conf, 0.0, 1.0)) * FALLBACK_MAX_CONFIDENCE
        timings["parse"] = time.perf_counter() - t0

        t = time.perf_counter()
        with torch.inference_mode():
            if kind == "anatomy":
                logit, per_anat = self._anatomy_logit_map(enc, covers), {}
                probability = None
            else:
                logit, per_anat = self._finding_map_and_presence(enc, finding, covers, parsed.region)
                probability = None
        timings["heads"] = time.perf_counter() - t

        probability_present = None
        if kind == "finding":
            vals = list(per_anat.values())
            if laterality == "bilateral" and len(vals) > 1:
                probability_present = float(min(vals))
            else:
                probability_present = float(max(vals))
            probability = 1.0 - probability_present if parsed.negated else probability_present

        t = time.perf_counter()
        if compute_masks:
            mask = self.mapper.mask(logit, enc, mask_threshold)
            volume_ml = float(np.count_nonzero(mask)) * enc.voxel_volume_ml
        else:
            mask, volume_ml = None, None
        timings["to_source"] = time.perf_counter() - t

        # naming, codes, colour
        if kind == "anatomy":
            key = covers[0]
            anatomy = covers[0] if len(covers) == 1 else _group_name(covers)
            lat_for_codes = None
            color = tuple(int(c) for c in V.color(key))
            codes = _safe(lambda: V.dicom_seg_codes(key))
            term_str = _safe(lambda: V.slicer_terminology_string(key))
            if len(covers) > 1 and codes:
                codes = dict(codes, type_modifier=_BILATERAL_CODE)
            if laterality is None and len(covers) == 1:
                laterality = V.get(key).side
        else:
            key = finding
            anatomy = covers[0] if len(covers) == 1 else _group_name(covers)
            lat_for_codes = laterality if laterality in ("left", "right", "bilateral") else None
            color = tuple(int(c) for c in V.color(key))
            codes = _safe(lambda: V.dicom_seg_codes(key, lat_for_codes))
            term_str = _safe(lambda: V.slicer_terminology_string(key, lat_for_codes))
        timings["total"] = time.perf_counter() - t0
        return Finding(
            prompt=prompt, parsed=parsed, kind=kind, anatomy=anatomy, finding=finding,
            laterality=laterality, probability=probability, prompt_confidence=round(confidence, 3),
            mask=mask, volume_ml=volume_ml, codes=codes, color=color, negated=bool(parsed.negated)
            and kind == "finding", probability_present=probability_present,
            anatomy_probabilities=per_anat, anatomies=tuple(covers), matched=matched,
            fallback=fallback, name=prompt.strip()[:120], terminology=term_str,
            mask_threshold=float(mask_threshold), timings=timings, _logit=logit, _encoding=enc,
            _mapper=self.mapper,
        )

    # ---- heads on stored features ----------------------------------------------------------
    def mask_logits(self, dense, text, cache: Optional[dict] = None):
        """``model.mask_logits`` for dense [C,d,h,w] (one volume) and N prompt embeddings -> [N,d,h,w].

        The text-independent part of the mask head (the shared per-voxel embedding ``phi`` of
        the current head; nothing for the older dynamic-convolution head) is computed once per
        encoding and kept in ``cache``, so a prompt costs one [N,K] x [K,voxels] product. The
        fast path is checked against the model's own ``mask_logits`` once per engine and only
        used when it matches; otherwise the model's implementation runs."""
        import torch

        if self._head_kind is None:
            self._head_kind = self._check_fast_head()
        head = self.model.mask_head
        n_text = text.shape[0]
        shape = (n_text,) + tuple(dense.shape[1:])
        if self._head_kind == "phi":
            emb = None if cache is None else cache.get("phi")
            if emb is None:
                emb = head.phi(dense[None]).flatten(2)[0]                   # [K, P]
                if cache is not None:
                    cache["phi"] = emb
            p = head.generator(text.to(dense.dtype))                        # [N, K+1]
            k = head.k
            out = torch.addmm(p[:, k:k + 1], p[:, :k], emb, alpha=1.0 / math.sqrt(k))
            return out.reshape(shape)
        if self._head_kind == "dynconv":
            C = dense.shape[0]
            f = dense.reshape(C, -1)
            p = head.generator(text.to(dense.dtype))
            c, h = head.c, head.h
            out = []
            for n in range(n_text):
                w1 = p[n, :c * h].reshape(h, c)
                b1 = p[n, c * h:c * h + h].reshape(h, 1)
                w2 = p[n, c * h + h:c * h + 2 * h].reshape(1, h)
                b2 = p[n, c * h + 2 * h]
                hid = torch.addmm(b1, w1, f).clamp_min_(0.0)
                out.append(torch.addmm(b2.reshape(1, 1), w2, hid))
            return torch.cat(out, 0).reshape(shape)
        return torch.cat([self.model.mask_logits(dense[None], text[i:i + 1])[0]
                          for i in range(n_text)], 0)

    def prepare(self, enc: Encoding) -> None:
        """Compute the text-independent parts of the mask head for an encoding loaded from disk
        (so that its first prompt is as fast as the following ones)."""
        import torch

        with torch.inference_mode(), _TorchThreads(1) if self.single_thread_queries else _Null():
            self.mask_logits(enc.dense, self._embed([self._anatomy_phrase(self.anatomies[0])]),
                             enc._head_cache)

    def _check_fast_head(self) -> str:
        """'phi' | 'dynconv' when the engine's fast path reproduces model.mask_logits, else 'generic'."""
        import torch

        head = getattr(self.model, "mask_head", None)
        if head is None:
            return "generic"
        if all(hasattr(head, a) for a in ("phi", "generator", "k")):
            kind = "phi"
        elif all(hasattr(head, a) for a in ("generator", "c", "h")):
            kind = "dynconv"
        else:
            return "generic"
        ok = False
        try:
            with torch.inference_mode():
                g = torch.Generator().manual_seed(0)
                channels = int(self.model.config.dense_channels)
                dense = torch.randn(1, channels, 4, 4, 4, generator=g).to(self.device)
                text = torch.nn.functional.normalize(
                    torch.randn(3, self.model.config.embed_dim, generator=g), dim=-1).to(self.device)
                ref = self.model.mask_logits(dense, text)[0]
                self._head_kind = kind
                mine = self.mask_logits(dense[0], text)
            ok = mine.shape == ref.shape and bool(torch.allclose(mine, ref, atol=1e-4, rtol=1e-4))
        except Exception:  # pragma: no cover - a different head layout: use the model's code
            log.debug("fast mask head check failed", exc_info=True)
        if not ok:
            log.info("Using the model's generic mask head implementation.")
        return kind if ok else "generic"

    def _anatomy_logit_map(self, enc: Encoding, covers: Sequence[str]) -> np.ndarray:
        logit = enc.organ_logit_array()
        idx = [enc.anatomy_index(k) for k in covers]
        if len(idx) == 1:
            return logit[idx[0]]
        return np.max(logit[idx], axis=0)

    def _finding_map_and_presence(self, enc: Encoding, finding: str, covers: Sequence[str],
                                  region: Optional[str] = None):
        """Per concrete anatomy (side): mask probability restricted to that anatomy, presence."""
        from . import vocabulary as V

        sides = [V.get(a).side if V.get(a).kind == "anatomy" else None for a in covers]
        texts = [self._finding_phrase(finding, s) for s in sides]
        t = self._embed(texts)
        logits = self.mask_logits(enc.dense, t, enc._head_cache).float().cpu().numpy()   # [N,d,h,w]
        out = None
        per_anat = {}
        for n, (a, s) in enumerate(zip(covers, sides)):
            lg = logits[n]
            if a != "body" and self.restrict_dilation is not None:
                keys = [region] if (region and region in enc.anatomies and
                                    (V.get(region).side in (None, s))) else [a]
                lg = np.where(enc.region(keys, self.restrict_dilation), lg, OUTSIDE_LOGIT)
            out = lg if out is None else np.maximum(out, lg)
            per_anat[a] = self._presence(enc, finding, a, s)
        return np.ascontiguousarray(out, dtype=np.float32), per_anat

    def _presence(self, enc: Encoding, finding: str, anatomy: str, side: Optional[str]) -> float:
        pos, neg = self._ensemble(finding, side)
        pe, ne = self._embed(pos), self._embed(neg)
        if self.presence_source == "global":
            src = enc.global_embedding
        else:
            src = enc.organ_embeddings[enc.anatomy_index(anatomy)]
        return self.calibrate(float(self.model.presence_logit(src, pe, ne)), finding)

    def calibrate(self, logit: float, finding: Optional[str] = None) -> float:
        """Calibrated probability p = sigmoid(logit / T + b[finding]) (the model's calibration:
        shared temperature, per-finding offset when the checkpoint has them)."""
        offset = 0.0
        get_offset = getattr(self.model, "calibration_offset", None)
        if callable(get_offset):
            offset = float(get_offset(finding))
        z = logit / self.temperature + offset
        if z >= 0:
            return float(1.0 / (1.0 + math.exp(-z)))
        e = math.exp(z)
        return float(e / (1.0 + e))

    # ---- direct scoring (evaluation) -------------------------------------------------------
    def presence_probability(self, enc: Encoding, finding: str, laterality: Optional[str] = None,
                             positives: Optional[Sequence[str]] = None) -> float:
        """Calibrated presence of ``finding`` (max over sides when unsided); ``positives``
        replaces the positive phrasings of the ensemble (paraphrase evaluation)."""
        import torch

        from . import vocabulary as V

        vals = []
        with torch.inference_mode():
            for a in V.resolve_anatomies(finding, laterality if laterality in ("left", "right") else None):
                side = V.get(a).side
                pos, neg = self._ensemble(finding, side)
                if positives is not None:
                    pos = list(positives)
                pe, ne = self._embed(pos), self._embed(neg)
                src = enc.global_embedding if self.presence_source == "global" else \
                    enc.organ_embeddings[enc.anatomy_index(a)]
                vals.append(self.calibrate(float(self.model.presence_logit(src, pe, ne)), finding))
        return float(max(vals))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Flag:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __enter__(self):
        setattr(self.obj, self.name, True)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, False)
        return False


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
        _check_cancel(self.cancel)
        _report(self.progress, self.lo + (self.hi - self.lo) * min(self.done / self.n, 1.0),
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


def _group_name(covers: Sequence[str]) -> str:
    from . import vocabulary as V

    groups = {V.get(a).group for a in covers if V.get(a).kind == "anatomy"}
    return next(iter(groups)) if len(groups) == 1 and None not in groups else "+".join(covers)


def _safe(fn):
    try:
        return fn()
    except CTLanguageError:
        return None


def _weights_sha256(model_dir: Path) -> str:
    sums = model_dir / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == "model.safetensors":
                return parts[0].lower()
    h = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _user_cache_dir() -> Path:
    env = os.environ.get("CTLANGUAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ctlanguage"
