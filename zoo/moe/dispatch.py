"""Dispatch backends: send routed slots to the stacked experts and combine the weighted outputs.

All backends take the same arguments, ``(experts, x [T, d], token [S], expert [S], weight [S]) -> y [T, d]``,
for the slots that survived capacity (null-expert slots removed), and give the same outputs and gradients:

- ``loop``: the oracle; one ``where`` and three matmuls per expert, ``index_add_`` back.
- ``grouped``: slots sorted by expert, then the expert kernels of `zoo.moe.kernels` (gather, both projections
  with the gates folded into the activations, and the combine in one autograd node on the CPU; torch's grouped
  matmul per projection on accelerators). Dropless; the default.
- ``padded``: GShard layout: slots scattered into per-expert buffers [E, C, d] (C = the fullest expert's load, at
  most the capacity), one ``bmm`` per projection, gathered back. Spends FLOPs on padding; kept for reproduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoo.moe.config import DISPATCHERS
from zoo.moe.experts import StackedExperts
from zoo.moe.routing import position_in_expert


def _combine(x: torch.Tensor, token: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    y = torch.zeros(x.shape[0], out.shape[1], dtype=out.dtype, device=out.device)
    return y.index_add_(0, token, out)


@DISPATCHERS.register("loop")
def loop_dispatch(experts: StackedExperts, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Reference: for each expert, gather its rows, run it, scale by the gates, add back."""
    y = torch.zeros(x.shape[0], experts.hidden_size, dtype=x.dtype, device=x.device)
    for e in range(experts.num_experts):
        sel = torch.nonzero(expert == e).squeeze(1)
        if sel.numel() == 0:
            continue
        rows = token[sel]
        out = experts.forward_expert(e, x[rows]) * weight[sel].to(x.dtype).unsqueeze(-1)
        y = y.index_add(0, rows, out)
    return y


@DISPATCHERS.register("grouped")
def grouped_dispatch(experts: StackedExperts, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
    """Sort slots by expert and run all experts on their segments (`StackedExperts.forward_grouped`)."""
    order = torch.argsort(expert, stable=True)
    expert_sorted, token_sorted = expert[order], token[order]
    counts = torch.bincount(expert_sorted, minlength=experts.num_experts)
    return experts.forward_grouped(x, token_sorted, expert_sorted, counts, weight[order])


@DISPATCHERS.register("padded")
def padded_dispatch(experts: StackedExperts, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """GShard-style capacity buffers [E, C, d]; C is the largest expert load (<= the capacity when one is set)."""
    if token.numel() == 0:
        return torch.zeros(x.shape[0], experts.hidden_size, dtype=x.dtype, device=x.device)
    position = position_in_expert(expert, None, experts.num_experts)
    capacity = int(position.max()) + 1
    buffers = x.new_zeros(experts.num_experts, capacity, x.shape[1])
    buffers = buffers.index_put((expert, position), x[token])
    out = experts.forward_padded(buffers)[expert, position] * weight.to(x.dtype).unsqueeze(-1)
    return _combine(x, token, out)


def get_dispatch(name: str) -> Callable[..., torch.Tensor]:
    """The backend registered as ``name`` (error lists the known ones)."""
    return DISPATCHERS.get(name, field="backend")
