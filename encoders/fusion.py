"""Several vision experts as one tower: each preprocesses and encodes the images its own way, then the tokens are
fused by channel concatenation (Prismatic, MoVA: equal grids after alignment) or by sequence concatenation (MoCHA,
MouSi: any grids; one connector per expert, token counts add up).

Pixel values of a multi-expert tower are a dict ``{"0": [N, 3, S0, S0], "1": [N, 3, S1, S1], ...}`` (one tensor per
expert, in config order); `map_pixels` applies a tensor function to either form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from zoo.config import ConfigError, FusionConfig, VisionConfig

from .base import build_encoder

Pixels = torch.Tensor | dict[str, torch.Tensor]


def map_pixels(pixels: Pixels, fn: Callable[[torch.Tensor], torch.Tensor]) -> Pixels:
    """``fn`` applied to a pixel tensor, or to each expert's tensor of a multi-expert dict."""
    if isinstance(pixels, dict):
        return {k: fn(v) for k, v in pixels.items()}
    return fn(pixels)


def num_images(pixels: Pixels) -> int:
    """Images in a pixel batch of either form (all experts must agree)."""
    if not isinstance(pixels, dict):
        return len(pixels)
    counts = {k: len(v) for k, v in pixels.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"pixel_values: the experts hold different numbers of images {counts}")
    return next(iter(counts.values()), 0)


def align_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int],
               mode: str = "bilinear") -> torch.Tensor:
    """Resample patch tokens ``[N, h*w, C]`` (row-major grid ``(h, w)``) onto ``target`` ``(H, W)``.

    ``bilinear`` (align_corners=False) for up- and mild down-sampling; ``area`` averages (3x3 mean pooling for
    72 -> 24 exactly). Computed in fp32 and cast back.
    """
    n, length, channels = tokens.shape
    if length != grid[0] * grid[1]:
        raise ValueError(f"tokens: {length} tokens do not form the {grid[0]}x{grid[1]} grid")
    if tuple(grid) == tuple(target):
        return tokens
    maps = tokens.float().transpose(1, 2).reshape(n, channels, grid[0], grid[1])
    if mode == "bilinear":
        maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    elif mode == "area":
        if grid[0] % target[0] == 0 and grid[1] % target[1] == 0:  # whole blocks: plain mean pooling
            kernel = (grid[0] // target[0], grid[1] // target[1])
            maps = F.avg_pool2d(maps, kernel, stride=kernel)
        else:
            maps = F.adaptive_avg_pool2d(maps, target)
    else:
        raise ValueError(f"fusion.resample: expected 'bilinear' or 'area', got {mode!r}")
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)


class FusedVision(nn.Module):
    """Vision experts fused into one token stream (see the module docstring).

    ``forward(pixels)`` returns ``[N, L, sum C_e]`` (channel mode) or a list of ``[N, L_e, C_e]`` (sequence mode; the
    connector maps each expert with its own projector). ``width`` is the fused width (channel) or the list of widths
    (sequence); ``expert_ids`` ``[num_tokens]`` says which expert each LM image token comes from (sequence mode).
    """

    def __init__(self, configs: Sequence[VisionConfig], fusion: FusionConfig):
        super().__init__()
        if not configs:
            raise ConfigError("vision: an empty list of experts")
        self.fusion = fusion
        self.experts = nn.ModuleList(build_encoder(c, name=f"vision.{i}", path=f"vision[{i}]")
                                     for i, c in enumerate(configs))
        grids = [tuple(e.grid) for e in self.experts]
        self.target = (fusion.grid, fusion.grid) if fusion.grid else None
        if fusion.mode == "channel":
            kept = [i for i, e in enumerate(self.experts) if not e.config.drop_prefix and e.num_prefix_tokens]
            if kept:
                raise ConfigError(f"vision[{kept[0]}].drop_prefix: channel fusion concatenates patch grids; prefix "
                                  "tokens (CLS, registers) cannot be aligned, so they must be dropped")
            target = self.target or grids[0]
            if fusion.resample == "none" and len(set(grids)) > 1:
                shown = ", ".join(f"vision[{i}] {g[0]}x{g[1]}" for i, g in enumerate(grids))
                raise ConfigError(f"fusion.resample: channel fusion needs equal grids, got {shown}; set fusion.grid "
                                  "and fusion.resample (bilinear | area), or use fusion.mode: sequence")
            self.grids_out = [target] * len(grids)
            self.width: int | list[int] = sum(e.width for e in self.experts)
            self.num_tokens = target[0] * target[1]
            ids = torch.zeros(self.num_tokens, dtype=torch.long)
        else:
            self.grids_out = [self.target or g for g in grids] if fusion.resample != "none" else grids
            self.width = [e.width for e in self.experts]
            counts = [e.num_tokens - g[0] * g[1] + t[0] * t[1] for e, g, t in zip(self.experts, grids, self.grids_out)]
            self.num_tokens = sum(counts)
            # built on the CPU (a small index buffer) so that models also build on the meta device
            ids = torch.repeat_interleave(torch.arange(len(counts), device="cpu"), torch.tensor(counts, device="cpu"))
        self.register_buffer("expert_ids", ids, persistent=False)

    @property
    def token_counts(self) -> list[int]:
        """Tokens per image of each expert after alignment (sequence mode), or ``[num_tokens]`` (channel mode)."""
        if self.fusion.mode == "channel":
            return [self.num_tokens]
        return torch.bincount(self.expert_ids, minlength=len(self.experts)).tolist()

    @property
    def grid(self) -> tuple[int, int]:
        """The fused grid (channel mode) or the first expert's output grid."""
        return self.grids_out[0]

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """PIL images (any mode) -> ``{"0": pixels of expert 0, ...}``, each expert with its own preprocessing."""
        return {str(i): expert.preprocess(images) for i, expert in enumerate(self.experts)}

    def expert_tokens(self, i: int, pixels: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` alone: its pixels ``[N, 3, S_i, S_i]`` -> its tokens on its output grid (prefix tokens kept);
        MoVA runs only the experts the LM picked this way."""
        expert = self.experts[i]
        tokens = expert(pixels.to(next(expert.parameters()).dtype))
        grid, target = tuple(expert.grid), self.grids_out[i]
        if grid == target:
            return tokens
        prefix = tokens.shape[1] - grid[0] * grid[1]
        aligned = align_grid(tokens[:, prefix:], grid, target, self.fusion.resample)
        return torch.cat([tokens[:, :prefix], aligned], 1) if prefix else aligned

    def forward(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Per-expert pixel tensors -> fused tokens (channel) or the list of per-expert tokens (sequence)."""
        if not isinstance(pixels, dict):
            raise TypeError("pixel_values: a multi-expert tower takes a dict {expert index: [N, 3, S, S]} (from its "
                            f"preprocess), got {type(pixels).__name__}")
        expected = [str(i) for i in range(len(self.experts))]
        if sorted(pixels) != sorted(expected):
            raise ValueError(f"pixel_values: expected keys {expected} (one per expert), got {sorted(pixels)}")
        num_images(pixels)
        tokens = [self.expert_tokens(i, pixels[str(i)]) for i in range(len(self.experts))]
        if self.fusion.mode == "channel":  # experts held in different dtypes meet in the widest one
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in tokens])
            return torch.cat([t.to(dtype) for t in tokens], dim=2)
        return tokens

    def resolved_config(self) -> list[VisionConfig]:
        """The experts' configs that rebuild this tower without downloads."""
        return [e.resolved_config() for e in self.experts]


def build_vision(configs: VisionConfig | Sequence[VisionConfig], fusion: FusionConfig) -> nn.Module:
    """One expert (`VisionExpert`) or several fused (`FusedVision`), as the model config says."""
    if isinstance(configs, VisionConfig):
        return build_encoder(configs)
    return FusedVision(configs, fusion)

