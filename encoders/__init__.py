"""Vision experts (``zoo.encoders``): timm and transformers towers behind one interface.

Every expert owns its preprocessing (`preprocess`) and returns patch tokens ``[B, L, C]`` from a chosen layer.
"""

from . import hf_expert, timm_expert  # noqa: F401  (register the kinds)
from .base import ENCODERS, VisionExpert, build_encoder, hidden_state_to_block, to_rgb

__all__ = ["ENCODERS", "VisionExpert", "build_encoder", "hidden_state_to_block", "to_rgb"]
