"""S2-style multi-scale features (Shi et al. 2024; CuMo's 336 + 1008): an expert sees the image at its own
resolution and at s times it, the larger views cut into s x s chessboard crops of the native size; each crop is
encoded, the crops' patch grids are merged back into one (s*h) x (s*w) grid and area-pooled to h x w, and the
scales are concatenated along channels (width C * number of scales, same token count).

Set ``vision.scales: [1, 3]``; the images are preprocessed once at the largest resolution and resized down
(bicubic, on the tensor) for the smaller scales, as the S2 wrapper does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from zoo.config import ConfigError, VisionConfig


def split_chessboard(x: torch.Tensor, s: int) -> torch.Tensor:
    """``[B, C, s*H, s*W]`` -> ``[s*s*B, C, H, W]``: crops in row-major order, crop-major along the batch."""
    b, c, h, w = x.shape
    if h % s or w % s:
        raise ValueError(f"split_chessboard: a {h}x{w} map does not split into {s}x{s} crops")
    x = x.view(b, c, s, h // s, s, w // s).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(s * s * b, c, h // s, w // s)


def merge_chessboard(x: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of `split_chessboard`: ``[s*s*B, C, H, W]`` -> ``[B, C, s*H, s*W]``."""
    n, c, h, w = x.shape
    if n % (s * s):
        raise ValueError(f"merge_chessboard: {n} crops are not a multiple of {s}x{s}")
    b = n // (s * s)
    return x.view(s, s, b, c, h, w).permute(2, 3, 0, 4, 1, 5).reshape(b, c, s * h, s * w)


class MultiScaleExpert(nn.Module):
    """An expert read at several scales (see the module docstring); ``expert`` is the wrapped expert, a
    `zoo.encoders.base.VisionExpert` (whose `build_encoder` makes this wrapper, so this module does not import it)."""

    def __init__(self, expert: nn.Module, scales: Sequence[int]):
        super().__init__()
        if expert.num_prefix_tokens and not expert.config.drop_prefix:
            raise ConfigError("vision.drop_prefix: multi-scale features merge patch grids; prefix tokens (CLS, "
                              "registers) must be dropped")
        self.expert = expert
        self.scales = sorted(set(scales))
        self.config: VisionConfig = expert.config
        self.width = expert.width * len(self.scales)
        self.grid = expert.grid
        self.num_prefix_tokens = 0
        self.num_tokens = expert.grid[0] * expert.grid[1]
        self.image_size, self.mean, self.std = expert.image_size, expert.mean, expert.std

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[N, 3, S*s_max, S*s_max]`` (the largest view; smaller ones are resized from it)."""
        return self.expert.preprocess(images, size=self.image_size * max(self.scales))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S*s_max, S*s_max]`` -> ``[N, h*w, C * len(scales)]``."""
        side = self.image_size * max(self.scales)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (side, side):
            raise ValueError(f"pixel_values: expected [N, 3, {side}, {side}] (the largest scale), got "
                             f"{tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        h, w = self.grid
        outs = []
        for s in self.scales:
            size = self.image_size * s
            view = pixel_values if size == side else F.interpolate(
                pixel_values.float(), size=(size, size), mode="bicubic", align_corners=False).to(pixel_values.dtype)
            tokens = self.expert(split_chessboard(view, s) if s > 1 else view)  # [s*s*N, h*w, C]
            maps = tokens.transpose(1, 2).reshape(-1, tokens.shape[-1], h, w)
            if s > 1:
                merged = merge_chessboard(maps, s).float()
                maps = F.avg_pool2d(merged, s, stride=s).to(tokens.dtype)  # area: s x s means, exact
            outs.append(maps.reshape(n, -1, h * w).transpose(1, 2))
        return torch.cat(outs, dim=2)

    def resolved_config(self) -> VisionConfig:
        """The wrapped expert's resolved config (its ``scales`` kept)."""
        return self.expert.resolved_config()

    def train(self, mode: bool = True) -> MultiScaleExpert:
        self.training = mode
        self.expert.train(mode)
        return self
