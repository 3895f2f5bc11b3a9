"""Vision experts (``zoo.encoders``): timm, transformers and open_clip towers behind one interface.

Every expert owns its preprocessing (`preprocess`) and returns patch tokens ``[B, L, C]`` from a chosen layer.
"""

from . import hf_expert, open_clip_expert, timm_expert  # noqa: F401  (register the kinds)
from .base import ENCODERS, VisionExpert, build_encoder, hidden_state_to_block, to_rgb
from .cache import FeatureCache, image_key, tower_fingerprint
from .fusion import FusedVision, align_grid, build_vision, map_pixels, num_images
from .named import VISION_EXPERTS, expert_config

__all__ = ["ENCODERS", "VISION_EXPERTS", "FeatureCache", "FusedVision", "VisionExpert", "align_grid", "build_encoder",
           "build_vision", "expert_config", "hidden_state_to_block", "image_key", "map_pixels", "num_images", "to_rgb",
           "tower_fingerprint"]
