"""LLaVA's projector: ``linear``, ``identity`` or ``mlpNx_gelu`` (Linear, then N-1 x [GELU, Linear])."""

from __future__ import annotations

import re

import torch
from torch import nn

from zoo.config import ConnectorConfig

from .base import CONNECTORS, ConnectorOutput


@CONNECTORS.register("mlp")
class MLPProjector(nn.Module):
    """``[B, L, in_dim] -> [B, L, out_dim]``; ``mlp2x_gelu`` is ``W2 GELU(W1 x + b1) + b2`` (exact erf GELU)."""

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.config = config
        kind = config.projector
        if kind == "identity":
            if in_dim != out_dim:
                raise ValueError(f"connector.projector: identity needs equal widths, got vision {in_dim} "
                                 f"and LM {out_dim}")
            layers: list[nn.Module] = [nn.Identity()]
        elif kind == "linear":
            layers = [nn.Linear(in_dim, out_dim, bias=config.bias)]
        else:
            match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
            if not match or int(match.group(1)) < 1:
                raise ValueError(f"connector.projector: unknown projector {kind!r}; expected 'linear', "
                                 "'identity' or 'mlpNx_gelu' (N >= 1)")
            layers = [nn.Linear(in_dim, out_dim, bias=config.bias)]
            for _ in range(int(match.group(1)) - 1):
                layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=config.bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(self.layers(tokens))
