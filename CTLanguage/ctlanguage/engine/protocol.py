"""The backend contract: what every model plugged into the :class:`~ctlanguage.engine.Engine`
declares and implements.

A *backend* wraps one model family (the embedded grounded model, TotalSegmentator, Merlin,
VoxTell, ...). It declares :class:`Capabilities`, encodes a volume once into a backend *state*
(``encode``), and answers one resolved prompt on that state with a partial answer
(``answer`` -> :class:`Answer`: mask logits on a grid it names, or a mask on the source grid, and/or
presence scores per judged anatomy). The engine parses prompts, picks which backend answers what
(the pipeline's roles), maps masks to the source grid (``resample``), and builds the
:class:`~ctlanguage.engine.finding.Finding`, recording which model produced each part.

Backends never import the engine's orchestration; the engine never imports a backend module
except through the registry (``ctlanguage.backends``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

ROLES = ("anatomy", "masks", "scores")   # what a pipeline assigns to a backend


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do and needs (shown in model lists and used to compose pipelines)."""

    anatomy: tuple = ()              # vocabulary anatomy keys it can mask
    finding_masks: bool = False      # masks for vocabulary findings
    free_text_masks: bool = False    # masks for text outside the vocabulary
    scores: bool = False             # presence scores for vocabulary findings
    calibrated: bool = False         # its scores are calibrated probabilities
    heatmaps: bool = False           # soft maps ("where did it look")
    device: str = "cpu"              # "cpu" | "gpu-recommended" | "gpu"
    weights_present: bool = True
    weights_hint: str = ""           # one sentence: how to get the weights when absent
    fetches_own_weights: bool = False  # its package downloads them on first use, only with the
                                       # user's consent (CTLANGUAGE_ALLOW_DOWNLOADS=1)

    def summary(self) -> list[str]:
        out = []
        if self.anatomy:
            out.append(f"anatomy ({len(self.anatomy)})")
        if self.free_text_masks:
            out.append("free-text masks")
        elif self.finding_masks:
            out.append("finding masks")
        if self.scores:
            out.append("scores (calibrated)" if self.calibrated else "scores (uncalibrated)")
        if self.heatmaps:
            out.append("heat maps")
        return out


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model behind a backend: stamped on every number it produces."""

    id: str
    version: str = ""
    sha256: str = ""
    kind: str = ""                   # backend family, e.g. "grounded"
    license: str = ""
    path: Optional[str] = None
    calibration: Optional[str] = None   # e.g. "held-out phantoms (n=64)"; None: uncalibrated
    notice: str = ""                    # what a user must know (e.g. a demo model's measured limits)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Request:
    """One prompt after parsing, as the engine hands it to a backend."""

    text: str                        # the prompt as typed (free-text backends)
    kind: str                        # "anatomy" | "finding"
    anatomies: tuple                 # concrete anatomy keys the mask covers / finding is judged in
    finding: Optional[str] = None
    laterality: Optional[str] = None
    region: Optional[str] = None     # finer anatomy named in the prompt ("right lower lobe")
    want_mask: bool = True
    want_scores: bool = True


@dataclass
class Answer:
    """A backend's partial answer. Masks come either as logits on a model ``grid`` (the engine
    maps them onto the source voxels, ``resample``) or as a ready ``mask`` on the source grid."""

    model: str                                   # ModelInfo.id of the backend that answered
    logit: Optional[np.ndarray] = None           # float32 mask logits on ``grid``
    grid: Any = None                             # preprocess.ModelGrid of ``logit``
    mask: Optional[np.ndarray] = None            # uint8 on the source grid
    scores: dict = field(default_factory=dict)   # concrete anatomy key -> probability or score
    calibrated: bool = False
    calibration: Optional[str] = None
    # uncalibrated scores: the score at which the backend's zero-shot rule calls a finding present
    # (e.g. 0.0 for "positive minus negated similarity"); None: the score cannot judge presence
    decision_score: Optional[float] = None


@runtime_checkable
class BackendState(Protocol):
    """What a backend keeps from one encoded volume (small: feature-grid tensors, label maps)."""

    def tensors(self) -> Mapping[str, Any]:
        """Named tensors/arrays to save with the encoding."""

    def metadata(self) -> dict:
        """JSON-ready description (grids, keys) to save with the encoding."""

    def nbytes(self) -> int:
        ...


@runtime_checkable
class Backend(Protocol):
    info: ModelInfo
    capabilities: Capabilities

    def encode(self, volume, progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelFn] = None, anatomy: Any = None) -> BackendState:
        """Encode ``volume`` (a CTVolume) once. ``anatomy`` (:class:`AnatomyMasks`) is given when
        another backend of the pipeline provides anatomy (e.g. to pool features in its masks)."""

    def answer(self, state: BackendState, request: Request) -> Answer:
        """Answer one request on a state from :meth:`encode` (no image network pass)."""

    def restore(self, metadata: dict, tensors: Mapping[str, Any]) -> BackendState:
        """The state from what :meth:`BackendState.tensors`/``metadata`` saved."""


class AnatomyMasks:
    """The pipeline's anatomy backend on one encoded volume, as another backend sees it during
    its own ``encode`` (e.g. to pool features inside these masks: the fVLM recipe)."""

    def __init__(self, backend: "Backend", state: BackendState, volume):
        self.backend, self.state, self.volume = backend, state, volume

    @property
    def keys(self) -> tuple:
        return tuple(self.backend.capabilities.anatomy)

    def mask(self, keys: tuple) -> np.ndarray:
        """uint8 union mask of ``keys`` exactly on the source grid."""
        ans = self.backend.answer(self.state, Request(text=" ".join(keys), kind="anatomy",
                                                      anatomies=tuple(keys), want_scores=False))
        if ans.mask is not None:
            return ans.mask
        from ..resample import SourceMapper

        return SourceMapper().mask(ans.logit, ans.grid, self.volume, 0.5)


@runtime_checkable
class ConceptMatcher(Protocol):
    """Optional: a backend with a text encoder can map unknown text to the nearest vocabulary
    phrase (the engine's fallback for prompts the parser does not understand)."""

    def nearest_phrase(self, text: str) -> tuple:
        """(phrase, vocabulary key, laterality, cosine similarity)."""
