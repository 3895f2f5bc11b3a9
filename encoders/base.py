"""The vision-expert interface shared by every encoder kind."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from zoo import images
from zoo.config import ConfigError, VisionConfig
from zoo.registry import Registry

from .multiscale import MultiScaleExpert

ENCODERS: Registry[type[VisionExpert]] = Registry("encoder")


def hidden_state_to_block(feature_layer: int, depth: int, field: str = "vision.feature_layer") -> int:
    """Map a transformers-style ``hidden_states`` index to a 0-based block index.

    ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` the output of block ``i - 1``, so the
    LLaVA default ``-2`` is block ``depth - 2``.
    """
    index = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
    if not 1 <= index <= depth:
        raise ConfigError(f"{field}: {feature_layer} is out of range for a {depth}-block encoder "
                          f"(valid: 1..{depth} or -{depth}..-1)")
    return index - 1


def to_rgb(image: Image.Image, index: int = 0) -> Image.Image:
    """Any PIL mode -> RGB by `zoo.images.to_rgb`, errors starting with ``image {index}:``: ``TypeError`` for a
    non-image, `zoo.images.ImageError` (a ``ValueError``) for an image with a side under ``MIN_IMAGE_SIDE`` pixels,
    more than ``MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb limit: decoding it would take gigabytes), 16/32-bit
    or float pixels, or data that cannot be decoded (truncated or corrupt file)."""
    return images.to_rgb(image, f"image {index}")


class VisionExpert(nn.Module):
    """A vision expert: owns its preprocessing and returns patch tokens ``[B, L, C]``.

    Subclasses set ``width`` (C), ``grid`` ((h, w) of patch tokens), ``num_prefix_tokens`` (CLS/registers in the
    backbone), ``image_size``, ``mean`` and ``std``, and implement ``forward_tokens``.
    """

    width: int
    grid: tuple[int, int]
    num_prefix_tokens: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config

    @property
    def num_tokens(self) -> int:
        """Tokens per image handed to the connector."""
        extra = 0 if self.config.drop_prefix else self.num_prefix_tokens
        return self.grid[0] * self.grid[1] + extra

    def preprocess(self, images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
        """PIL images (any mode) -> normalised float tensor ``[N, 3, S, S]`` at this expert's resolution (or
        ``size``)."""
        size = size or self.image_size
        out = np.empty((len(images), size, size, 3), dtype=np.float32)
        fill = tuple(int(m * 255) for m in self.mean)  # truncated, as LLaVA's expand2square and llava-hf pad
        for i, image in enumerate(images):
            image = to_rgb(image, i)
            if self.config.resize == "pad" and image.width != image.height:
                side = max(image.size)
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = canvas
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            out[i] = np.asarray(image, dtype=np.float32)
        pixels = torch.from_numpy(out).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def resolved_config(self) -> VisionConfig:
        """A config that rebuilds this architecture with no download (``pretrained`` cleared, preprocessing
        written out)."""
        return dataclasses.replace(self.config, pretrained=False, image_size=self.image_size,
                                   mean=list(self.mean), std=list(self.std))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, num_tokens, width]`` from the configured layer."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected [N, 3, H, W], got {tuple(pixel_values.shape)}")
        if self.config.frozen:
            with torch.no_grad():
                return self.forward_tokens(pixel_values)
        return self.forward_tokens(pixel_values)

    def train(self, mode: bool = True) -> VisionExpert:
        # A frozen expert stays in eval mode (dropout, norm statistics) whatever the trainer asks.
        return super().train(mode and not self.config.frozen)


def sparsify_expert(expert: VisionExpert, policy, path: str = "vision.sparsity", name: str = "vision") -> list[int]:
    """Make the FFNs of a vision expert's transformer blocks sparse by ``policy`` (a `SparsityConfig`; CuMo's
    CLIP-MoE: preset ``cumo``), in place; blocks the expert never runs stay frozen. Returns the sparse block indices."""
    from zoo.lm.sparse import sparsify

    inner = getattr(expert, "expert", expert)  # a multi-scale wrapper holds the expert
    try:
        layers = sparsify(inner.model, policy, path=path, name=name, reachable=getattr(inner, "reachable_blocks", None))
    except ConfigError:
        raise
    except ValueError as e:  # no transformer blocks, or blocks whose MLP is not made of linear layers
        raise ConfigError(f"{path}: the {inner.config.kind} expert {inner.config.name or ''} cannot be made sparse "
                          f"({e})") from e
    if hasattr(inner, "freeze_unreachable"):
        inner.freeze_unreachable()
    return sorted(layers)


def build_encoder(config: VisionConfig, name: str = "vision", path: str = "vision") -> VisionExpert:
    """Build the vision expert named by ``config.kind`` (wrapped for S2 multi-scale features if ``scales``; blocks
    made sparse if ``sparsity``, named ``<name>.layers.<i>`` in routing statistics; errors name ``<path>.<field>``)."""
    expert = ENCODERS.get(config.kind, field=f"{path}.kind")(config)
    if expert.num_tokens < 1:
        raise ConfigError(f"{path}.image_size: {expert.image_size} px gives the {config.kind} expert no token (its "
                          f"grid is {expert.grid[0]}x{expert.grid[1]}); use a larger image size")
    if config.sparsity is not None:
        sparsify_expert(expert, config.sparsity, path=f"{path}.sparsity", name=name)
    if config.scales and config.scales != [1]:
        expert = MultiScaleExpert(expert, config.scales)
    if config.dtype is not None:
        expert.to(getattr(torch, config.dtype))
    if config.frozen:
        expert.requires_grad_(False)
        expert.eval()
    return expert
