"""The answer to one prompt, with where each part of it came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import PromptError
from .scoring import judged_absent, score_label


def check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 < t < 1.0:   # also refuses NaN
        raise PromptError(f"The mask threshold must lie strictly between 0 and 1, not {threshold}.")
    return t


@dataclass
class Finding:
    """``mask`` is uint8 exactly on the source grid (None when masks were not computed)."""

    prompt: str
    parsed: Any                          # prompts.ParsedPrompt
    kind: str                            # "anatomy" | "finding"
    anatomy: Optional[str]               # concrete key, or the group ("lung") when both sides
    finding: Optional[str]
    laterality: Optional[str]
    probability: Optional[float]         # the answer's number; 1 - p for negated prompts
    prompt_confidence: float
    mask: Optional[np.ndarray]
    volume_ml: Optional[float]
    codes: Optional[dict]
    color: tuple
    negated: bool = False
    probability_present: Optional[float] = None   # before negation
    anatomy_probabilities: dict = field(default_factory=dict)   # per judged concrete anatomy
    anatomies: tuple = ()                # concrete anatomy keys the mask covers / was judged in
    matched: Optional[str] = None        # vocabulary phrase used (parser match or fallback)
    fallback: bool = False               # True when the semantic (embedding) fallback was used
    name: str = ""                       # segment name
    terminology: Optional[str] = None    # Slicer terminology string
    mask_threshold: float = 0.5
    mask_model: Optional[str] = None     # model id that produced the mask
    score_model: Optional[str] = None    # model id that produced the number
    calibrated: bool = False             # the number is a calibrated probability
    calibration: Optional[str] = None    # "calibrated on <cohort>, n=<N>"
    understood: bool = True              # False: no concept matched well enough; no mask, no number
    suggestions: tuple = ()              # nearest vocabulary phrases when not understood
    mask_suppressed: bool = False        # a finding judged absent: its mask is left empty
    decision_score: Optional[float] = None  # uncalibrated score: its model's zero-shot decision point
    timings: dict = field(default_factory=dict)
    _logit: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    _grid: Any = field(default=None, repr=False, compare=False)
    _volume: Any = field(default=None, repr=False, compare=False)
    _mapper: Any = field(default=None, repr=False, compare=False)

    @property
    def score_label(self) -> Optional[str]:
        """What the number is: "probability present (calibrated on …)", "score absent
        (uncalibrated)", … (None for anatomy)."""
        if self.probability is None:
            return None
        return score_label(self.calibrated, self.calibration, self.negated)

    def heatmap(self) -> np.ndarray:
        """float32 mask probability in [0, 1] on the source grid (computed on demand)."""
        if self._logit is None:
            return np.asarray(self.mask, dtype=np.float32)
        return self._mapper.probability(self._logit, self._grid, self._volume)

    def with_threshold(self, threshold: float) -> "Finding":
        """The same finding with its mask re-thresholded (no re-encoding, no network pass)."""
        t = check_threshold(threshold)
        if self._logit is None or self.mask_suppressed:
            return dataclasses.replace(self, mask_threshold=t)
        mask = self._mapper.mask(self._logit, self._grid, self._volume, t)
        vol = float(np.count_nonzero(mask)) * self._volume.voxel_volume_ml
        return dataclasses.replace(self, mask=mask, volume_ml=vol, mask_threshold=t)

    def judged_absent(self, presence_threshold: float = 0.5) -> bool:
        """The engine's rule (``scoring.judged_absent``) at ``presence_threshold``."""
        return self.kind == "finding" and judged_absent(self.probability_present, self.calibrated,
                                                        presence_threshold, self.decision_score)

    def without_mask(self) -> "Finding":
        """This finding with an empty mask, marked suppressed (judged absent); its logits stay
        (heat map)."""
        if self.mask is None:
            return dataclasses.replace(self, mask_suppressed=True)
        return dataclasses.replace(self, mask=np.zeros_like(self.mask), volume_ml=0.0, mask_suppressed=True)

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
            "mask_model": self.mask_model, "score_model": self.score_model,
            "calibrated": self.calibrated, "calibration": self.calibration,
            "score_label": self.score_label, "understood": self.understood,
            "suggestions": list(self.suggestions), "mask_suppressed": self.mask_suppressed,
        }
