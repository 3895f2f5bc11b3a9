"""Token compressors on a square patch grid, and ``compress_mlp``: compress, then LLaVA's MLP projector.

* `pixel_shuffle` (nanoVLM, Idefics3): each ``f x f`` block of tokens becomes one token holding their channels,
  ``[B, h*w, C] -> [B, h*w / f^2, C * f^2]``; nothing is averaged away, the projector sees every feature.
* `avg_pool_tokens`: area (mean) pooling of the grid, ``[B, h*w, C] -> [B, H*W, C]`` (MoVA's 576 -> 144 tokens).

`connector_options`, `check_square_option` and `square_grid` are the small option/grid checks the connectors of this package share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zoo.config import ConfigError, ConnectorConfig
from zoo.encoders.fusion import align_grid

from .base import CONNECTORS, ConnectorOutput
from .mlp import MLPProjector

Grid = int | tuple[int, int]


def connector_options(config: ConnectorConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """``config.options`` merged over ``defaults``.

    An unknown key, or a value whose type differs from a non-None default (an int is accepted for a float), raises
    `ConfigError` naming ``connector.options.<key>``; range checks are the connector's.
    """
    unknown = sorted(set(config.options) - set(defaults))
    if unknown:
        raise ConfigError(f"connector.options.{unknown[0]}: unknown option for connector kind {config.kind!r}; "
                          f"valid options: {', '.join(defaults)}")
    merged = {**defaults, **config.options}
    for key, default in defaults.items():
        value = merged[key]
        if default is None:  # optional setting: the connector checks it
            continue
        expected = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, expected):
            raise ConfigError(f"connector.options.{key}: expected {type(default).__name__}, got {value!r}")
    return merged


def square_grid(length: int, field: str) -> int:
    """The side of the square grid of ``length`` tokens; raises naming ``field`` when ``length`` is not a square."""
    side = math.isqrt(length) if length > 0 else 0
    if side * side != length or side == 0:
        raise ValueError(f"{field}: {length} tokens do not form a square grid (drop prefix tokens such as CLS, or "
                         "use an expert with a square patch grid)")
    return side


def check_square_option(options: dict[str, Any], key: str) -> None:
    """Raise `ConfigError` naming ``connector.options.<key>`` unless it is None or a positive square number."""
    value = options[key]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or math.isqrt(value) ** 2 != value:
        raise ConfigError(f"connector.options.{key}: expected a square number of tokens (e.g. 144), got {value!r}")


def _pair(grid: Grid) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def pixel_shuffle(tokens: torch.Tensor, grid: Grid, factor: int) -> torch.Tensor:
    """``[B, h*w, C]`` (row-major grid ``(h, w)``) -> ``[B, (h/f)*(w/f), C*f*f]``.

    Output token ``(i, j)`` concatenates the channels of input tokens ``(f*i + di, f*j + dj)`` in the order
    ``di, dj, C`` (nanoVLM's ``ModalityProjector.pixel_shuffle``).
    """
    h, w = _pair(grid)
    b, length, channels = tokens.shape
    if length != h * w:
        raise ValueError(f"pixel_shuffle: {length} tokens do not form the {h}x{w} grid")
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"pixel_shuffle: the {h}x{w} grid is not divisible by factor {factor}")
    x = tokens.reshape(b, h // factor, factor, w // factor, factor, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // factor) * (w // factor), channels * factor * factor)


def avg_pool_tokens(tokens: torch.Tensor, grid: Grid, target: Grid) -> torch.Tensor:
    """``[B, h*w, C]`` -> ``[B, H*W, C]`` by area pooling of the grid onto ``target`` ``(H, W)`` (an int: square).

    Whole blocks are plain means (4x4 -> 2x2 averages each 2x2 block); other ratios use adaptive average pooling.
    Computed in fp32 and cast back (`zoo.encoders.align_grid` in ``area`` mode).
    """
    return align_grid(tokens, _pair(grid), _pair(target), "area")


@CONNECTORS.register("compress_mlp")
class CompressMLP(nn.Module):
    """Compress the square token grid, then LLaVA's projector (``connector.projector``).

    Options: ``method``: ``pixel_shuffle`` (default; ``factor`` x ``factor`` tokens -> one token of
    ``factor^2 * C`` channels) or ``avg_pool`` (mean of each ``factor`` x ``factor`` block, or adaptive pooling to
    ``tokens`` tokens when given); ``factor`` (default 2). ``[B, h*w, C] -> [B, h*w / factor^2, out_dim]``.
    """

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        options = connector_options(config, {"method": "pixel_shuffle", "factor": 2, "tokens": None})
        self.method, self.factor, self.tokens = options["method"], options["factor"], options["tokens"]
        if self.method not in ("pixel_shuffle", "avg_pool"):
            raise ConfigError(f"connector.options.method: expected 'pixel_shuffle' or 'avg_pool', got {self.method!r}")
        if self.factor < 1:
            raise ConfigError(f"connector.options.factor: expected >= 1, got {self.factor}")
        if self.tokens is not None:
            if self.method != "avg_pool":
                raise ConfigError("connector.options.tokens: a token target needs method 'avg_pool' (pixel_shuffle "
                                  "is set by factor)")
            check_square_option(options, "tokens")
        width = in_dim * self.factor ** 2 if self.method == "pixel_shuffle" else in_dim
        self.projector = MLPProjector(config, width, out_dim)

    def output_tokens(self, in_tokens: int) -> int:
        """Tokens out for ``in_tokens`` tokens in (the LM positions one image takes)."""
        if self.method == "pixel_shuffle":
            return in_tokens // self.factor ** 2
        if self.tokens is not None:
            return self.tokens
        return (math.isqrt(in_tokens) // self.factor) ** 2

    def forward(self, tokens: torch.Tensor) -> ConnectorOutput:
        """``[B, L, C]`` with L a square -> `ConnectorOutput` with tokens ``[B, L', out_dim]``."""
        side = square_grid(tokens.shape[1], "connector compress_mlp input")
        if self.method == "pixel_shuffle":
            tokens = pixel_shuffle(tokens, side, self.factor)
        elif self.tokens is not None:
            tokens = avg_pool_tokens(tokens, side, math.isqrt(self.tokens))
        else:
            if side % self.factor:
                raise ValueError(f"connector.options.factor: the {side}x{side} grid is not divisible by {self.factor}")
            tokens = avg_pool_tokens(tokens, side, side // self.factor)
        return self.projector(tokens)
