"""Sparse upcycling: a dense FFN becomes E experts plus a fresh router (MoE-LLaVA, Komatsuzaki et al., 2023).

``upcycle(ffn, num_experts=E, top_k=k)`` copies the FFN E times. With renormalised top-k and no dropping the
layer then computes exactly the dense FFN, whatever the router weights (the gates of identical experts sum to 1).

``granularity=m`` is fine-grained upcycling (DeepSeekMoE): each copy is split along its intermediate dimension into
m slices of width f/m, giving E experts from E/m copies. The m slices of one copy sum to the dense output, so the
layer starts as the dense FFN when a token's gates on them are all 1 (e.g. k = m with ``routed_scaling = m`` at a
uniform router); otherwise it starts close to it and training adapts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.experts import StackedExperts, read_ffn
from zoo.moe.layer import MoELayer


def upcycle(ffn: nn.Module, num_experts: int = 4, top_k: int = 2, granularity: int = 1, expert_noise: float = 0.0,
            activation: str | None = None, generator: torch.Generator | None = None, **overrides: Any) -> MoELayer:
    """A `MoELayer` whose experts are copies (or slices) of the dense FFN module ``ffn``.

    ``ffn``: any FFN `zoo.moe.read_ffn` reads (Llama/Mistral/Qwen2 SwiGLU MLPs, Phi/GPT-2/CLIP GELU MLPs, ...).
    ``expert_noise``: relative std of Gaussian noise added to each copy (0: exact copies).
    ``overrides``: further `MoEConfig` fields (router, capacity_factor, backend, ...).
    """
    if granularity < 1 or num_experts % granularity:
        raise ValueError(f"granularity: {granularity} must be >= 1 and divide num_experts ({num_experts})")
    dense = read_ffn(ffn, activation)
    pieces = dense.segments(granularity) if granularity > 1 else [dense]
    config = MoEConfig(
        hidden_size=dense.hidden_size, expert_size=dense.intermediate_size // granularity, num_experts=num_experts,
        top_k=top_k, expert_form=dense.form, activation=dense.activation,
        bias=dense.b_in is not None or dense.b_out is not None, **overrides,
    )
    if config.bigmac_rank is not None:
        raise ValueError("bigmac_rank: BigMac experts work at a low width and cannot be upcycled from a dense FFN")
    copies = StackedExperts.from_dense([pieces[e % granularity] for e in range(num_experts)])
    layer = MoELayer(config).to(device=dense.w_in.device, dtype=dense.w_in.dtype)
    with torch.no_grad():
        layer.experts.load_state_dict(copies.state_dict())
        if expert_noise > 0:
            for p in layer.experts.parameters():
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
                p.add_(noise * p.std(dim=tuple(range(1, p.dim())), keepdim=True) * expert_noise)
    return layer
