"""The connector interface: vision tokens ``[B, L, C]`` -> LM-width tokens, plus aux losses and routing stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoo.config import ConnectorConfig
from zoo.registry import Registry

CONNECTORS: Registry = Registry("connector")


@dataclass
class ConnectorOutput:
    """``tokens``: ``[B, Lv, d_lm]``; ``aux_losses``: unscaled named losses; ``routing``: statistics by name."""

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)


def build_connector(config: ConnectorConfig, in_dim: int, out_dim: int) -> torch.nn.Module:
    """Build the connector named by ``config.kind`` mapping width ``in_dim`` to the LM width ``out_dim``."""
    return CONNECTORS.get(config.kind, field="connector.kind")(config, in_dim, out_dim)
