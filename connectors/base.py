"""The connector interface: vision tokens ``[B, L, C]`` -> LM-width tokens, plus aux losses and routing stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zoo.config import ConfigError, ConnectorConfig
from zoo.moe.layer import RoutingStats
from zoo.registry import Registry

CONNECTORS: Registry = Registry("connector")


@dataclass
class ConnectorOutput:
    """``tokens``: ``[B, Lv, d_lm]``; ``aux_losses``: unscaled named losses; ``routing``: other per-call outputs by
    name (MoVA's gate weights, MoCHA's HGA gate, MouSi's position ids); ``expert_ids``: ``[Lv]`` the vision expert
    each token comes from (sequence-fused experts), else None; ``routing_stats``: `zoo.moe.RoutingStats` of each
    routed part, as sparse LM layers give them (``connector``, or ``connector.<i>`` for vision expert i's)."""

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_ids: torch.Tensor | None = None
    routing_stats: dict[str, RoutingStats] = field(default_factory=dict)


class PerExpertConnector(nn.Module):
    """One connector per vision expert (sequence fusion: MoCHA, MouSi); their tokens are concatenated in expert
    order. Aux losses and routing statistics keep their names with the expert index appended (``balance.1``)."""

    def __init__(self, config: ConnectorConfig, in_dims: list[int], out_dim: int):
        super().__init__()
        self.connectors = nn.ModuleList(
            CONNECTORS.get(config.kind, field="connector.kind")(config, d, out_dim) for d in in_dims)

    def output_tokens(self, in_tokens: list[int]) -> int:
        """Tokens out per image: each expert's connector's count, added up."""
        return sum(c.output_tokens(n) if hasattr(c, "output_tokens") else n for c, n in zip(self.connectors, in_tokens))

    def forward(self, features: list[torch.Tensor]) -> ConnectorOutput:
        if not isinstance(features, (list, tuple)) or len(features) != len(self.connectors):
            raise ValueError(f"connector: expected a list of {len(self.connectors)} per-expert token tensors, got "
                             f"{type(features).__name__}")
        outs = [c(f) for c, f in zip(self.connectors, features)]
        ids = torch.cat([torch.full((o.tokens.shape[1],), i, dtype=torch.long, device=o.tokens.device)
                         for i, o in enumerate(outs)])
        aux = {f"{k}.{i}": v for i, o in enumerate(outs) for k, v in o.aux_losses.items()}
        routing = {f"{k}.{i}": v for i, o in enumerate(outs) for k, v in o.routing.items()}
        stats = {f"{k}.{i}": v for i, o in enumerate(outs) for k, v in o.routing_stats.items()}
        return ConnectorOutput(torch.cat([o.tokens for o in outs], 1), aux, routing, ids, stats)


def build_connector(config: ConnectorConfig, in_dim: int | list[int], out_dim: int) -> nn.Module:
    """Build the connector named by ``config.kind`` mapping width ``in_dim`` to the LM width ``out_dim``.

    A list of widths (sequence-fused vision experts) goes to a connector class with ``multi_expert = True`` as is
    (it receives the list of per-expert token tensors); other kinds get one connector per expert
    (`PerExpertConnector`). A class with ``requires_multi_expert = True`` refuses a single width.
    """
    cls = CONNECTORS.get(config.kind, field="connector.kind")
    if isinstance(in_dim, (list, tuple)):
        if getattr(cls, "multi_expert", False):  # takes the per-expert token list itself (MoCHA, MoVA, MouSi)
            return cls(config, list(in_dim), out_dim)
        return PerExpertConnector(config, list(in_dim), out_dim)
    if getattr(cls, "requires_multi_expert", False):
        raise ConfigError(f"connector.kind: {config.kind!r} needs several vision experts fused by sequence "
                          "(vision: [...], fusion.mode: sequence)")
    return cls(config, in_dim, out_dim)
