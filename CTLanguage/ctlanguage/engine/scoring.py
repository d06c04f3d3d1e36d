"""Scores to probabilities, in one place: calibration (shared temperature and per-finding offsets
from the model's own fit, or a site's ``ctlanguage calibrate`` file), sides, negation, and how a
number is labelled ("probability (calibrated on X, n=N)" vs "score (uncalibrated)").

Training fits the model's calibration with the same function (:func:`calibrated_probability`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "ctlanguage-calibration/1"
CALIBRATION_FILE = "calibration.json"


def calibrated_probability(logit: float, temperature: float = 1.0, offset: float = 0.0) -> float:
    """sigmoid(logit / T + b), overflow-safe."""
    z = float(logit) / float(temperature) + float(offset)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """Temperature and offsets of one model, with where they were fitted."""

    temperature: float = 1.0
    offsets: dict = field(default_factory=dict)        # finding -> offset ("_default" allowed)
    temperatures: dict = field(default_factory=dict)   # finding -> temperature (site files)
    name: str = ""                                     # cohort the fit used
    n: Optional[int] = None
    date: str = ""
    source: str = "model"                              # "model" | a calibration file path

    def offset(self, finding: Optional[str]) -> float:
        b = self.offsets or {}
        return float(b.get(finding, b.get("_default", 0.0)) if finding else b.get("_default", 0.0))

    def probability(self, logit: float, finding: Optional[str] = None) -> float:
        t = float(self.temperatures.get(finding, self.temperature)) if finding else self.temperature
        return calibrated_probability(logit, t, self.offset(finding))

    @property
    def label(self) -> str:
        n = f", n={self.n}" if self.n else ""
        return f"calibrated on {self.name}{n}" if self.name else "calibrated"

    @classmethod
    def from_model_config(cls, config, name: str = "", n: Optional[int] = None) -> "Calibration":
        return cls(temperature=float(config.calibration_temperature),
                   offsets=dict(getattr(config, "calibration_bias", None) or {}), name=name, n=n)

    @classmethod
    def from_file(cls, path: Path) -> "Calibration":
        from ..errors import CheckpointError

        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"The calibration file {path} cannot be read ({exc}).") from None
        if d.get("format") != CALIBRATION_FORMAT:
            raise CheckpointError(f"{path} is not a {CALIBRATION_FORMAT} file.")
        per = d.get("per_finding") or {}
        return cls(temperature=float(d.get("temperature", 1.0)),
                   offsets={k: float(v) for k, v in (d.get("offsets") or {}).items()},
                   temperatures={k: float(v["temperature"]) for k, v in per.items()
                                 if isinstance(v, dict) and "temperature" in v},
                   name=str(d.get("name", "")), n=d.get("n"), date=str(d.get("date", "")),
                   source=str(path))


def user_calibration_path(model_id: str, sha256: str) -> Path:
    """Where ``ctlanguage calibrate`` stores a site calibration of a read-only model."""
    from ..catalog import cache_dir

    return cache_dir() / "calibration" / f"{model_id}-{sha256[:12]}.json"


def site_calibration(model_id: str, sha256: str, model_dir: Optional[Path]) -> Optional[Calibration]:
    """A site's calibration of this exact model (beside the model, else in the user cache)."""
    candidates = [Path(model_dir) / CALIBRATION_FILE] if model_dir else []
    candidates.append(user_calibration_path(model_id, sha256))
    for p in candidates:
        if p.is_file():
            cal = Calibration.from_file(p)
            log.info("Using the calibration %s (%s).", p, cal.label)
            return cal
    return None


def combine_sides(values: Sequence[float], laterality: Optional[str]) -> float:
    """Presence over the judged anatomies: all of them for "bilateral", else any of them."""
    vals = [float(v) for v in values]
    return min(vals) if laterality == "bilateral" and len(vals) > 1 else max(vals)


def judged_absent(present: Optional[float], calibrated: bool, presence_threshold: float,
                  decision_score: Optional[float] = None) -> bool:
    """Whether a finding counts as absent (it then gets no mask by default): a calibrated
    probability below ``presence_threshold``, or an uncalibrated score below its backend's own
    zero-shot decision point; an uncalibrated score without one judges nothing."""
    if present is None:
        return False
    if calibrated:
        return present < presence_threshold
    return decision_score is not None and present < decision_score


def answer_value(p_present: float, negated: bool, calibrated: bool = True) -> float:
    """The number a prompt's question asks for: P(absent) for a negated prompt; for an
    uncalibrated score, the score of absence is its negative (1 - s would look like a probability)."""
    if not negated:
        return p_present
    return 1.0 - p_present if calibrated else -p_present


def score_label(calibrated: bool, calibration: Optional[str], negated: bool = False) -> str:
    """How a number is worded in tables, JSON, reports and the web legend."""
    what = "absent" if negated else "present"
    if calibrated:
        return f"probability {what} ({calibration or 'calibrated'})"
    return f"score {what} (uncalibrated)"
