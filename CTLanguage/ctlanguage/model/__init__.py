"""Grounded CT-language model (see docs/architecture.md "Model API" and docs/model.md)."""

from .config import DEFAULT_ANATOMIES, ModelConfig
from .grounded import GroundedCTModel
from .image_encoder import ImageFeatures, coordinate_channels
from .text_encoder import FrozenTextEncoder

__all__ = ["GroundedCTModel", "ModelConfig", "ImageFeatures", "FrozenTextEncoder",
           "DEFAULT_ANATOMIES", "coordinate_channels"]
