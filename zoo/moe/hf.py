"""Convert between zoo MoE layers and transformers' sparse MoE blocks, weights copied exactly.

Each supported block class has a `BlockLayout` (`LAYOUTS`, by ``kind``): where it keeps the router, the stacked
experts (``gate_up_proj`` / ``down_proj``, stored ``[E, 2f, d]`` / ``[E, d, f]`` or input-major like the zoo's), the
selection bias and the shared expert, and what its router computes:

| kind | block | routing |
|---|---|---|
| ``mixtral`` | ``MixtralSparseMoeBlock`` | softmax top-k, renormalised |
| ``qwen2_moe`` | ``Qwen2MoeSparseMoeBlock`` | softmax top-k (``norm_topk_prob``), sigmoid-gated shared expert |
| ``deepseek_v3`` | ``DeepseekV3MoE`` | sigmoid + correction bias, group-limited, ``routed_scaling_factor``, shared experts |
| ``qwen3_vl_moe`` | ``Qwen3VLMoeTextSparseMoeBlock`` | softmax top-k, renormalised |
| ``qwen3_omni_moe`` | ``Qwen3OmniMoeThinkerTextSparseMoeBlock`` | softmax top-k (``norm_topk_prob``) |
| ``qwen3_omni_moe_talker`` | ``Qwen3OmniMoeTalkerTextSparseMoeBlock`` | as ``qwen2_moe`` |
| ``glm4v_moe`` | ``Glm4vMoeTextMoE`` | as ``deepseek_v3`` |
| ``aria`` | ``AriaTextMoELayer`` | softmax over the top-k logits (= renormalised top-k), shared experts |
| ``llama4`` | ``Llama4TextMoe`` | sigmoid top-k of the logits gating the expert's *input*, a shared expert |
| ``ernie4_5_vl_moe`` | ``Ernie4_5_VLMoeMoeBlock`` | text and vision experts apart (`ModalitySeparatedMoE`), each softmax + bias top-k renormalised, shared experts |

On the same input the zoo layer gives the block's output (fp32: max abs diff ~1e-7) and chooses the same experts.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.experts import activation_name, read_ffn
from zoo.moe.layer import MoELayer
from zoo.moe.modality import ModalitySeparatedMoE

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _softmax(block: nn.Module, router: nn.Module) -> dict:
    return {"router": "softmax_topk", "renormalize": bool(getattr(router, "norm_topk_prob", True)),
            "balance_loss": "mixtral"}


def _sigmoid_groups(block: nn.Module, router: nn.Module) -> dict:
    return {"router": "sigmoid_bias", "num_groups": int(router.num_group), "topk_groups": int(router.topk_group),
            "renormalize": bool(router.norm_topk_prob), "routed_scaling": float(router.routed_scaling_factor),
            "balance_loss": None}


def _group_config(cfg: MoEConfig) -> dict:
    return {"moe_intermediate_size": cfg.expert_size, "n_routed_experts": cfg.num_experts,
            "n_shared_experts": cfg.shared_width // cfg.expert_size, "n_group": cfg.num_groups,
            "topk_group": cfg.topk_groups, "norm_topk_prob": cfg.renormalize, "routed_scaling_factor": cfg.routed_scaling}


@dataclass(frozen=True)
class BlockLayout:
    """Where one transformers MoE block class keeps a zoo `MoELayer`'s weights, and what its router computes.

    ``routing(block, router)`` gives the `MoEConfig` routing fields of a block; ``hf_config(cfg)`` the config fields
    that build the block for a layer config; ``router`` / ``bias`` / ``shared`` / ``shared_gate`` name the router
    module, the selection bias under it, the shared FFN and its gate; ``transposed`` experts are input-major.
    ``requires`` lists ``(field, test, why)`` checks of what the block can express beyond the common ones.
    """

    kind: str
    module: str
    block: str
    config: str
    routing: Callable[[nn.Module, nn.Module], dict]
    hf_config: Callable[[MoEConfig], dict]
    router: str = "gate"
    bias: str | None = None
    transposed: bool = False
    shared: str | None = None
    shared_gate: str | None = None
    requires: tuple[tuple[str, Callable[[MoEConfig], bool], str], ...] = field(default_factory=tuple)

    def widths(self, experts: nn.Module) -> tuple[int, int]:
        """``(hidden size d, expert width f)`` of a block's stacked experts."""
        down = experts.down_proj.shape  # [E, f, d] input-major, else [E, d, f]
        return (down[2], down[1]) if self.transposed else (down[1], down[2])

    def block_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(f"transformers.models.{self.module}"), self.block)

    def config_class(self) -> type:
        return getattr(importlib.import_module(f"transformers.models.{self.module}"), self.config)


_RENORMALISED = (("renormalize", lambda c: c.renormalize, "the block always renormalises the top-k gates"),)
_NO_SHARED = (("num_shared", lambda c: not c.shared_width, "the block has no shared expert"),)
_GATED_SHARED = (("shared_gate", lambda c: c.shared_width > 0 and c.shared_gate, "the block has a gated shared expert"),)
_GROUPED = (("router", lambda c: c.router == "sigmoid_bias", "the block routes by sigmoid + bias (sigmoid_bias)"),
            ("shared_size", lambda c: c.shared_width > 0 and c.shared_width % c.expert_size == 0 and not c.shared_gate,
             "the block needs ungated shared experts of width n * expert_size"))
_SOFTMAX = (("router", lambda c: c.router == "softmax_topk", "the block routes by softmax top-k"),)

LAYOUTS: dict[str, BlockLayout] = {layout.kind: layout for layout in (
    BlockLayout("mixtral", "mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "MixtralConfig", _softmax,
                lambda c: {"intermediate_size": c.expert_size, "num_local_experts": c.num_experts,
                           "router_jitter_noise": 0.0},
                requires=_SOFTMAX + _RENORMALISED + _NO_SHARED),
    BlockLayout("qwen2_moe", "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig", _softmax,
                lambda c: {"moe_intermediate_size": c.expert_size, "num_experts": c.num_experts,
                           "shared_expert_intermediate_size": c.shared_width, "norm_topk_prob": c.renormalize},
                shared="shared_expert", shared_gate="shared_expert_gate", requires=_SOFTMAX + _GATED_SHARED),
    BlockLayout("deepseek_v3", "deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
                _sigmoid_groups, _group_config, bias="e_score_correction_bias", shared="shared_experts",
                requires=_GROUPED),
    BlockLayout("glm4v_moe", "glm4v_moe.modeling_glm4v_moe", "Glm4vMoeTextMoE", "Glm4vMoeTextConfig", _sigmoid_groups,
                _group_config, bias="e_score_correction_bias", shared="shared_experts", requires=_GROUPED),
    BlockLayout("qwen3_vl_moe", "qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock",
                "Qwen3VLMoeTextConfig", _softmax,
                lambda c: {"moe_intermediate_size": c.expert_size, "num_experts": c.num_experts},
                requires=_SOFTMAX + _RENORMALISED + _NO_SHARED),
    BlockLayout("qwen3_omni_moe", "qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock",
                "Qwen3OmniMoeTextConfig", _softmax,
                lambda c: {"moe_intermediate_size": c.expert_size, "num_experts": c.num_experts,
                           "norm_topk_prob": c.renormalize},
                requires=_SOFTMAX + _NO_SHARED),
    BlockLayout("qwen3_omni_moe_talker", "qwen3_omni_moe.modeling_qwen3_omni_moe",
                "Qwen3OmniMoeTalkerTextSparseMoeBlock", "Qwen3OmniMoeTalkerTextConfig", _softmax,
                lambda c: {"moe_intermediate_size": c.expert_size, "num_experts": c.num_experts,
                           "shared_expert_intermediate_size": c.shared_width, "norm_topk_prob": c.renormalize},
                shared="shared_expert", shared_gate="shared_expert_gate", requires=_SOFTMAX + _GATED_SHARED),
    BlockLayout("aria", "aria.modeling_aria", "AriaTextMoELayer", "AriaTextConfig", _softmax,
                lambda c: {"intermediate_size": c.expert_size, "moe_num_experts": c.num_experts, "moe_topk": c.top_k,
                           "moe_num_shared_experts": c.shared_width // c.expert_size},
                router="router", transposed=True, shared="shared_experts",
                requires=_SOFTMAX + _RENORMALISED + (
                    ("activation", lambda c: c.activation == "silu", "Aria's routed experts are silu"),
                    ("shared_size", lambda c: c.shared_width > 0 and c.shared_width % c.expert_size == 0
                     and not c.shared_gate, "Aria needs ungated shared experts of width n * expert_size"))),
    BlockLayout("llama4", "llama4.modeling_llama4", "Llama4TextMoe", "Llama4TextConfig",
                lambda block, router: {"router": "sigmoid_topk", "renormalize": False, "gate_input": True,
                                       "balance_loss": "mixtral"},
                lambda c: {"intermediate_size": c.expert_size, "num_local_experts": c.num_experts},
                router="router", transposed=True, shared="shared_expert",
                requires=(("router", lambda c: c.router == "sigmoid_topk" and not c.renormalize and c.gate_input,
                           "Llama 4 gates the expert input by raw sigmoid top-k (sigmoid_topk, gate_input)"),
                          ("shared_size", lambda c: c.shared_width == c.expert_size and not c.shared_gate,
                           "Llama 4 has one ungated shared expert of the experts' width"))),
    BlockLayout("ernie4_5_vl_moe_half", "ernie4_5_vl_moe.modeling_ernie4_5_vl_moe", "Ernie4_5_VLMoeSparseMoeBlock",
                "Ernie4_5_VLMoeTextConfig",
                lambda block, router: {"router": "softmax_bias", "renormalize": True, "balance_loss": "mixtral"},
                lambda c: {}, bias="moe_statics.e_score_correction_bias",
                requires=(("router", lambda c: c.router == "softmax_bias" and c.renormalize and c.num_groups == 1,
                           "ERNIE routes by softmax + bias, renormalised, one group"),) + _NO_SHARED),
)}
ERNIE = "ernie4_5_vl_moe"
KINDS = (*(k for k in LAYOUTS if k != "ernie4_5_vl_moe_half"), ERNIE)
_BY_CLASS = {layout.block: layout for layout in LAYOUTS.values()}


def _require(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {why}")


def block_kind(block: nn.Module) -> str | None:
    """The `KINDS` name of a transformers MoE block (None when the zoo does not convert its class)."""
    name = type(block).__name__
    if name == "Ernie4_5_VLMoeMoeBlock":
        return ERNIE
    layout = _BY_CLASS.get(name)
    return layout.kind if layout is not None and layout.kind in KINDS else None


def zoo_state(layout: BlockLayout, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A `MoELayer` state dict from a block's state dict (keys under ``prefix``); views, not copies."""
    def get(key: str) -> torch.Tensor:
        return state[prefix + key]

    w_in, w_out = get("experts.gate_up_proj"), get("experts.down_proj")
    if not layout.transposed:  # transformers stores [E, out, in]
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    out = {"experts.w_in": w_in, "experts.w_out": w_out, "router.weight": get(f"{layout.router}.weight")}
    if layout.bias:
        out["router.bias"] = get(f"{layout.router}.{layout.bias}").reshape(-1)
    if layout.shared:
        out.update({f"shared.{p}.weight": get(f"{layout.shared}.{p}.weight") for p in PROJECTIONS})
    if layout.shared_gate:
        out["shared_gate.weight"] = get(f"{layout.shared_gate}.weight")
    return out


def transformers_state(layout: BlockLayout, state: dict[str, torch.Tensor], prefix: str = "",
                       shapes: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """The block's state dict (keys under ``prefix``) from a `MoELayer` state dict; views, not copies. ``shapes``:
    the block's own tensor shapes (a selection bias stored with an extra axis takes its shape)."""
    w_in, w_out = state["experts.w_in"], state["experts.w_out"]
    if not layout.transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    out = {"experts.gate_up_proj": w_in, "experts.down_proj": w_out, f"{layout.router}.weight": state["router.weight"]}
    if layout.bias:
        key = f"{layout.router}.{layout.bias}"
        out[key] = state["router.bias"].reshape(shapes[prefix + key]) if shapes else state["router.bias"]
    if layout.shared:
        out.update({f"{layout.shared}.{p}.weight": state[f"shared.{p}.weight"] for p in PROJECTIONS})
    if layout.shared_gate:
        out[f"{layout.shared_gate}.weight"] = state["shared_gate.weight"]
    return {prefix + k: v for k, v in out.items()}


def _layer_config(layout: BlockLayout, block: nn.Module, backend: str) -> MoEConfig:
    """The `MoEConfig` of a block: widths from its tensors, routing from its router."""
    experts, router = block.experts, getattr(block, layout.router)
    if not getattr(experts, "is_concatenated", True) or getattr(experts, "has_bias", False):
        raise ValueError(f"{type(experts).__name__}: interleaved or biased expert weights are not supported")
    num_experts, hidden, expert_size = experts.gate_up_proj.shape[0], *layout.widths(experts)
    activation = activation_name(experts.act_fn)
    shared = read_ffn(getattr(block, layout.shared)) if layout.shared else None
    if shared is not None and shared.activation != activation:
        raise ValueError(f"{type(block).__name__}: shared experts use {shared.activation!r} but the routed experts "
                         f"{activation!r}; a MoELayer has one activation")
    return MoEConfig(hidden_size=hidden, expert_size=expert_size, num_experts=num_experts, top_k=int(router.top_k),
                     activation=activation, num_shared=int(shared is not None),
                     shared_size=shared.intermediate_size if shared is not None else None,
                     shared_gate=layout.shared_gate is not None, backend=backend, z_loss=False,
                     **layout.routing(block, router))


def _convert(layout: BlockLayout, block: nn.Module, backend: str, prefix: str = "",
             state: dict | None = None) -> MoELayer:
    sub = block if not prefix else block.get_submodule(prefix.rstrip("."))
    config = _layer_config(layout, sub, backend)
    ref = sub.experts.gate_up_proj
    with torch.device(ref.device):  # on the meta device too: a real-size model is counted without memory
        layer = MoELayer(config).to(dtype=ref.dtype)
    with torch.no_grad():
        layer.load_state_dict(zoo_state(layout, state if state is not None else block.state_dict(), prefix))
    return layer


def from_transformers(block: nn.Module, backend: str = "grouped") -> MoELayer | ModalitySeparatedMoE:
    """A zoo layer equal to a transformers MoE block of one of the `KINDS` (weights copied): a `MoELayer`, or for
    ERNIE's text/vision block a `ModalitySeparatedMoE`."""
    name = type(block).__name__
    kind = block_kind(block)
    if kind is None:
        raise ValueError(f"{name}: not a transformers sparse MoE block the zoo converts; supported: "
                         f"{', '.join(sorted({LAYOUTS[k].block for k in KINDS if k in LAYOUTS}))}, "
                         "Ernie4_5_VLMoeMoeBlock")
    if getattr(block, "jitter_noise", 0):
        log.warning("%s: router jitter noise %s is not reproduced by the zoo layer", name, block.jitter_noise)
    if kind != ERNIE:
        return _convert(LAYOUTS[kind], block, backend)
    half = LAYOUTS["ernie4_5_vl_moe_half"]
    state = block.state_dict()
    text, image = _convert(half, block, backend, "text_moe.", state), _convert(half, block, backend, "vision_moe.", state)
    shared = block.shared_experts
    width = shared.down_proj.in_features if shared is not None else 0
    with torch.device(text.experts.w_in.device):
        layer = ModalitySeparatedMoE(text.config, image.config, width)
    layer = layer.to(dtype=text.experts.w_in.dtype)
    with torch.no_grad():
        layer.text.load_state_dict(text.state_dict())
        layer.image.load_state_dict(image.state_dict())
        if shared is not None:
            layer.shared.load_state_dict({f"{p}.weight": state[f"shared_experts.{p}.weight"] for p in PROJECTIONS})
    return layer


def _infer_kind(layer: nn.Module) -> str:
    if isinstance(layer, ModalitySeparatedMoE):
        return ERNIE
    config = layer.config
    if config.router == "sigmoid_bias":
        return "deepseek_v3"
    if config.gate_input:
        return "llama4"
    return "qwen2_moe" if config.shared_width else "mixtral"


def check_layout(layout: BlockLayout, cfg: MoEConfig) -> None:
    """Raise ValueError naming the `MoEConfig` field that the block of ``layout`` cannot express."""
    kind = layout.kind
    _require(cfg.expert_form == "swiglu", "expert_form", f"{kind} experts are swiglu, got {cfg.expert_form!r}")
    _require(not cfg.bias, "bias", f"{kind} experts have no biases")
    _require(cfg.bigmac_rank is None, "bigmac_rank", f"{kind} has no BigMac projections")
    _require(cfg.null_experts == 0, "null_experts", f"{kind} has no null experts")
    _require(cfg.capacity_factor is None and cfg.eval_capacity_factor is None, "capacity_factor",
             f"{kind} is dropless")
    _require(cfg.gate_input == (kind == "llama4"), "gate_input", f"{kind} gates the expert "
             f"{'input' if kind == 'llama4' else 'output'}")
    for name, test, why in layout.requires:
        _require(test(cfg), name, f"{kind}: {why}")


_ONE_HEAD = {"num_attention_heads": 1, "num_key_value_heads": 1}  # a block needs none; configs check heads divide d


def _build(block_class: type, config, device: torch.device, copy: bool) -> nn.Module:
    if copy:
        return block_class(config).to(device)
    with torch.device("meta"):  # filled with the layer's own tensors below: no allocation
        return block_class(config)


def _fill(block: nn.Module, state: dict[str, torch.Tensor], copy: bool, dtype: torch.dtype) -> nn.Module:
    if copy:
        block = block.to(dtype)
        with torch.no_grad():
            block.load_state_dict(state)
        return block
    block.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(block).__name__}: tensors {left} are not filled from the zoo layer")
    return block


def to_transformers(layer: MoELayer | ModalitySeparatedMoE, kind: str | None = None,
                    experts_implementation: str = "eager", copy: bool = True) -> nn.Module:
    """The transformers block of ``kind`` (one of `KINDS`; inferred for mixtral / qwen2_moe / deepseek_v3 / llama4 /
    ernie if None) equal to ``layer``. ``copy=False`` gives a block whose tensors are views of the layer's (no
    memory; for writing a checkpoint).

    Raises ValueError naming the config field that the block cannot express (BigMac, null experts, biases, ...).
    """
    kind = kind or _infer_kind(layer)
    _require(kind in KINDS, "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    _require(isinstance(layer, ModalitySeparatedMoE) == (kind == ERNIE), "kind",
             f"{kind} does not hold a {type(layer).__name__}")
    if kind == ERNIE:
        return _to_ernie(layer, experts_implementation, copy)
    cfg, layout = layer.config, LAYOUTS[kind]
    check_layout(layout, cfg)
    hf_config = layout.config_class()(hidden_size=cfg.hidden_size, hidden_act=cfg.activation,
                                      num_experts_per_tok=cfg.top_k, **_ONE_HEAD, **layout.hf_config(cfg))
    hf_config._experts_implementation = experts_implementation
    w = layer.experts.w_in
    block = _build(layout.block_class(), hf_config, w.device, copy)
    shapes = {k: v.shape for k, v in block.state_dict().items()}
    return _fill(block, transformers_state(layout, layer.state_dict(), shapes=shapes), copy, w.dtype)


def _to_ernie(layer: ModalitySeparatedMoE, experts_implementation: str, copy: bool) -> nn.Module:
    text, image, half = layer.text.config, layer.image.config, LAYOUTS["ernie4_5_vl_moe_half"]
    for cfg in (text, image):
        check_layout(half, cfg)
    _require(text.num_experts == image.num_experts and text.top_k == image.top_k, "num_experts",
             "ERNIE's text and vision experts share their count and top_k")
    _require(text.activation == image.activation, "activation", "ERNIE's experts share one activation")
    shared = layer.shared.down_proj.in_features if layer.shared is not None else 0
    _require(shared % text.expert_size == 0, "shared_size", "ERNIE's shared experts are n * the text experts' width")
    hf_config = half.config_class()(hidden_size=text.hidden_size, hidden_act=text.activation, **_ONE_HEAD,
                                    moe_intermediate_size=[text.expert_size, image.expert_size],
                                    moe_num_experts=text.num_experts, moe_k=text.top_k,
                                    moe_num_shared_experts=shared // text.expert_size)
    hf_config._experts_implementation = experts_implementation
    w = layer.text.experts.w_in
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock as block_class
    block = _build(block_class, hf_config, w.device, copy)
    shapes = {k: v.shape for k, v in block.state_dict().items()}
    state = {**transformers_state(half, layer.text.state_dict(), "text_moe.", shapes),
             **transformers_state(half, layer.image.state_dict(), "vision_moe.", shapes)}
    if layer.shared is not None:
        state.update({f"shared_experts.{k}": v for k, v in layer.shared.state_dict().items()})
    return _fill(block, state, copy, w.dtype)
