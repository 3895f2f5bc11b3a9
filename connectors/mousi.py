"""MouSi (Fan et al., arXiv 2401.17221): poly-visual-expert fusion with position-id compression, kind ``mousi``.

Fusion (``options.fusion``):

* ``mlp`` (default): one LLaVA MLP (``connector.projector``) per expert, the experts' token sequences concatenated
  in ``vision`` order; ``expert_ids`` says which expert each token comes from.
* ``qformer``: ``options.queries`` learned queries attend to all experts' tokens at once (each expert projected to
  the LM width and tagged with a learned expert embedding) through ``options.layers`` transformer decoder layers
  (self-attention, cross-attention, MLP; BLIP-2's Q-Former layer) -> ``queries`` tokens whatever the experts' counts.

Position-id compression (``options.position_sharing``), per group of tokens (an expert for ``mlp``, the queries
for ``qformer``): ``none`` one id per token; ``all`` one id for the whole group (SAM's 4096 tokens -> 1 position);
``row`` one id per row of the group's square grid (64x64 -> 64). The ids are in ``routing["position_ids"]``
``[Lv]``: offsets from the position of the image block's first token, non-decreasing in steps of 0 or 1;
``ZooModel`` gives the image tokens these positions and the text after the image continues at ``start + max + 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.config import ConfigError, ConnectorConfig

from .base import CONNECTORS, ConnectorOutput
from .compress import check_square_option, connector_options, square_grid
from .mlp import MLPProjector

POSITION_SCHEMES = ("none", "all", "row")


def visual_position_ids(grid_h: int, grid_w: int, scheme: str, start: int = 0) -> tuple[torch.Tensor, int]:
    """Position ids ``[grid_h * grid_w]`` of a row-major token grid under ``scheme`` (``none`` | ``all`` | ``row``),
    counted from ``start``, and the next free id (``start`` + number of distinct ids)."""
    if scheme == "none":
        ids = torch.arange(grid_h * grid_w)
    elif scheme == "all":
        ids = torch.zeros(grid_h * grid_w, dtype=torch.long)
    elif scheme == "row":
        ids = torch.arange(grid_h).repeat_interleave(grid_w)
    else:
        raise ValueError(f"position_sharing: expected one of {', '.join(POSITION_SCHEMES)}, got {scheme!r}")
    return ids + start, start + int(ids.max()) + 1


class QFormerFusion(nn.Module):
    """``queries`` learned queries ``[Q, d]`` read all experts' tokens (projected to ``d``, plus a learned
    per-expert embedding) through transformer decoder layers; ``[N, L_e, C_e]`` per expert -> ``[N, Q, d]``."""

    def __init__(self, in_dims: list[int], width: int, queries: int, layers: int, heads: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, width) for d in in_dims)
        self.expert_embed = nn.Parameter(torch.zeros(len(in_dims), width))
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, width)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        memory = torch.cat([p(f) + e for p, f, e in zip(self.proj, features, self.expert_embed)], 1)
        x = self.queries.to(memory.dtype).expand(memory.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out(self.norm(x))


@CONNECTORS.register("mousi")
class MouSiConnector(nn.Module):
    """MouSi's poly-expert fusion network (see the module docstring).

    Options: ``fusion`` (``mlp`` | ``qformer``), ``position_sharing`` (``none`` | ``all`` | ``row``), and for
    ``qformer``: ``queries`` (32), ``layers`` (1), ``heads`` (LM width // 64, at least 1). One expert (a single
    width) is accepted as a one-element list.
    """

    multi_expert = True

    def __init__(self, config: ConnectorConfig, in_dims: int | list[int], out_dim: int):
        super().__init__()
        in_dims = [in_dims] if isinstance(in_dims, int) else list(in_dims)
        options = connector_options(config, {"fusion": "mlp", "position_sharing": "none", "queries": 32,
                                             "layers": 1, "heads": None})
        self.fusion, self.position_sharing = options["fusion"], options["position_sharing"]
        if self.fusion not in ("mlp", "qformer"):
            raise ConfigError(f"connector.options.fusion: expected 'mlp' or 'qformer', got {self.fusion!r}")
        if self.position_sharing not in POSITION_SCHEMES:
            raise ConfigError(f"connector.options.position_sharing: expected one of {', '.join(POSITION_SCHEMES)}, "
                              f"got {self.position_sharing!r}")
        self.num_experts = len(in_dims)
        if self.fusion == "mlp":
            self.projectors = nn.ModuleList(MLPProjector(config, d, out_dim) for d in in_dims)
            return
        if options["queries"] < 1 or options["layers"] < 1:
            key = "queries" if options["queries"] < 1 else "layers"
            raise ConfigError(f"connector.options.{key}: expected >= 1, got {options[key]}")
        if self.position_sharing == "row":
            check_square_option(options, "queries")  # 'row' sharing reads the queries as a square grid
        heads = options["heads"] or max(1, out_dim // 64)
        if not isinstance(heads, int) or out_dim % heads:
            raise ConfigError(f"connector.options.heads: {heads!r} does not divide the LM width {out_dim}")
        self.qformer = QFormerFusion(in_dims, out_dim, options["queries"], options["layers"], heads)

    def output_tokens(self, in_tokens: int | list[int]) -> int:
        """Tokens out per image: the queries (Q-Former fusion) or the experts' tokens added up."""
        if self.fusion == "qformer":
            return self.qformer.queries.shape[0]
        return sum(in_tokens) if isinstance(in_tokens, list) else in_tokens

    def position_ids(self, lengths: list[int]) -> torch.Tensor:
        """``[sum(lengths)]`` position offsets of consecutive token groups under ``options.position_sharing``."""
        start, parts = 0, []
        for i, length in enumerate(lengths):
            if self.position_sharing == "row":
                side = square_grid(length, f"connector.options.position_sharing ('row') on group {i}")
                grid = (side, side)
            else:
                grid = (1, length)
            ids, start = visual_position_ids(*grid, self.position_sharing, start)
            parts.append(ids)
        return torch.cat(parts)

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> ConnectorOutput:
        """One ``[N, L_e, C_e]`` per expert -> tokens ``[N, sum L_e or queries, out_dim]``, ``expert_ids``
        (``mlp``) and ``routing["position_ids"]`` ``[Lv]``."""
        features = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(features) != self.num_experts:
            raise ValueError(f"connector: mousi expects a list of {self.num_experts} per-expert token tensors, got "
                             f"{len(features)}")
        if self.fusion == "mlp":
            outs = [p(f).tokens for p, f in zip(self.projectors, features)]
            lengths = [o.shape[1] for o in outs]
            tokens = torch.cat(outs, 1)
            expert_ids = torch.repeat_interleave(torch.arange(len(outs), device=tokens.device),
                                                 torch.tensor(lengths, device=tokens.device))
        else:
            tokens = self.qformer(features)
            lengths, expert_ids = [tokens.shape[1]], None
        positions = self.position_ids(lengths).to(tokens.device)
        return ConnectorOutput(tokens, routing={"position_ids": positions}, expert_ids=expert_ids)
