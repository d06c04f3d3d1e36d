"""VoxTell (free text -> 3D mask) as a backend, through the ``voxtell`` package's predictor.

``encode`` gives the predictor what it was trained on: the voxels in the closest RAS axis order
(``volume.closest_ras``: a permutation/flip, native spacing, no resampling), then the predictor's
own ``preprocess`` (crop to non-zero, z-score). The state is that image (VoxTell runs its network
per prompt, so the image is what later prompts need) and its grid.

``answer`` embeds the concept's canonical phrase (``phrases.canonical_phrase``; an anatomy group
runs one prompt per anatomy and takes the maximum) -- looked up in the precomputed embedding bank,
the 4B text model loaded only for phrases the bank lacks and only when it is on this computer --
and runs the predictor's sliding window (``predict_sliding_window_return_logits``) on the stored
image. The logits are returned on the cropped RAS grid; the engine maps them onto the source voxels
(``resample``), exactly, since that grid is the source grid re-indexed.

No presence scores: VoxTell only masks. GPU recommended; on CPU each prompt takes minutes on a real
CT and progress reports the patches done and the time left.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .. import phrases as P
from ..engine.progress import check_cancel, report
from ..engine.protocol import Answer, Capabilities, ModelInfo, Request
from ..errors import InputError
from . import voxtell_weights as W

log = logging.getLogger(__name__)

KIND = "voxtell"
LICENSE = "code Apache-2.0; weights licence not stated"
ANSWER_CACHE_BYTES = 512 << 20   # recent prompts' logits kept per encoded volume (float16)
BOUNDARY = np.float32(1e-3)   # logit margin kept around VoxTell's decision boundary (see logits)


@dataclass
class VoxTellState:
    """The predictor's input for one volume: ``image`` [1, S, A, R] float32 (cropped, z-scored,
    on the CPU) on ``grid`` (the source voxels re-indexed in RAS axis order, cropped)."""

    image: Any
    grid: Any                         # preprocess.ModelGrid
    patches: int = 0                  # sliding-window patches per prompt
    timings: dict = field(default_factory=dict)
    _logits: "OrderedDict" = field(default_factory=OrderedDict, repr=False, compare=False)

    def tensors(self) -> Mapping[str, Any]:
        return {"image": self.image}

    def metadata(self) -> dict:
        return {"grid": self.grid.to_dict(), "patches": int(self.patches)}

    def nbytes(self) -> int:
        return int(self.image.numel() * self.image.element_size())


def predictor_class():
    """The package's ``VoxTellPredictor`` around a network we built and loaded: its constructor
    would unpickle the checkpoint with ``weights_only=False`` and fetch missing files from the Hub.
    Everything else -- preprocessing, text embedding, sliding window -- is the package's."""
    from voxtell.inference.predictor import VoxTellPredictor

    class Predictor(VoxTellPredictor):
        def __init__(self, network, patch_size, device, embedding_bank: dict, text_model: str):
            import torch
            from nnunetv2.preprocessing.normalization.default_normalization_schemes import \
                ZScoreNormalization

            self.device = device
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            self.normalization = ZScoreNormalization(intensityproperties={})
            self.tile_step_size = 0.5
            self.perform_everything_on_device = True
            self._text_encoding_model = text_model
            self.tokenizer = None
            self.text_backbone = None
            self.max_text_length = 8192
            self.embedding_bank = embedding_bank
            self.patch_size = list(patch_size)
            self.network = network.eval()

    return Predictor


class VoxTellBackend:
    """Masks for anatomy, findings and free text from VoxTell; no scores."""

    def __init__(self, predictor, info: ModelInfo, entry=None, bank_path=None, progress=None):
        from .. import vocabulary as V

        self.predictor = predictor
        self.info = info
        self.entry = entry
        self.bank_path = bank_path
        self.progress = progress      # per-prompt progress (patches done, time left)
        self.device = str(predictor.device)
        self.capabilities = Capabilities(anatomy=tuple(V.anatomies()), finding_masks=True,
                                         free_text_masks=True, heatmaps=True,
                                         device="gpu-recommended")

    # ---- encode ----------------------------------------------------------------------------
    def encode(self, volume, progress=None, cancel=None, anatomy=None) -> VoxTellState:
        from ..volume import closest_ras

        t = time.perf_counter()
        report(progress, 0.1, "Reorienting to RAS (VoxTell)")
        ras = closest_ras(volume)
        check_cancel(cancel)
        report(progress, 0.4, "Cropping and normalising (VoxTell)")
        # contiguous: the z-score's sums then run in the same order for every input layout
        image, bbox, _ = self.predictor.preprocess(np.ascontiguousarray(ras.array))
        grid = _crop_grid(ras, bbox, tuple(image.shape[1:]))
        padded = [max(int(s), int(p)) for s, p in zip(image.shape[1:], self.predictor.patch_size)]
        patches = len(self.predictor._internal_get_sliding_window_slicers(padded))
        note = "" if self.device.startswith("cuda") else " on CPU: minutes per prompt, a GPU is recommended"
        report(progress, 1.0, f"VoxTell: {patches} patches per prompt{note}")
        return VoxTellState(image=image.contiguous(), grid=grid, patches=patches,
                            timings={"preprocess": time.perf_counter() - t})

    def restore(self, metadata: dict, tensors: Mapping[str, Any]) -> VoxTellState:
        import torch

        from ..preprocess import ModelGrid

        if "image" not in tensors:
            raise InputError("incomplete encoding (missing image)")
        image = torch.as_tensor(tensors["image"], dtype=torch.float32)
        grid = ModelGrid.from_dict(metadata["grid"])
        if image.ndim != 4 or tuple(image.shape[1:]) != tuple(grid.shape):
            raise InputError("inconsistent encoding (image shape does not match its grid)")
        return VoxTellState(image=image, grid=grid, patches=int(metadata.get("patches", 0)))

    # ---- answer ----------------------------------------------------------------------------
    def answer(self, state: VoxTellState, request: Request) -> Answer:
        if not request.want_mask:
            return Answer(model=self.info.id)
        return Answer(model=self.info.id, logit=self.logits(state, self.prompts(request)),
                      grid=state.grid)

    def prompts(self, request: Request) -> list:
        """The texts VoxTell is run with: the concept's canonical phrase (one per anatomy of an
        anatomy request or of a finding whose extent is its organ), or the prompt as typed when
        only that is in the embedding bank."""
        from .. import vocabulary as V

        if request.kind == "anatomy" or V.get(request.finding).mask_is_anatomy:
            out = [P.canonical_phrase(a) for a in request.anatomies]   # enlargement: the organ
        else:
            out = [P.canonical_phrase(request.finding, request.laterality)]
        typed = " ".join(request.text.lower().split())
        bank = self.predictor.embedding_bank or {}
        if len(out) == 1 and out[0] not in bank and typed in bank:
            out = [typed]
        return out

    def logits(self, state: VoxTellState, prompts: Sequence[str]) -> np.ndarray:
        """float32 logits on ``state.grid``: the maximum over ``prompts`` (any text)."""
        import torch

        key = tuple(" ".join(p.lower().split()) for p in prompts)
        hit = state._logits.get(key)
        if hit is not None:
            state._logits.move_to_end(key)
            return hit.astype(np.float32)
        emb = self.embed(list(key))
        label = key[0] if len(key) == 1 else f"{key[0]} (+{len(key) - 1})"
        t0 = time.perf_counter()

        def on_patch(done: int, total: int):
            left = (time.perf_counter() - t0) / done * (total - done)
            report(self.progress, done / total,
                   f"VoxTell '{label}': patch {done}/{total}, about {left:.0f} s left")

        out = self.predictor.predict_sliding_window_return_logits(
            state.image, emb, progress_callback=on_patch if self.progress else None)
        with torch.inference_mode():
            lg = out.amax(dim=0).float().cpu().numpy()     # float16 logits: the max is exact
        del out
        lg = np.ascontiguousarray(lg, dtype=np.float32)
        # VoxTell's mask is logit > 0 (float16 logits: exact zeros where only patch borders
        # reach). Logits within BOUNDARY of 0 are set to +-BOUNDARY by that rule, so that the
        # engine's threshold 0.5 (logit >= 0 after interpolation, whose float rounding is far
        # below BOUNDARY) gives exactly VoxTell's mask; probabilities move by < 3e-4.
        near = np.abs(lg) < BOUNDARY
        lg[near] = np.where(lg[near] > 0, BOUNDARY, -BOUNDARY)
        state._logits[key] = lg.astype(np.float16)         # exact: they were float16
        while sum(v.nbytes for v in state._logits.values()) > ANSWER_CACHE_BYTES:
            state._logits.popitem(last=False)
        return lg

    def embed(self, prompts: list):
        """(1, N, 2560) text embeddings through the predictor: from the bank, else the text model
        (InputError when it is needed and not on this computer: never a download)."""
        bank = self.predictor.embedding_bank or {}
        missing = [p for p in prompts if p not in bank]
        if missing and self.predictor.text_backbone is None:
            local = W.local_text_model(self.entry)
            if local is None:
                where = f"the embedding bank {self.bank_path}" if self.bank_path else \
                    "no embedding bank (none found beside the model folder)"
                raise InputError(
                    f"VoxTell needs its text model for '{missing[0]}' ({where} lacks it), and "
                    f"{W.TEXT_MODEL} (~8 GB) is not on this computer: download it once with "
                    f"`hf download {W.TEXT_MODEL}` or set {W.TEXT_MODEL_ENV} to its folder.")
            self.predictor._text_encoding_model = local
            report(self.progress, 0.0, f"Loading the VoxTell text model for '{missing[0]}'")
        return self.predictor.embed_text_prompts(prompts)


def _crop_grid(ras, bbox, shape):
    """ModelGrid of the predictor's crop ``bbox`` ([[lo, hi], ...] along S, A, R) of ``ras``."""
    from ..preprocess import ModelGrid

    lo_kji = np.array([int(b[0]) for b in bbox], dtype=np.float64)
    aff = ras.ijk_to_ras.copy()
    aff[:3, 3] = ras.ijk_to_ras[:3, :3] @ lo_kji[::-1] + ras.ijk_to_ras[:3, 3]
    return ModelGrid(shape, aff)


# ---- module interface (backends/__init__.py) -------------------------------------------------
def load(entry=None, device: Optional[str] = None, progress=None, model_dir=None,
         network_cls=None) -> VoxTellBackend:
    """The backend for a catalog entry; ``model_dir`` overrides where the weights are
    (else the entry's ``model_dir``, else ``$VOXTELL_MODEL``). ``network_cls`` replaces the
    network class (tests: a smaller subclass)."""
    d = W.check_model_dir(W.model_dir_for(entry, model_dir))
    try:
        import voxtell  # noqa: F401
    except ImportError as exc:
        raise InputError(f"The VoxTell backend is not installed (pip install 'ctlanguage[voxtell]'): "
                         f"{exc}.") from None
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("VoxTell was asked to run on a CUDA GPU, but none is available; use the CPU "
                         "(slow: minutes to hours per prompt) or a machine with a GPU.")
    report(progress, 0.05, f"Loading VoxTell from {d}")
    plans = W.read_plans(d)
    net = W.build_network(plans, network_cls)
    extra = getattr(entry, "extra", None) or {}
    sha = W.load_weights(net, d, extra.get("checkpoint_size"), extra.get("checkpoint_sha256"),
                         progress)
    bank_path = W.bank_path_for(d, entry)
    report(progress, 0.9, "Loading the VoxTell embedding bank")
    bank = W.load_bank(bank_path)
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    predictor = predictor_class()(net, patch, dev, bank, W.TEXT_MODEL)
    if dev.type != "cuda":
        log.warning("VoxTell runs on the CPU: expect minutes per prompt on a full CT (GPU recommended)")
    info = ModelInfo(id=getattr(entry, "id", None) or KIND,
                     version=getattr(entry, "version", None) or W.MODEL_NAME, sha256=sha, kind=KIND,
                     license=getattr(entry, "license", None) or LICENSE, path=str(d))
    report(progress, 1.0, f"VoxTell ready ({len(bank)} precomputed prompts)")
    return VoxTellBackend(predictor, info, entry, bank_path, progress)


def describe(entry) -> Capabilities:
    from .. import vocabulary as V

    d = W.model_dir_for(entry)
    present = d is not None and all((d / p).is_file() for p in (W.PLANS, W.CHECKPOINT))
    return Capabilities(anatomy=tuple(V.anatomies()), finding_masks=True, free_text_masks=True,
                        heatmaps=True, device="gpu-recommended", weights_present=present,
                        weights_hint="" if present else W.WEIGHTS_HINT)
