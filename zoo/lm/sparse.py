"""Sparse language models by policy: chosen decoder layers' FFNs become `zoo.moe` layers, in place.

Any transformers causal LM whose decoder layers keep their FFN in ``.mlp`` works (Llama, Mistral, Qwen2, Qwen3,
Phi, Phi-3, StableLM, Gemma, ...): `sparsify` replaces ``layers[i].mlp`` by a `SparseFFN` that wraps a `MoELayer`
(or a `ModalityMoELayer` for MoIIE). The transformers model file is untouched, so it keeps working across releases.

The VLM passes the modality mask (image-token positions from its splice step) and the padding mask to every sparse
layer through `SparseContext`; each layer keeps its last aux losses and routing statistics, which `ZooModel`
gathers into its output (`gather_aux_losses`, `gather_routing_stats`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from zoo.config import ConfigError, SparsityConfig, from_dict
from zoo.moe.config import MoEConfig
from zoo.moe.experts import read_ffn
from zoo.moe.layer import MoELayer, MoEOutput, RoutingStats
from zoo.moe.modality import ModalityMoELayer, modality_groups
from zoo.moe.upcycle import upcycle


@dataclass
class SparseContext:
    """Masks for the current LM call, shared by all sparse layers of one model: ``modality`` (True at image tokens)
    and ``padding`` (True at real tokens), both ``[B, T]``. Layers use them when the shapes match their input."""

    modality: torch.Tensor | None = None
    padding: torch.Tensor | None = None


class SparseFFN(nn.Module):
    """Drop-in replacement of a decoder layer's FFN: ``forward(hidden_states) -> hidden_states``.

    Reads the masks from the shared `SparseContext` and keeps the last `MoEOutput` in ``last`` (aux losses and
    routing statistics, no hooks).
    """

    def __init__(self, moe: MoELayer | ModalityMoELayer, context: SparseContext, name: str):
        super().__init__()
        self.moe = moe
        self.context = context
        self.name = name
        self.last: MoEOutput | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape[:-1]
        ctx = self.context
        modality = ctx.modality if ctx.modality is not None and ctx.modality.shape == shape else None
        padding = ctx.padding if ctx.padding is not None and ctx.padding.shape == shape else None
        if isinstance(self.moe, ModalityMoELayer):
            if modality is None and ctx.modality is not None:
                raise ValueError(f"{self.name}: modality mask of shape {tuple(ctx.modality.shape)} does not match "
                                 f"the tokens {tuple(shape)}")
            self.last = self.moe(hidden_states, modality, padding_mask=padding)
        else:
            self.last = self.moe(hidden_states, padding_mask=padding, modality=modality)
        return self.last.output


def decoder_layers(lm: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The block list of a transformer: the first ModuleList (or Sequential, as timm's ViT ``blocks``) whose items
    all have an ``.mlp`` -- a causal LM's decoder layers, a vision tower's encoder blocks."""
    for module in lm.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(f"{type(lm).__name__}: no list of transformer blocks with .mlp modules; it cannot be sparsified")


def select_layers(rule: str | list[int], num_layers: int, path: str = "lm.sparsity") -> list[int]:
    """Layer indices of a ``layers`` rule (see `SparsityConfig`); errors name ``<path>.layers``."""
    if isinstance(rule, list):
        bad = [i for i in rule if not -num_layers <= i < num_layers]
        if bad:
            raise ConfigError(f"{path}.layers: index {bad[0]} out of range for a {num_layers}-layer model")
        return sorted({i % num_layers for i in rule})
    rules = {
        "every_other_even": range(0, num_layers, 2), "every_other_odd": range(1, num_layers, 2),
        "first_half": range(num_layers // 2), "second_half": range(num_layers // 2, num_layers),
        "all": range(num_layers), "all_but_first": range(1, num_layers),
    }
    if rule not in rules:
        raise ConfigError(f"{path}.layers: unknown rule {rule!r}; known: {', '.join(rules)}")
    return list(rules[rule])


def moe_config(policy: SparsityConfig, dense: nn.Module, path: str = "lm.sparsity") -> MoEConfig:
    """The `MoEConfig` of one layer: the policy's ``moe`` fields plus widths, form and activation of the dense FFN."""
    ffn = read_ffn(dense)
    hidden_size = ffn.hidden_size
    m = policy.granularity
    if ffn.intermediate_size % m:
        raise ConfigError(f"{path}.granularity: {m} does not divide the FFN width {ffn.intermediate_size}")
    ratio = policy.expert_ratio if policy.expert_ratio is not None else 1.0 / m
    fields = dict(hidden_size=hidden_size, expert_size=max(1, round(ffn.intermediate_size * ratio)),
                  expert_form=ffn.form, activation=ffn.activation, bias=ffn.b_in is not None)
    if policy.bigmac_ratio is not None:
        fields["bigmac_rank"] = max(1, round(hidden_size * policy.bigmac_ratio))
    fields.update(policy.moe)
    if "num_shared" in policy.moe and "shared_size" not in policy.moe:
        fields["shared_size"] = policy.moe["num_shared"] * fields["expert_size"]
    return from_dict(MoEConfig, fields, path=f"{path}.moe")


def _build_layer(policy: SparsityConfig, dense: nn.Module, cfg: MoEConfig) -> nn.Module:
    """A sparse layer initialised from the dense FFN as the policy says."""
    overrides = {k: v for k, v in copy.deepcopy(cfg.__dict__).items()
                 if k not in ("hidden_size", "expert_size", "expert_form", "activation", "bias")}
    if policy.modality_routing:
        groups = modality_groups(cfg.num_experts, policy.image_only_experts, policy.text_only_experts)
        layer = ModalityMoELayer(cfg, groups)
        if policy.init != "random":
            source = upcycle(dense, granularity=policy.granularity if policy.init == "fine_grained_split" else 1,
                             expert_noise=policy.noise if policy.init == "upcycle_noise" else 0.0, **overrides)
            layer.experts.load_state_dict(source.experts.state_dict())
        return layer
    if policy.init == "random":
        return MoELayer(cfg)
    granularity = policy.granularity if policy.init == "fine_grained_split" else 1
    layer = upcycle(dense, granularity=granularity, expert_noise=policy.noise if policy.init == "upcycle_noise" else 0.0,
                    **overrides)
    if layer.shared is not None and granularity > 1:  # shared experts start as the first slices of the dense FFN
        pieces = read_ffn(dense).segments(granularity)
        n = cfg.shared_width // cfg.expert_size
        if n * cfg.expert_size == cfg.shared_width and n <= granularity:
            from zoo.moe.experts import DenseFFN

            f = cfg.expert_size
            w_in = torch.cat([torch.cat([p.w_in[:, :f] for p in pieces[:n]], 1),
                              torch.cat([p.w_in[:, f:] for p in pieces[:n]], 1)], 1) if cfg.expert_form == "swiglu" \
                else torch.cat([p.w_in for p in pieces[:n]], 1)
            layer.shared.load_dense(DenseFFN(cfg.expert_form, cfg.activation, w_in,
                                             torch.cat([p.w_out for p in pieces[:n]], 0)))
    return layer


def sparsify(lm: nn.Module, policy: SparsityConfig, context: SparseContext | None = None, path: str = "lm.sparsity",
             name: str = "lm", reachable: int | None = None) -> dict[int, SparseFFN]:
    """Replace the FFN of the policy's layers by sparse layers, in place; returns {layer index: SparseFFN}.

    ``lm``: a causal LM, or any transformer with a block list (`decoder_layers`) such as a vision tower. Errors
    name ``path`` (the policy's config field); the layers are named ``<name>.layers.<i>`` in routing statistics.
    ``reachable``: only the first that many blocks affect the output (a vision tower read at an inner layer); a
    rule such as ``all`` selects among them, and an explicit index past them is an error.
    """
    layers = decoder_layers(lm)
    context = context or getattr(lm, "zoo_sparse_context", None) or SparseContext()
    chosen = select_layers(policy.layers, len(layers), path)
    if reachable is not None:
        if isinstance(policy.layers, list) and max(chosen, default=-1) >= reachable:
            raise ConfigError(f"{path}.layers: block {max(chosen)} never affects the output (only the first "
                              f"{reachable} blocks feed the features)")
        chosen = [i for i in chosen if i < reachable]
    valid_losses = _loss_names(policy)
    unknown = sorted(set(policy.coefficients) - valid_losses)
    if unknown:
        raise ConfigError(f"{path}.coefficients.{unknown[0]}: no such aux loss; this policy gives "
                          f"{', '.join(sorted(valid_losses)) or 'none'}")
    out = {}
    for i in chosen:
        dense = layers[i].mlp
        if isinstance(dense, SparseFFN):
            raise ValueError(f"{path}: layer {i} is already sparse")
        cfg = moe_config(policy, dense, path)
        param = next(dense.parameters())
        layer = _build_layer(policy, dense, cfg).to(device=param.device, dtype=param.dtype)
        layers[i].mlp = SparseFFN(layer, context, name=f"{name}.layers.{i}")
        out[i] = layers[i].mlp
    lm.zoo_sparse_context = context
    return out


def _loss_names(policy: SparsityConfig) -> set[str]:
    cfg = from_dict(MoEConfig, dict(policy.moe))
    names = set()
    if cfg.balance_loss:
        names.add("balance")
    if cfg.device_groups > 1:
        names.add("device_balance")
    if cfg.z_loss:
        names.add("z_loss")
    if policy.modality_routing:
        names = {f"{n}_{m}" for n in names for m in ("image", "text")}
    return names


def sparse_layers(model: nn.Module) -> dict[str, SparseFFN]:
    """All `SparseFFN` modules of a model, by their layer name (``lm.layers.{i}``)."""
    return {m.name: m for m in model.modules() if isinstance(m, SparseFFN)}


def gather_aux_losses(model: nn.Module, reduce: str = "sum") -> dict[str, torch.Tensor]:
    """Aux losses of the last forward by name (``balance``, ...), unscaled, summed (``reduce="sum"``, MoE-LLaVA) or
    averaged (``"mean"``, CuMo) over the sparse layers that gave one."""
    values: dict[str, list[torch.Tensor]] = {}
    for layer in sparse_layers(model).values():
        if layer.last is None:
            continue
        for name, value in layer.last.aux_losses.items():
            values.setdefault(name, []).append(value)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"layer_losses: expected 'sum' or 'mean', got {reduce!r}")
    return {name: torch.stack(v).sum() if reduce == "sum" else torch.stack(v).mean() for name, v in values.items()}


def gather_routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Routing statistics of the last forward per sparse layer (``lm.layers.{i}``), split by modality when known."""
    return {name: layer.last.stats for name, layer in sparse_layers(model).items() if layer.last is not None}


def modality_mask(image_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                  last_image_token_as_text: bool) -> torch.Tensor:
    """The modality mask sparse layers route by: image positions, optionally without the last token of each image
    block (MoIIE: that position predicts the first text token, so it is routed as text)."""
    mask = image_mask.bool()
    if last_image_token_as_text:
        following = torch.zeros_like(mask)
        following[:, :-1] = mask[:, 1:]
        mask = mask & following
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


@contextlib.contextmanager
def sparse_context(lm: nn.Module, modality: torch.Tensor | None, padding: torch.Tensor | None):
    """Set the masks of an LM's sparse layers for the duration of one call (no-op for a dense LM)."""
    ctx: SparseContext | None = getattr(lm, "zoo_sparse_context", None)
    if ctx is None:
        yield
        return
    previous = (ctx.modality, ctx.padding)
    ctx.modality, ctx.padding = modality, padding
    try:
        yield
    finally:
        ctx.modality, ctx.padding = previous


def recompute_context_fn(lm: nn.Module):
    """A ``context_fn`` for ``torch.utils.checkpoint`` (and torch's composable ``checkpoint``): activation
    checkpointing runs a layer again in the backward pass, after the call that set the per-call contexts of the
    LM's sparse and LoRA layers (masks, task tags) has ended; the recomputation gets the values the forward saw."""

    def contexts() -> list:
        return [c for c in (getattr(lm, "zoo_sparse_context", None), getattr(lm, "zoo_lora_context", None))
                if c is not None]

    def context_fn():
        seen = [(ctx, dict(vars(ctx))) for ctx in contexts()]

        @contextlib.contextmanager
        def recompute():
            current = [(ctx, dict(vars(ctx))) for ctx, _ in seen]
            for ctx, values in seen:
                vars(ctx).update(values)
            try:
                yield
            finally:
                for ctx, values in current:
                    vars(ctx).update(values)

        return contextlib.nullcontext(), recompute()

    return context_fn
