"""CuMo's MLP-MoE connector (Li et al., arXiv 2405.05949), kind ``moe_mlp``: top-k over copies of LLaVA's MLP.

Per token ``x`` (width C): router logits ``h = W_r x`` (no bias), ``p = softmax(h)`` in fp32, the top-k experts
with weights ``p_top / sum p_top``, and ``y = sum_k w_k MLP_k(x)``, each ``MLP_k`` being ``mlp2x_gelu``
(``Linear(C, d) -> GELU -> Linear(d, d)``, with bias). Aux losses, unscaled:

* ``balance``: ``E^2 * mean_{b,e}(P_be * f_be)`` with ``P_be`` the mean router probability of expert e over image b's
  tokens and ``f_be`` the fraction of them whose first choice is e (`zoo.moe.losses.sequence_switch_balance`; per
  image, then averaged -- the released code's ``density_1_proxy * density_1``; ``balance_loss:
  switch_per_sequence``, the default). ``balance_loss: switch`` computes it over all tokens of the batch at once.
* ``z_loss``: ``mean_tokens logsumexp(h)^2`` (`zoo.moe.losses.z_loss`).

CuMo's coefficients are ``default_coefficients`` (balance 0.1, z-loss 0.01). Co-upcycling (`upcycle_connector`)
turns a trained dense ``mlp`` connector into this one: every expert a copy of the MLP, a fresh router; with
renormalised top-k the output then equals the MLP's whatever the routing.

The experts run on zoo.moe: its routers, gate normalisation and dispatch backends (``moe.backend``: ``grouped``
default, ``loop``, ``padded``) over `ProjectorExperts`, a `zoo.moe.StackedExperts` whose input width differs from its
output width. Routing is dropless and batched over all tokens of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from zoo.config import ConfigError, ConnectorConfig, from_dict
from zoo.moe import ROUTERS, ExpertMLP, MoEConfig, StackedExperts
from zoo.moe.dispatch import get_dispatch
from zoo.moe.experts import DenseFFN
from zoo.moe.layer import TokenRouting, combine_weights, routing_losses, routing_stats
from zoo.moe.routing import Routing

from .base import CONNECTORS, ConnectorOutput
from .compress import connector_options
from .mlp import MLPProjector

# MoEConfig fields a moe_mlp connector reads from ``connector.moe``, with CuMo's values where they differ from
# MoEConfig's defaults. Widths come from the vision tower and the LM; the expert form is fixed (mlp2x_gelu).
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 4, "top_k": 2, "router": "softmax_topk", "renormalize": True, "router_init_std": 0.02,
    "backend": "grouped", "balance_loss": "switch_per_sequence", "z_loss": True,
}
TOPK_ROUTERS = ("softmax_topk", "noisy_topk", "sigmoid_bias")  # one first choice per token (the balance loss's f)


class ProjectorExperts(StackedExperts):
    """E copies of LLaVA's ``mlp2x_gelu`` stacked: ``w_in [E, in_size, d]``, ``w_out [E, d, d]`` (+ biases).

    `zoo.moe.StackedExperts` maps d -> f -> d; here the input width ``in_size`` differs from the output width
    ``hidden_size`` = d (the width the zoo.moe dispatch backends allocate). Its compute paths read the widths from
    the tensors and are used unchanged.
    """

    def __init__(self, num_experts: int, in_size: int, out_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__(num_experts, out_size, out_size, "mlp", activation, bias)
        self.in_size = in_size
        self.w_in = nn.Parameter(torch.empty(num_experts, in_size, out_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_size={self.in_size}, out_size={self.hidden_size}, "
                f"activation={self.activation}, bias={self.b_in is not None}")

    def to_modulelist(self) -> nn.ModuleList:
        """The experts as a ModuleList of `zoo.moe.ExpertMLP` (``fc1: in -> d``, ``fc2: d -> d``; copies)."""
        mods = nn.ModuleList()
        for e in range(self.num_experts):
            mlp = ExpertMLP(self.in_size, self.hidden_size, "mlp", self.activation, self.b_in is not None,
                            out_size=self.hidden_size)
            mods.append(mlp.to(device=self.w_in.device, dtype=self.w_in.dtype).load_dense(self.expert(e)))
        return mods

    @classmethod
    def from_dense(cls, ffns: list[DenseFFN]) -> ProjectorExperts:
        """Stack ``mlp``-form dense FFNs (``w_in [in, d]``, ``w_out [d, d]``) of one shape and activation (copies)."""
        first = ffns[0]
        for i, ffn in enumerate(ffns):
            if (ffn.form, ffn.activation) != ("mlp", first.activation):
                raise ValueError(f"experts[{i}]: expected an mlp-form {first.activation} FFN, got {ffn.form}/"
                                 f"{ffn.activation}")
        new = cls(len(ffns), first.w_in.shape[0], first.hidden_size, first.activation, first.b_in is not None)
        new.to(device=first.w_in.device, dtype=first.w_in.dtype)
        with torch.no_grad():
            for name in ("w_in", "w_out", "b_in", "b_out"):
                if getattr(new, name) is not None:
                    getattr(new, name).copy_(torch.stack([getattr(ffn, name) for ffn in ffns]))
        return new


def mlp_as_dense(mlp: MLPProjector) -> DenseFFN:
    """A trained ``mlp2x_gelu`` connector as a `zoo.moe.DenseFFN` (``w_in [C, d]``, ``w_out [d, d]``; views)."""
    layers = list(mlp.layers)
    if mlp.config.projector != "mlp2x_gelu" or len(layers) != 3:
        raise ValueError(f"connector.projector: co-upcycling copies an mlp2x_gelu connector, got "
                         f"{mlp.config.projector!r}")
    first, _, second = layers
    bias = lambda layer: None if layer.bias is None else layer.bias.detach()  # noqa: E731
    return DenseFFN("mlp", "gelu", first.weight.detach().t(), second.weight.detach().t(), bias(first), bias(second))


def moe_config(config: ConnectorConfig, in_dim: int, out_dim: int) -> MoEConfig:
    """The `zoo.moe.MoEConfig` of a moe_mlp connector: ``connector.moe`` over `MOE_DEFAULTS`, widths ``in_dim``
    -> ``out_dim``; errors name ``connector.moe.<key>``."""
    unknown = sorted(set(config.moe) - set(MOE_DEFAULTS))
    if unknown:
        raise ConfigError(f"connector.moe.{unknown[0]}: not a setting of the {config.kind} connector (dropless top-k "
                          f"over mlp2x_gelu experts; widths come from the vision tower and the LM); valid keys: "
                          f"{', '.join(MOE_DEFAULTS)}")
    fields = {**MOE_DEFAULTS, **config.moe, "hidden_size": in_dim, "expert_size": out_dim, "expert_form": "mlp",
              "activation": "gelu", "bias": config.bias}
    moe = from_dict(MoEConfig, fields, path="connector.moe")
    if moe.router not in TOPK_ROUTERS:
        raise ConfigError(f"connector.moe.router: expected a top-k router ({', '.join(TOPK_ROUTERS)}), "
                          f"got {moe.router!r}")
    if moe.balance_loss not in ("switch_per_sequence", "switch", None):
        raise ConfigError(f"connector.moe.balance_loss: the {config.kind} connector computes CuMo's per-image "
                          f"Switch loss ('switch_per_sequence'), the batch-wide one ('switch') or none (null), got "
                          f"{moe.balance_loss!r}")
    return moe


@CONNECTORS.register("moe_mlp")
class MoEMLPConnector(nn.Module):
    """CuMo's MLP-MoE connector ``[B, L, in_dim] -> [B, L, out_dim]`` (see the module docstring).

    ``connector.moe``: the `MOE_DEFAULTS` keys (``num_experts`` 4, ``top_k`` 2, ``router``, ``renormalize``,
    ``router_init_std``, ``backend``, ``balance_loss`` ``switch_per_sequence`` | ``switch`` | null, ``z_loss``). ``connector.projector`` must
    be ``mlp2x_gelu``; ``connector.bias`` applies to the experts. No ``options``.
    Output: tokens, aux losses ``balance`` and ``z_loss`` (as configured) and ``routing_stats["connector"]``, a
    `zoo.moe.RoutingStats` (slots per expert, entropy; every token is an image token, none is dropped).
    """

    default_coefficients = {"balance": 0.1, "z_loss": 0.01}  # CuMo's balance_loss_coef, router_z_loss_coef

    def __init__(self, config: ConnectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        connector_options(config, {})
        if config.projector != "mlp2x_gelu":
            raise ConfigError(f"connector.projector: the {config.kind} connector's experts are mlp2x_gelu, got "
                              f"{config.projector!r}")
        self.config = config
        self.moe = moe_config(config, in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.router = ROUTERS.get(self.moe.router, field="connector.moe.router")(self.moe)
        self.experts = ProjectorExperts(self.moe.num_experts, in_dim, out_dim, "gelu", config.bias)
        self.dispatch = get_dispatch(self.moe.backend)

    @classmethod
    def bench_configs(cls) -> dict[str, dict[str, Any]]:
        """The variants `bench/connectors.py` times: CuMo's defaults on the grouped and the loop dispatch."""
        return {"moe_mlp": {"kind": "moe_mlp"}, "moe_mlp (loop dispatch)": {"kind": "moe_mlp", "moe": {"backend": "loop"}}}

    @torch.no_grad()
    def load_mlp(self, mlp: MLPProjector) -> MoEMLPConnector:
        """Co-upcycling: copy a trained ``mlp2x_gelu`` connector into every expert (the router is left as is)."""
        dense = mlp_as_dense(mlp)
        if (dense.w_in.shape[0], dense.hidden_size) != (self.in_dim, self.out_dim):
            raise ValueError(f"connector: the MLP maps {dense.w_in.shape[0]} -> {dense.hidden_size}, the MoE "
                             f"connector {self.in_dim} -> {self.out_dim}")
        copies = ProjectorExperts.from_dense([dense] * self.moe.num_experts)
        self.experts.load_state_dict(copies.state_dict())
        return self

    def aux_losses(self, routing: Routing, batch: int) -> dict[str, torch.Tensor]:
        """Unscaled ``balance`` (per image of the ``batch``, module docstring) and ``z_loss``, as configured."""
        image = torch.arange(routing.num_tokens, device=routing.probs.device) // (routing.num_tokens // max(batch, 1))
        return routing_losses(self.moe, routing, sequence=image)

    def forward(self, tokens: torch.Tensor) -> ConnectorOutput:
        """``[B, L, in_dim]`` -> `ConnectorOutput` with tokens ``[B, L, out_dim]``, aux losses and routing stats."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"connector: {self.config.kind} expects tokens [B, L, {self.in_dim}], got "
                             f"{tuple(tokens.shape)}")
        b, length, _ = tokens.shape
        flat = tokens.reshape(b * length, self.in_dim)
        routing = self.router(flat)
        keep = torch.ones_like(routing.expert, dtype=torch.bool)  # dropless
        weight = combine_weights(routing, keep)
        out = self.experts(flat, routing.token, routing.expert, weight, self.dispatch)
        stats = routing_stats(routing, keep, self.moe.num_experts)
        stats.token_routing = TokenRouting((b, length), routing.token.detach(), routing.expert.detach(),
                                           weight.detach())
        stats.by_modality = {"image": dataclasses.replace(stats)}  # a connector sees image tokens only
        return ConnectorOutput(out.to(tokens.dtype).view(b, length, self.out_dim), self.aux_losses(routing, b),
                               routing_stats={"connector": stats})


def upcycle_connector(mlp: MLPProjector, **moe: Any) -> MoEMLPConnector:
    """CuMo's co-upcycling of a trained dense ``mlp2x_gelu`` connector: a `MoEMLPConnector` whose experts are all
    copies of ``mlp`` and whose router is new. ``moe``: ``connector.moe`` settings (``num_experts``, ``top_k``, ...).

    The result's ``config`` (kind ``moe_mlp``) is the one to record in the model config. With renormalised top-k
    routing its output equals ``mlp``'s for any router weights (up to float rounding of the gates' sum).
    """
    dense = mlp_as_dense(mlp)
    config = dataclasses.replace(mlp.config, kind="moe_mlp", moe={**mlp.config.moe, **moe}, options={})
    connector = MoEMLPConnector(config, dense.w_in.shape[0], dense.hidden_size)
    return connector.to(device=dense.w_in.device, dtype=dense.w_in.dtype).load_mlp(mlp)
