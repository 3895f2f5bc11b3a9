"""Convert between zoo MoE layers and transformers' sparse MoE blocks, weights copied exactly.

Supported blocks (transformers >= 5 layout, experts stacked as ``gate_up_proj [E, 2f, d]`` and
``down_proj [E, d, f]``; per-expert ``ModuleList`` experts of older checkpoints are read too):

- ``MixtralSparseMoeBlock``: softmax top-k, renormalised.
- ``Qwen2MoeSparseMoeBlock``: softmax top-k (``norm_topk_prob``), a shared expert with a sigmoid gate.
- ``DeepseekV3MoE``: sigmoid + correction bias, group-limited top-k, ``routed_scaling_factor``, shared experts.

On the same input the zoo layer gives the block's output (fp32: max abs diff ~1e-7) and the same experts.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.experts import StackedExperts, activation_name, read_ffn
from zoo.moe.layer import MoELayer

log = logging.getLogger(__name__)

KINDS = ("mixtral", "qwen2_moe", "deepseek_v3")


def _stacked_experts(experts: nn.Module) -> StackedExperts:
    """Stacked experts from a transformers experts module (3-D parameters) or a ModuleList of MLPs."""
    if isinstance(experts, nn.ModuleList):
        return StackedExperts.from_modulelist(experts)
    name = type(experts).__name__
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(f"{name}: interleaved gate/up expert weights are not supported")
    transposed = getattr(experts, "is_transposed", False)
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    w_in = experts.gate_up_proj if has_gate else experts.up_proj
    w_out = experts.down_proj
    if not transposed:  # transformers stores [E, out, in]
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    num_experts, hidden, width_in = w_in.shape
    inter = w_out.shape[1]
    bias = bool(getattr(experts, "has_bias", False))
    new = StackedExperts(num_experts, hidden, inter, "swiglu" if has_gate else "mlp",
                         activation_name(experts.act_fn), bias).to(device=w_in.device, dtype=w_in.dtype)
    with torch.no_grad():
        new.w_in.copy_(w_in)
        new.w_out.copy_(w_out)
        if bias:
            new.b_in.copy_(experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)
            new.b_out.copy_(experts.down_proj_bias)
    return new


def from_transformers(block: nn.Module, backend: str = "grouped") -> MoELayer:
    """A `MoELayer` equal to a transformers Mixtral / Qwen2-MoE / DeepSeek-V3 MoE block (weights copied)."""
    name = type(block).__name__
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None:
        raise ValueError(f"{name}: not a transformers sparse MoE block (needs .gate and .experts)")
    stacked = _stacked_experts(experts)
    shared_mod = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    shared = read_ffn(shared_mod) if shared_mod is not None else None
    shared_gate = getattr(block, "shared_expert_gate", None)
    common = dict(
        hidden_size=stacked.hidden_size, expert_size=stacked.intermediate_size, num_experts=stacked.num_experts,
        top_k=int(gate.top_k), expert_form=stacked.form, activation=stacked.activation, bias=stacked.b_in is not None,
        num_shared=1 if shared is not None else 0, shared_size=shared.intermediate_size if shared is not None else None,
        shared_gate=shared_gate is not None, backend=backend, z_loss=False,
    )
    if hasattr(gate, "e_score_correction_bias"):
        config = MoEConfig(router="sigmoid_bias", num_groups=int(gate.num_group), topk_groups=int(gate.topk_group),
                           renormalize=bool(gate.norm_topk_prob), routed_scaling=float(gate.routed_scaling_factor),
                           balance_loss=None, **common)
    else:
        config = MoEConfig(router="softmax_topk", renormalize=bool(getattr(gate, "norm_topk_prob", True)),
                           balance_loss="mixtral", **common)
    if getattr(block, "jitter_noise", 0):
        log.warning("%s: router jitter noise %s is not reproduced by the zoo layer", name, block.jitter_noise)
    layer = MoELayer(config).to(device=stacked.w_in.device, dtype=stacked.w_in.dtype)
    with torch.no_grad():
        layer.experts.load_state_dict(stacked.state_dict())
        layer.router.weight.copy_(gate.weight)
        if hasattr(gate, "e_score_correction_bias"):
            layer.router.bias.copy_(gate.e_score_correction_bias)
        if shared is not None:
            layer.shared.load_dense(shared)
        if shared_gate is not None:
            layer.shared_gate.weight.copy_(shared_gate.weight)
    return layer


def _infer_kind(config: MoEConfig) -> str:
    if config.router == "sigmoid_bias":
        return "deepseek_v3"
    return "qwen2_moe" if config.shared_width else "mixtral"


def _require(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {why}")


def to_transformers(layer: MoELayer, kind: str | None = None, experts_implementation: str = "eager") -> nn.Module:
    """The transformers block (``kind``: mixtral | qwen2_moe | deepseek_v3, inferred if None) equal to ``layer``.

    Raises ValueError naming the config field that the block cannot express (BigMac, null experts, biases, ...).
    """
    cfg = layer.config
    kind = kind or _infer_kind(cfg)
    _require(kind in KINDS, "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    _require(cfg.expert_form == "swiglu", "expert_form", f"{kind} experts are swiglu, got {cfg.expert_form!r}")
    _require(not cfg.bias, "bias", f"{kind} experts have no biases")
    _require(cfg.bigmac_rank is None, "bigmac_rank", f"{kind} has no BigMac projections")
    _require(cfg.null_experts == 0, "null_experts", f"{kind} has no null experts")
    _require(cfg.capacity_factor is None and cfg.eval_capacity_factor is None, "capacity_factor",
             f"{kind} is dropless")
    common = dict(hidden_size=cfg.hidden_size, hidden_act=cfg.activation, num_experts_per_tok=cfg.top_k)
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        _require(cfg.router == "softmax_topk" and cfg.renormalize, "router", "mixtral needs renormalised softmax_topk")
        _require(not cfg.shared_width, "num_shared", "mixtral has no shared experts")
        hf_config = MixtralConfig(intermediate_size=cfg.expert_size, num_local_experts=cfg.num_experts,
                                  router_jitter_noise=0.0, **common)
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        _require(cfg.router == "softmax_topk", "router", "qwen2_moe needs softmax_topk")
        _require(cfg.shared_width > 0 and cfg.shared_gate, "shared_gate", "qwen2_moe needs a gated shared expert")
        hf_config = Qwen2MoeConfig(moe_intermediate_size=cfg.expert_size, num_experts=cfg.num_experts,
                                   shared_expert_intermediate_size=cfg.shared_width, norm_topk_prob=cfg.renormalize,
                                   **common)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        _require(cfg.router == "sigmoid_bias", "router", "deepseek_v3 needs sigmoid_bias")
        _require(not cfg.shared_gate, "shared_gate", "deepseek_v3 shared experts are ungated")
        _require(cfg.shared_width % cfg.expert_size == 0 and cfg.shared_width > 0, "shared_size",
                 "deepseek_v3 needs shared experts of width n * expert_size")
        hf_config = DeepseekV3Config(moe_intermediate_size=cfg.expert_size, n_routed_experts=cfg.num_experts,
                                     n_shared_experts=cfg.shared_width // cfg.expert_size, n_group=cfg.num_groups,
                                     topk_group=cfg.topk_groups, norm_topk_prob=cfg.renormalize,
                                     routed_scaling_factor=cfg.routed_scaling, **common)
    hf_config._experts_implementation = experts_implementation
    ref = layer.experts.w_in
    block = Block(hf_config).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(layer.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w_out.transpose(1, 2))
        block.gate.weight.copy_(layer.router.weight)
        if kind == "deepseek_v3":
            block.gate.e_score_correction_bias.copy_(layer.router.bias)
        if layer.shared is not None:
            shared = block.shared_expert if kind == "qwen2_moe" else block.shared_experts
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(shared, name).weight.copy_(getattr(layer.shared, name).weight)
        if layer.shared_gate is not None:
            block.shared_expert_gate.weight.copy_(layer.shared_gate.weight)
    return block
