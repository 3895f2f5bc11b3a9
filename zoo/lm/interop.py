"""Sparse LMs to and from other layouts: export to transformers' own MoE models, import MoE-LLaVA checkpoints.

Export (`export_sparse_lm`): a zoo-sparsified LM becomes the transformers MoE model with the same structure and
identical logits (in eval):

- Llama / Mistral with every decoder layer sparse -> ``MixtralForCausalLM`` (renormalised softmax top-k, SwiGLU
  experts without biases, no shared experts; Mixtral cannot hold dense layers);
- Qwen2 with any set of sparse layers -> ``Qwen2MoeForCausalLM`` (dense layers as ``mlp_only_layers``; a zoo layer
  without a shared expert gets a zero-width one, which adds exactly 0).

Transformers' blocks are dropless: a layer whose eval capacity could drop a token cannot be exported (MoE-LLaVA's
eval capacity factor 2.0 with top-2 of 4 experts gives every expert room for all tokens, so it can).

Import (`import_moe_llava_state_dict`): a MoE-LLaVA checkpoint's state dict in its released layout (DeepSpeed-MoE
names: ``<layer>.mlp.deepspeed_moe.gate.wg.weight`` [E, d] and ``<layer>.mlp.deepspeed_moe.experts.
deepspeed_experts.{e}.<FFN names>``; StableLM ``gate_proj/up_proj/down_proj``, Phi ``fc1/fc2``, Qwen ``w1/w2/
c_proj``) into a zoo LM sparsified with the same policy; `export_moe_llava_state_dict` writes Phi and StableLM LMs
back in those names (`moe_layer_to_deepspeed`: one layer as a ``deepspeed.moe.layer.MoE`` module's tensors). The original Qwen layout (``transformer.h.{i}``:
``c_attn`` = q|k|v, ``mlp.w2`` the gate and ``mlp.w1`` the up projection) maps onto transformers' Qwen2 names;
the two agree up to Qwen's long-context tricks (dynamic NTK and logn attention act beyond 2,048 tokens only).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from zoo.lm.sparse import SparseFFN, decoder_layers
from zoo.moe.layer import MoELayer

DEEPSPEED_MOE = "mlp.deepspeed_moe."


# ----------------------------------------------------------------------------------------------------- export

def _sparse_layers(lm: nn.Module) -> dict[int, MoELayer]:
    """The decoder layers whose FFN is a zoo `MoELayer`; a MoIIE (per-modality) layer cannot be exported."""
    out = {}
    for i, layer in enumerate(decoder_layers(lm)):
        if isinstance(layer.mlp, SparseFFN):
            if not isinstance(layer.mlp.moe, MoELayer):
                raise ValueError(f"lm.layers.{i}: {type(layer.mlp.moe).__name__} (routing by modality) has no "
                                 "transformers counterpart")
            out[i] = layer.mlp.moe
    if not out:
        raise ValueError(f"{type(lm).__name__}: no sparse layer to export (apply a lm.sparsity policy first)")
    return out


def _check_exportable(i: int, moe: MoELayer, mixtral: bool) -> None:
    """Raise naming the first config field of layer ``i`` the target (Mixtral, else Qwen2-MoE) cannot express."""
    cfg = moe.config
    checks = [
        (cfg.router == "softmax_topk", "router", f"a softmax top-k router, got {cfg.router!r}"),
        (cfg.renormalize or not mixtral, "renormalize", "renormalised top-k gates (Mixtral)"),
        (cfg.expert_form == "swiglu" and cfg.activation in ("silu", "swish"), "expert_form",
         f"SwiGLU (silu) experts, got {cfg.expert_form}/{cfg.activation}"),
        (not cfg.bias, "bias", "experts without biases"),
        (cfg.bigmac_rank is None, "bigmac_rank", "no BigMac projections"),
        (cfg.null_experts == 0, "null_experts", "no null experts"),
        (cfg.routed_scaling == 1.0, "routed_scaling", "unscaled gates"),
        (not cfg.shared_width or not mixtral, "num_shared", "no shared experts (Mixtral)"),
        (not cfg.shared_width or cfg.shared_gate, "shared_gate", "a sigmoid-gated shared expert (Qwen2-MoE)"),
    ]
    cf = cfg.eval_capacity_factor if cfg.eval_capacity_factor is not None else cfg.capacity_factor
    checks.append((cf is None or cf * cfg.top_k >= cfg.num_experts, "eval_capacity_factor",
                   f"no dropping in eval (transformers is dropless), but {cf} x top_{cfg.top_k} of "
                   f"{cfg.num_experts} experts can drop tokens"))
    for ok, name, why in checks:
        if not ok:
            raise ValueError(f"lm.layers.{i}.moe.{name}: the export needs {why}")


def _copy_common(source: nn.Module, target: nn.Module, sparse: dict[int, MoELayer]) -> None:
    """Copy every non-MoE tensor by name (embeddings, attention, norms, dense FFNs, head); names must match."""
    theirs = target.state_dict()
    skip = tuple(f"model.layers.{i}.mlp." for i in sparse)
    ours = {k: v for k, v in source.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"{type(target).__name__} has no tensor {missing[0]} of the zoo LM")
    with torch.no_grad():
        for name, value in ours.items():
            theirs[name].copy_(value)


def _copy_moe(block: nn.Module, moe: MoELayer) -> None:
    e = moe.experts
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(e.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(e.w_out.transpose(1, 2))
        shared = getattr(block, "shared_expert", None)
        if moe.shared is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(shared, name).weight.copy_(getattr(moe.shared, name).weight)
            block.shared_expert_gate.weight.copy_(moe.shared_gate.weight)


_COMMON_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_dropout",
                "rope_parameters", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range")


def _common_config(config) -> dict:
    return {k: getattr(config, k) for k in _COMMON_KEYS if hasattr(config, k)}


def to_mixtral(lm: nn.Module):
    """A zoo-sparsified Llama / Mistral causal LM (every layer sparse) as a ``MixtralForCausalLM`` with the same
    weights and logits (see the module docstring for what must hold; violations name the config field)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = lm.config
    if cfg.model_type not in ("llama", "mistral"):
        raise ValueError(f"lm.config.model_type: Mixtral export takes llama or mistral, got {cfg.model_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("lm.config.attention_bias: Mixtral's attention and FFNs have no biases")
    sparse = _sparse_layers(lm)
    dense = [i for i in range(cfg.num_hidden_layers) if i not in sparse]
    if dense:
        raise ValueError(f"lm.sparsity.layers: Mixtral has a MoE FFN in every layer; layers {dense} are dense "
                         "(export to Qwen2-MoE holds dense layers)")
    for i, moe in sparse.items():
        _check_exportable(i, moe, mixtral=True)
    first = next(iter(sparse.values())).config
    if len({(m.config.num_experts, m.config.top_k, m.config.expert_size) for m in sparse.values()}) > 1:
        raise ValueError("lm.sparsity.moe: Mixtral needs the same experts, top_k and width in every layer")
    hf = MixtralConfig(**_common_config(cfg), head_dim=getattr(cfg, "head_dim", None),
                       sliding_window=getattr(cfg, "sliding_window", None), intermediate_size=first.expert_size,
                       num_local_experts=first.num_experts, num_experts_per_tok=first.top_k, router_jitter_noise=0.0)
    return _build(MixtralForCausalLM, hf, lm, sparse)


def to_qwen2_moe(lm: nn.Module):
    """A zoo-sparsified Qwen2 causal LM as a ``Qwen2MoeForCausalLM`` with the same weights and logits; dense layers
    become ``mlp_only_layers``. See the module docstring."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = lm.config
    if cfg.model_type != "qwen2":
        raise ValueError(f"lm.config.model_type: Qwen2-MoE export takes qwen2, got {cfg.model_type!r}")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("lm.config.use_sliding_window: not carried over to Qwen2-MoE by the export")
    sparse = _sparse_layers(lm)
    for i, moe in sparse.items():
        _check_exportable(i, moe, mixtral=False)
    shapes = {(m.config.num_experts, m.config.top_k, m.config.expert_size, m.config.shared_width,
               m.config.renormalize) for m in sparse.values()}
    if len(shapes) > 1:
        raise ValueError("lm.sparsity.moe: Qwen2-MoE needs the same experts, top_k, widths and gates in every "
                         "sparse layer")
    num_experts, top_k, width, shared, renorm = shapes.pop()
    hf = Qwen2MoeConfig(**_common_config(cfg), intermediate_size=cfg.intermediate_size, moe_intermediate_size=width,
                        shared_expert_intermediate_size=shared, num_experts=num_experts, num_experts_per_tok=top_k,
                        norm_topk_prob=renorm, decoder_sparse_step=1, qkv_bias=True,
                        mlp_only_layers=[i for i in range(cfg.num_hidden_layers) if i not in sparse])
    return _build(Qwen2MoeForCausalLM, hf, lm, sparse)


def _build(cls, hf_config, lm: nn.Module, sparse: dict[int, MoELayer]):
    ref = next(lm.parameters())
    with warnings.catch_warnings():  # a zero-width shared expert (no shared expert in the zoo layer) has no init
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model = cls(hf_config).to(device=ref.device, dtype=ref.dtype)
    _copy_common(lm, model, sparse)
    layers = decoder_layers(model)
    for i, moe in sparse.items():
        _copy_moe(layers[i].mlp, moe)
    return model.eval()


EXPORTERS = {"llama": to_mixtral, "mistral": to_mixtral, "qwen2": to_qwen2_moe}


def export_sparse_lm(lm: nn.Module):
    """The transformers MoE model equal to a zoo-sparsified LM: Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE."""
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in EXPORTERS:
        raise ValueError(f"lm.config.model_type: no transformers MoE model to export {model_type!r} to; supported: "
                         f"{', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[model_type](lm)


# ----------------------------------------------------------------------------------------------------- import

# Expert FFN tensor names of the MoE-LLaVA families -> (role, position in w_in): gate and up stack as [gate | up]
_EXPERT_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "in", "fc2": "down",
                 "w2": "gate", "w1": "up", "c_proj": "down"}


def qwen_to_qwen2_names(state_dict: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """The original Qwen layout (``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` = q|k|v, ``ln_1``, ...)
    renamed to transformers' Qwen2 names; keys outside ``transformer.`` and ``lm_head`` are kept as they are."""
    out: dict[str, torch.Tensor] = {}
    simple = {"attn.c_proj": "self_attn.o_proj", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
              "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj", "mlp.c_proj": "mlp.down_proj"}
    for key, value in state_dict.items():
        if key.startswith("transformer.wte."):
            out[key.replace("transformer.wte.", "model.embed_tokens.")] = value
        elif key.startswith("transformer.ln_f."):
            out[key.replace("transformer.ln_f.", "model.norm.")] = value
        elif (m := re.match(r"transformer\.h\.(\d+)\.(.+)$", key)) is not None:
            layer, rest = m.groups()
            prefix = f"model.layers.{layer}."
            if rest.startswith("attn.c_attn."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = value.split([value.shape[0] - 2 * _kv_rows(value, num_heads, num_kv_heads)]
                                      + [_kv_rows(value, num_heads, num_kv_heads)] * 2)
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            for old, new in simple.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[prefix + rest] = value
        else:
            out[key] = value
    return out


def _kv_rows(c_attn: torch.Tensor, num_heads: int, num_kv_heads: int | None) -> int:
    """Rows of k (and of v) in a fused q|k|v projection: all heads are full in Qwen-1 (no GQA)."""
    rows = c_attn.shape[0]
    kv = num_kv_heads or num_heads
    return rows * kv // (num_heads + 2 * kv)


def _stack_experts(i: int, experts: dict[int, dict[str, torch.Tensor]], moe: MoELayer) -> dict[str, torch.Tensor]:
    """Per-expert DeepSpeed tensors ``{e: {"fc1.weight": ...}}`` -> the zoo layer's stacked ``w_in``/``w_out``."""
    cfg = moe.config
    found = sorted(experts)
    if found != list(range(cfg.num_experts)):
        raise ValueError(f"layers.{i}.{DEEPSPEED_MOE}experts: experts {found} in the checkpoint, the zoo layer has "
                         f"{cfg.num_experts}")
    w_in, w_out, b_in, b_out = [], [], [], []
    for e in found:
        roles: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in experts[e].items():
            module, kind = name.rsplit(".", 1)
            if module not in _EXPERT_ROLES:
                raise ValueError(f"layers.{i}.{DEEPSPEED_MOE}experts.deepspeed_experts.{e}.{name}: unknown expert "
                                 f"tensor; expected {', '.join(sorted(_EXPERT_ROLES))}")
            roles.setdefault(_EXPERT_ROLES[module], {})[kind] = value
        first = ["gate", "up"] if cfg.expert_form == "swiglu" else ["in"]
        if set(roles) != {*first, "down"}:
            raise ValueError(f"layers.{i}.{DEEPSPEED_MOE}experts.deepspeed_experts.{e}: tensors {sorted(roles)} do "
                             f"not make a {cfg.expert_form} expert")
        w_in.append(torch.cat([roles[r]["weight"].t() for r in first], 1))
        w_out.append(roles["down"]["weight"].t())
        if cfg.bias:
            b_in.append(torch.cat([roles[r]["bias"] for r in first]))
            b_out.append(roles["down"]["bias"])
    out = {"w_in": torch.stack(w_in), "w_out": torch.stack(w_out)}
    if cfg.bias:
        out.update(b_in=torch.stack(b_in), b_out=torch.stack(b_out))
    return out


# MoE-LLaVA's expert FFN names per LM family, in w_in order and then the down projection (the inverse of _EXPERT_ROLES)
MOE_LLAVA_EXPERT_NAMES = {"phi": ("fc1", "fc2"), "stablelm": ("gate_proj", "up_proj", "down_proj")}


def moe_layer_to_deepspeed(moe: MoELayer, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One zoo `MoELayer` as the tensors of a ``deepspeed.moe.layer.MoE`` module (names relative to its
    ``deepspeed_moe``): ``gate.wg.weight`` [E, d] and ``experts.deepspeed_experts.{e}.<names>.weight`` /
    ``.bias`` (nn.Linear layout), ``names`` being the expert FFN's linear layers, the down projection last."""
    cfg, experts = moe.config, moe.experts
    if cfg.router != "softmax_topk" or moe.shared is not None or moe.descend is not None or cfg.null_experts:
        raise ValueError("lm.sparsity.moe: DeepSpeed-MoE holds a softmax top-k router over plain experts (no shared, "
                         "null or BigMac experts)")
    out = {"gate.wg.weight": moe.router.weight.detach().clone()}
    first = names[:-1]
    for e in range(experts.num_experts):
        base = f"experts.deepspeed_experts.{e}."
        for name, w in zip(first, experts.w_in[e].detach().t().chunk(len(first), 0)):
            out[f"{base}{name}.weight"] = w.clone()
        out[f"{base}{names[-1]}.weight"] = experts.w_out[e].detach().t().clone()
        if experts.b_in is not None:
            for name, b in zip(first, experts.b_in[e].detach().chunk(len(first), 0)):
                out[f"{base}{name}.bias"] = b.clone()
            out[f"{base}{names[-1]}.bias"] = experts.b_out[e].detach().clone()
    return out


def export_moe_llava_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The LM tensors of a zoo LM sparsified with MoE-LLaVA's layer (``moe-llava`` preset) in MoE-LLaVA's released
    names: every sparse layer's FFN as DeepSpeed-MoE (``model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight``,
    ``...experts.deepspeed_experts.{e}.fc1.weight`` for Phi, ``gate_proj/up_proj/down_proj`` for StableLM), the rest
    under transformers' names. `import_moe_llava_state_dict` reads it back exactly."""
    family = lm.config.model_type
    if family not in MOE_LLAVA_EXPERT_NAMES:
        raise ValueError(f"lm.config.model_type: MoE-LLaVA releases Phi and StableLM in transformers' names (Qwen in "
                         f"Qwen-1's); no export for {family!r}")
    sparse = {i: layer.mlp.moe for i, layer in enumerate(decoder_layers(lm)) if isinstance(layer.mlp, SparseFFN)}
    if not sparse or any(not isinstance(m, MoELayer) for m in sparse.values()):
        raise ValueError("lm.sparsity: no MoE-LLaVA layer to export (sparsify with a softmax top-k policy first)")
    out = {k: v.detach().clone() for k, v in lm.state_dict().items() if ".mlp.moe." not in k}
    for i, moe in sparse.items():
        for name, value in moe_layer_to_deepspeed(moe, MOE_LLAVA_EXPERT_NAMES[family]).items():
            out[f"model.layers.{i}.{DEEPSPEED_MOE}{name}"] = value
    return out


def import_moe_llava_state_dict(lm: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = ""
                                ) -> dict[str, torch.Tensor]:
    """Load the LM tensors of a MoE-LLaVA checkpoint (released layout, see the module docstring) into ``lm``, a zoo
    LM sparsified with the checkpoint's policy (e.g. the ``moe-llava`` preset). ``prefix``: a prefix to strip from
    every key first. Returns the tensors that are not the LM's (``model.mm_projector.*``, ``model.image_tower.*``)
    for the caller; an LM tensor missing from the checkpoint, or of another shape, is an error naming it."""
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if any(k.startswith("transformer.h.") for k in state):
        state = qwen_to_qwen2_names(state, lm.config.num_attention_heads,
                                    getattr(lm.config, "num_key_value_heads", None))
    sparse = {i: layer.mlp.moe for i, layer in enumerate(decoder_layers(lm)) if isinstance(layer.mlp, SparseFFN)}
    ours = lm.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    rest: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.(.+)$")
    for key, value in state.items():
        m = pattern.match(key)
        if m is None:
            (loaded if key in ours else rest)[key] = value
            continue
        i, tail = int(m.group(1)), m.group(2)
        if i not in sparse:
            raise ValueError(f"{key}: layer {i} is a MoE layer in the checkpoint but dense in the zoo LM (sparse: "
                             f"{sorted(sparse)}); sparsify with the checkpoint's layers")
        if tail == "gate.wg.weight":
            loaded[f"model.layers.{i}.mlp.moe.router.weight"] = value
        elif (e := re.match(r"experts\.deepspeed_experts\.(\d+)\.(.+)$", tail)) is not None:
            experts.setdefault(i, {}).setdefault(int(e.group(1)), {})[e.group(2)] = value
        else:
            raise ValueError(f"{key}: unknown DeepSpeed-MoE tensor (expected gate.wg.weight or "
                             "experts.deepspeed_experts.{e}.*)")
    for i, moe in sparse.items():
        if i not in experts:
            raise ValueError(f"model.layers.{i}.{DEEPSPEED_MOE}experts: missing from the checkpoint, but layer {i} "
                             "of the zoo LM is sparse")
        for name, value in _stack_experts(i, experts[i], moe).items():
            loaded[f"model.layers.{i}.mlp.moe.experts.{name}"] = value
    if getattr(lm.config, "tie_word_embeddings", False):
        loaded.setdefault("lm_head.weight", loaded.get("model.embed_tokens.weight"))
    missing = sorted(k for k in ours if k not in loaded and not k.endswith("router.bias"))
    if missing:
        raise ValueError(f"{missing[0]}: missing from the MoE-LLaVA checkpoint ({len(missing)} LM tensors missing)")
    for key, value in loaded.items():
        if key in ours and tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(ours[key].shape)} in the "
                             "zoo LM")
    lm.load_state_dict({k: v for k, v in loaded.items() if k in ours}, strict=False)
    return rest
