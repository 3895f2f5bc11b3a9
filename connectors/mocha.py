"""MoCHA (Pang et al., arXiv 2507.22805), kind ``mocha``: a MoE connector per vision expert, then Hierarchical
Group Attention (HGA) over the concatenated tokens.

Each vision expert (sequence fusion) gets its own CuMo MoE connector (`MoEMLPConnector`: top-2 of 4 ``mlp2x_gelu``
experts, renormalised); their tokens are concatenated along the sequence in ``options.order`` (MoCHA's release:
SigLIP, ConvNeXt, CLIP, DINOv2), and each token's group is its vision expert. ``options.hga``:

* ``graph`` (default; the released code, no parameters), per image over ``X [N, d]`` with group ids ``g [N]``:
  similarities ``S = (X^ X^T) exp(1 / mean_i |x_i|)`` (``X^`` row-normalised, no self-loops); each token keeps its
  ``int(k * 0.7)`` most similar tokens of its own group and ``k - int(k * 0.7)`` of the other groups (k = 10 -> 7 + 3,
  clipped to what the groups hold); the kept similarities are min-max normalised over all edges of the image and
  every edge is also added reversed; ``a_i = sum_j w_ij x_j / sum_j w_ij``; gate ``gamma_i = sigmoid(10 (delta_i -
  0.2))`` with ``delta_i = mean_c |x_i - a_i|``; ``LayerNorm(((1 - gamma) x + gamma a)`` without affine. Computed in
  fp32. As released, an image whose kept similarities are all equal (e.g. identical tokens) gets all-zero edge
  weights, so ``a = 0``.
* ``attention`` (experimental; the paper's description, not the release): intra-group self-attention, attention of
  every token over the group summaries (mean of each group), a per-token sigmoid gate reading ``[x, update]``,
  ``x + gate * update``; the output projections start at zero, so a fresh module is the identity.
* ``none``: the concatenation as is.

`upcycle_mocha` co-upcycles trained per-expert ``mlp2x_gelu`` connectors. Aux losses and routing statistics of the
expert connectors carry the vision expert's index (``balance.0``, ``z_loss.1``, ``routing_stats["connector.2"]``); ``hga_gate``
``[B, Lv]`` is the HGA gate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ConfigError, ConnectorConfig

from .base import CONNECTORS, ConnectorOutput, PerExpertConnector
from .compress import connector_options
from .mlp import MLPProjector
from .moe_mlp import MoEMLPConnector, mlp_as_dense

HGA_MODES = ("graph", "attention", "none")


# ------------------------------------------------------------------------------------------------ graph HGA

def select_neighbours(x: torch.Tensor, groups: torch.Tensor, neighbours: int = 10, intra_fraction: float = 0.7
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's kNN edges as the released MoCHA code picks them.

    ``x`` ``[B, N, d]``, ``groups`` ``[N]`` -> ``index`` and ``similarity`` ``[B, N, K1 + K2]`` and ``valid``
    ``[N, K1 + K2]``: columns ``:K1`` are intra-group neighbours (``min(int(neighbours * intra_fraction), n_g - 1)``
    valid per token of group g), columns ``K1:`` inter-group ones (``min(rest, N - n_g)`` valid). Invalid slots
    hold ``-inf`` similarity.
    """
    n = groups.numel()
    intra_k = int(neighbours * intra_fraction)
    cross_k = neighbours - intra_k
    same = groups[:, None] == groups[None, :]
    size = same.sum(1)
    n_intra, n_cross = (size - 1).clamp(max=intra_k), (n - size).clamp(max=cross_k)
    temperature = 1.0 / x.norm(dim=-1).mean(-1)  # [B]
    unit = F.normalize(x, dim=-1)
    sim = unit @ unit.transpose(1, 2) * torch.exp(temperature)[:, None, None]
    self_loop = torch.eye(n, dtype=torch.bool, device=x.device)
    intra_sim, intra_index = sim.masked_fill(~same | self_loop, float("-inf")).topk(int(n_intra.max()), dim=-1)
    cross_sim, cross_index = sim.masked_fill(same, float("-inf")).topk(int(n_cross.max()), dim=-1)
    valid = torch.cat([torch.arange(intra_index.shape[-1], device=x.device) < n_intra[:, None],
                       torch.arange(cross_index.shape[-1], device=x.device) < n_cross[:, None]], 1)
    return torch.cat([intra_index, cross_index], -1), torch.cat([intra_sim, cross_sim], -1), valid


def edge_weights(similarity: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalisation of the valid edges' similarities ``[B, N, K]`` over each image's edges; invalid: 0."""
    valid = valid.expand_as(similarity)
    sim = torch.where(valid, similarity, torch.zeros_like(similarity))
    low = sim.masked_fill(~valid, float("inf")).amin((1, 2), keepdim=True)
    high = sim.masked_fill(~valid, float("-inf")).amax((1, 2), keepdim=True)
    return torch.where(valid, (sim - low) / (high - low + eps), torch.zeros_like(sim))


def graph_hga(x: torch.Tensor, groups: torch.Tensor, neighbours: int = 10, intra_fraction: float = 0.7
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The released HGA (module docstring) on ``x`` ``[B, N, d]`` with group ids ``[N]``, batched over images.

    Returns the new tokens ``[B, N, d]`` (rows with zero mean and unit variance, in ``x``'s dtype) and the gate
    ``gamma`` ``[B, N]``.
    """
    x32 = x.float()
    index, similarity, valid = select_neighbours(x32, groups, neighbours, intra_fraction)
    weight = edge_weights(similarity, valid)
    adjacency = torch.zeros(x.shape[0], x.shape[1], x.shape[1], device=x.device).scatter_add(2, index, weight)
    adjacency = adjacency + adjacency.transpose(1, 2)  # every edge also reversed (a pair picked twice counts twice)
    aggregate = adjacency @ x32 / (adjacency.sum(-1, keepdim=True) + 1e-8)
    gate = torch.sigmoid(10 * ((x32 - aggregate).abs().mean(-1, keepdim=True) - 0.2))
    mixed = (1 - gate) * x32 + gate * aggregate
    return F.layer_norm(mixed, mixed.shape[-1:]).to(x.dtype), gate.squeeze(-1)


# ------------------------------------------------------------------------------------------------ attention HGA

class GroupAttention(nn.Module):
    """Learnable HGA (experimental): intra-group self-attention, attention over the group summaries, sigmoid gate.

    ``forward(x [B, N, d], groups [N])`` -> (``x + gate * (intra + inter)`` ``[B, N, d]``, gate ``[B, N]``). The
    attention output projections start at zero: a fresh module returns ``x`` unchanged.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.intra = nn.MultiheadAttention(width, heads, batch_first=True)
        self.inter = nn.MultiheadAttention(width, heads, batch_first=True)
        self.gate = nn.Linear(2 * width, 1)
        for attention in (self.intra, self.inter):
            nn.init.zeros_(attention.out_proj.weight)
            nn.init.zeros_(attention.out_proj.bias)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        intra, _ = self.intra(h, h, h, attn_mask=groups[:, None] != groups[None, :], need_weights=False)
        members = F.one_hot(torch.unique(groups, return_inverse=True)[1]).to(h.dtype)  # [N, G]
        summaries = torch.einsum("ng,bnd->bgd", members / members.sum(0), h + intra)
        inter, _ = self.inter(h, summaries, summaries, need_weights=False)
        update = intra + inter
        gate = torch.sigmoid(self.gate(torch.cat([x, update], -1)))
        return x + gate * update, gate.squeeze(-1)


# ------------------------------------------------------------------------------------------------ connector

@CONNECTORS.register("mocha")
class MoCHAConnector(nn.Module):
    """MoCHA's connector over sequence-fused vision experts (see the module docstring).

    ``connector.moe`` / ``projector`` / ``bias``: as for ``moe_mlp`` (one `MoEMLPConnector` per expert).
    Options: ``order`` (a permutation of the expert indices; default config order), ``hga`` (``graph`` |
    ``attention`` | ``none``; default ``graph``), ``neighbours`` (10) and ``intra_fraction`` (0.7) for ``graph``,
    ``heads`` (LM width // 64, at least 1) for ``attention``.
    ``forward``: one ``[B, L_e, C_e]`` per expert -> tokens ``[B, sum L_e, out_dim]`` with ``expert_ids``.
    """

    multi_expert = True
    requires_multi_expert = True
    default_coefficients = MoEMLPConnector.default_coefficients

    def __init__(self, config: ConnectorConfig, in_dims: list[int], out_dim: int):
        super().__init__()
        options = connector_options(config, {"order": None, "hga": "graph", "neighbours": 10, "intra_fraction": 0.7,
                                             "heads": None})
        n = len(in_dims)
        order = list(range(n)) if options["order"] is None else options["order"]
        if (not isinstance(order, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in order)
                or sorted(order) != list(range(n))):
            raise ConfigError(f"connector.options.order: expected a permutation of the expert indices 0..{n - 1}, "
                              f"got {order!r}")
        self.order, self.hga = order, options["hga"]
        if self.hga not in HGA_MODES:
            raise ConfigError(f"connector.options.hga: expected one of {', '.join(map(repr, HGA_MODES))}, "
                              f"got {self.hga!r}")
        self.neighbours, self.intra_fraction = options["neighbours"], float(options["intra_fraction"])
        if self.neighbours < 1:
            raise ConfigError(f"connector.options.neighbours: expected >= 1, got {self.neighbours}")
        if not 0.0 <= self.intra_fraction <= 1.0:
            raise ConfigError(f"connector.options.intra_fraction: expected a fraction in [0, 1], got "
                              f"{self.intra_fraction}")
        self.config = config
        expert_config = dataclasses.replace(config, options={})
        self.connectors = nn.ModuleList(MoEMLPConnector(expert_config, d, out_dim) for d in in_dims)
        self.attention = None
        if self.hga == "attention":
            heads = options["heads"] or max(1, out_dim // 64)
            if isinstance(heads, bool) or not isinstance(heads, int) or out_dim % heads:
                raise ConfigError(f"connector.options.heads: {heads!r} does not divide the LM width {out_dim}")
            self.attention = GroupAttention(out_dim, heads)
        elif options["heads"] is not None:
            raise ConfigError(f"connector.options.heads: only used by hga 'attention', got hga {self.hga!r}")

    @classmethod
    def bench_configs(cls) -> dict[str, dict[str, Any]]:
        """The variants `bench/connectors.py` times: each HGA mode."""
        return {f"mocha (hga {mode})": {"kind": "mocha", "options": {"hga": mode}} for mode in HGA_MODES}

    def forward(self, features: list[torch.Tensor]) -> ConnectorOutput:
        """Per-expert tokens ``[B, L_e, C_e]`` (vision order) -> `ConnectorOutput` (module docstring)."""
        if not isinstance(features, (list, tuple)) or len(features) != len(self.connectors):
            raise ValueError(f"connector: mocha expects a list of {len(self.connectors)} per-expert token tensors, "
                             f"got {type(features).__name__}")
        outs = {i: self.connectors[i](features[i]) for i in self.order}
        tokens = torch.cat([outs[i].tokens for i in self.order], 1)
        lengths = torch.tensor([outs[i].tokens.shape[1] for i in self.order])
        expert_ids = torch.repeat_interleave(torch.tensor(self.order), lengths).to(tokens.device)
        aux = {f"{name}.{i}": value for i in self.order for name, value in outs[i].aux_losses.items()}
        routing = {f"{name}.{i}": value for i in self.order for name, value in outs[i].routing.items()}
        stats = {f"{name}.{i}": value for i in self.order for name, value in outs[i].routing_stats.items()}
        if self.hga == "graph":
            tokens, gate = graph_hga(tokens, expert_ids, self.neighbours, self.intra_fraction)
            routing["hga_gate"] = gate.detach()
        elif self.attention is not None:
            tokens, gate = self.attention(tokens, expert_ids)
            routing["hga_gate"] = gate.detach()
        return ConnectorOutput(tokens, aux, routing, expert_ids, stats)


def upcycle_mocha(mlps: PerExpertConnector | Sequence[MLPProjector], options: dict[str, Any] | None = None,
                  **moe: Any) -> MoCHAConnector:
    """Co-upcycle trained per-expert ``mlp2x_gelu`` connectors (a `PerExpertConnector` of kind ``mlp``, or a list in
    vision order) into a `MoCHAConnector`: each expert's MoE connector holds copies of its MLP and a new router.

    ``options``: the MoCHA options (``hga``, ``order``, ...); ``moe``: ``connector.moe`` settings. Before HGA the
    output equals the MLPs' concatenated outputs for any routing (renormalised top-k).
    """
    mlps = list(mlps.connectors if isinstance(mlps, PerExpertConnector) else mlps)
    dense = [mlp_as_dense(mlp) for mlp in mlps]
    config = dataclasses.replace(mlps[0].config, kind="mocha", moe={**mlps[0].config.moe, **moe},
                                 options=dict(options or {}))
    connector = MoCHAConnector(config, [d.w_in.shape[0] for d in dense], dense[0].hidden_size)
    connector.to(device=dense[0].w_in.device, dtype=dense[0].w_in.dtype)
    for expert, mlp in zip(connector.connectors, mlps):
        expert.load_mlp(mlp)
    return connector
