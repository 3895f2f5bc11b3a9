"""Named vision experts: catalogue-level names -> `VisionConfig` mappings, each with a tiny random twin.

A real entry (``pretrained: true``) resolves to weights in a local dir or the offline cache (or the hub when it is
reachable). Its twin ``<name>-tiny`` has the same kind and family (transformers model type, timm architecture,
open_clip tower) at tiny widths with random weights, so that tests build every entry's code path offline.
``expert_config(name, **overrides)`` gives the `VisionConfig`.
"""

from __future__ import annotations

import copy
from typing import Any

from zoo.config import VISION_EXPERTS, VisionConfig, from_dict

TINY_SUFFIX = "-tiny"


def register_expert(name: str, real: dict[str, Any], tiny: dict[str, Any]) -> None:
    """Register ``name`` -> `real` and ``name-tiny`` -> `real` updated by `tiny` with random weights (``kwargs`` are
    merged key by key, so e.g. an open_clip ``pretrained_tag`` carries over to the twin)."""
    twin = {**copy.deepcopy(real), **copy.deepcopy(tiny), "pretrained": False}
    twin["kwargs"] = {**real.get("kwargs", {}), **tiny.get("kwargs", {})}
    VISION_EXPERTS.register(name, real)
    VISION_EXPERTS.register(name + TINY_SUFFIX, twin)


def expert_config(name: str, **overrides: Any) -> VisionConfig:
    """The `VisionConfig` of the named expert, with top-level fields replaced by `overrides` (e.g. ``image_size=448``,
    ``frozen=True``); unknown names raise an error listing the registered ones."""
    entry = VISION_EXPERTS.get(name, field="vision.expert")
    return from_dict(VisionConfig, {**copy.deepcopy(entry), **overrides}, "vision")


def _hf_twin(model_type: str, **extra: Any) -> dict[str, Any]:
    return {"name": None, "kwargs": {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 56,
                                     "patch_size": 14, **extra}}


_TINY_VIT = {"embed_dim": 64, "depth": 3, "num_heads": 2}

# OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 24x24 patches + CLS; trained with QuickGELU, which the
# transformers config carries (hidden_act).
register_expert("clip-vit-l-14-336", {"kind": "hf", "name": "openai/clip-vit-large-patch14-336", "pretrained": True},
                _hf_twin("clip_vision_model", hidden_act="quick_gelu"))
# SigLIP so400m/14 at 384 px: 27x27 patches, no CLS (MAP pooling), mean/std 0.5.
register_expert("siglip-so400m-14-384",
                {"kind": "hf", "name": "google/siglip-so400m-patch14-384", "pretrained": True},
                _hf_twin("siglip_vision_model"))
# DINOv2 ViT-L/14 at its native 518 px (37x37 patches + CLS), ImageNet mean/std; the reg4 variant adds 4 registers.
register_expert("dinov2-vit-l-14", {"kind": "timm", "name": "vit_large_patch14_dinov2.lvd142m", "pretrained": True},
                {"kwargs": _TINY_VIT, "image_size": 56})
register_expert("dinov2-vit-l-14-reg4",
                {"kind": "timm", "name": "vit_large_patch14_reg4_dinov2.lvd142m", "pretrained": True},
                {"kwargs": _TINY_VIT, "image_size": 56})
# LAION ConvNeXt-XXL CLIP (MoVA's and ConvLLaVA's tower): last stage, stride 32, 3072 channels; 256 px by default
# (8x8 tokens); the usual high-resolution use sets image_size 768 or 1024.
register_expert("convnext-xxl-clip",
                {"kind": "open_clip", "name": "convnext_xxlarge", "pretrained": True, "feature_layer": -1,
                 "kwargs": {"pretrained_tag": "laion2b_s34b_b82k_augreg_soup"}},
                {"kwargs": {"timm_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}}, "image_size": 64})
# SAM ViT-B image encoder at 1024 px (64x64 tokens, no prefix); the last block (global attention), before the neck.
register_expert("sam-vit-b", {"kind": "timm", "name": "samvit_base_patch16.sa1b", "pretrained": True,
                              "feature_layer": -1},
                {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
                            "window_size": 2}, "image_size": 64})
# BiomedCLIP ViT-B/16 (PMC-15M): a timm-backed open_clip tower, 14x14 patches + CLS, OpenAI mean/std.
register_expert("biomedclip",
                {"kind": "open_clip", "name": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                 "pretrained": True},
                {"kwargs": {"model_cfg": {"embed_dim": 32, "vision_cfg": {
                    "timm_model_name": "vit_base_patch16_224", "timm_pool": "", "timm_proj": "linear",
                    "image_size": 64}}, "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}})
