"""`MoEConfig`: one typed record for every sparse layer of the zoo (LM FFNs, MoE connectors, LoRA experts).

The defaults describe a dropless, renormalised softmax top-2 layer over 4 SwiGLU experts with the Switch balance
loss and the router z-loss, dispatched by the `grouped` backend. Every field is checked when the config is made;
an error names the field (``top_k: must be <= num_experts (4), got 5``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from zoo.errors import ConfigError
from zoo.registry import Registry

# The names ``router`` and ``backend`` may take. The routers (`zoo.moe.routing`) and dispatch backends
# (`zoo.moe.dispatch`) register themselves here, so the config checks a name without importing them; `zoo.moe`
# imports both modules, so they are registered whenever this one is imported.
ROUTERS: Registry[type] = Registry("router")
DISPATCHERS: Registry[Callable[..., Any]] = Registry("dispatch backend")


@dataclass
class MoEConfig:
    """A sparse mixture-of-experts layer.

    Widths: ``hidden_size`` is the layer's input and output width d; ``expert_size`` the intermediate width f of each
    routed expert. ``bigmac_rank`` r makes the experts work at width r (descend d->r before dispatch, ascend r->d
    after combine; the experts are r->f->r).
    """

    hidden_size: int = 64
    expert_size: int = 128
    num_experts: int = 4
    top_k: int = 2
    # routing
    router: str = "softmax_topk"  # a name in zoo.moe.ROUTERS
    renormalize: bool = True  # gates of the kept experts divided by their sum (Mixtral, MoE-LLaVA); False: raw scores
    # 2nd..k-th choices by Gumbel sampling: False (deterministic), True (training only), "always" (training and
    # eval: the DeepSpeed 0.9.x top-2 gate MoE-LLaVA pinned, which added the noise in every forward)
    second_expert_sampling: bool | Literal["always"] = False
    top_p: float = 0.5  # router "top_p": experts added until their cumulative probability passes top_p (<= top_k)
    expert_choice_factor: float = 2.0  # router "expert_choice": each expert takes C = ceil(T * factor / E) tokens
    null_experts: int = 0  # zero-compute experts a token may pick (AdaMoE / MoE++)
    num_groups: int = 1  # routers "sigmoid_bias" / "softmax_bias": experts split in groups for group-limited selection
    topk_groups: int = 1  # ... of which this many groups are kept per token
    routed_scaling: float = 1.0  # gates multiplied by this after (re)normalisation (DeepSeek-V3: 2.5)
    gate_input: bool = False  # Llama 4: the gate scales the expert's input, expert(g x), instead of its output
    bias_update_rate: float = 0.001  # routers "sigmoid_bias" / "softmax_bias": gamma of the aux-loss-free bias update
    router_init_std: float = 0.02
    # capacity (None: dropless)
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # None: the training capacity factor also applies at eval
    min_capacity: int = 0
    drop_policy: Literal["position", "probs"] = "position"
    # experts
    expert_form: Literal["swiglu", "mlp"] = "swiglu"  # swiglu: down(act(gate x) * up x); mlp: fc2(act(fc1 x))
    activation: str = "silu"  # a transformers ACT2FN name
    bias: bool = False
    num_shared: int = 0  # shared experts, fused into one always-on FFN of width shared_size
    shared_size: int | None = None  # default num_shared * expert_size
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x w) gate on the shared path
    bigmac_rank: int | None = None
    # execution and losses
    backend: str = "grouped"  # a name in zoo.moe.DISPATCHERS: loop | grouped | padded
    balance_loss: Literal["switch", "switch_per_sequence", "mixtral", "deepseek"] | None = "switch"
    device_groups: int = 1  # > 1 adds DeepSeekMoE's device-level balance loss over this many expert groups
    z_loss: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{field}: {why}, got {getattr(self, field)!r}")

        for name in ("hidden_size", "expert_size", "num_experts"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.top_k < 1:
            raise bad("top_k", "must be >= 1")
        if self.top_k > self.num_experts + self.null_experts:
            raise bad("top_k", f"must be <= num_experts + null_experts ({self.num_experts + self.null_experts})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise bad(name, "must be > 0 (or null for dropless routing)")
        if self.min_capacity < 0:
            raise bad("min_capacity", "must be >= 0")
        if self.null_experts < 0:
            raise bad("null_experts", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.expert_choice_factor <= 0:
            raise bad("expert_choice_factor", "must be > 0")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise bad("num_groups", f"must divide num_experts ({self.num_experts})")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise bad("topk_groups", f"must be in [1, num_groups ({self.num_groups})]")
        if self.num_groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            raise bad("top_k", "must fit in the experts of the kept groups (topk_groups * num_experts / num_groups)")
        if self.num_shared < 0:
            raise bad("num_shared", "must be >= 0")
        if self.bigmac_rank is not None and self.bigmac_rank < 1:
            raise bad("bigmac_rank", "must be >= 1")
        if self.shared_size is not None and self.shared_size < 1:
            raise bad("shared_size", "must be >= 1")
        if not self.routed_scaling > 0:
            raise bad("routed_scaling", "must be > 0")
        for name in ("router_init_std", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.device_groups < 1 or self.num_experts % self.device_groups:
            raise bad("device_groups", f"must divide num_experts ({self.num_experts})")
        ROUTERS.get(self.router, field="router")
        DISPATCHERS.get(self.backend, field="backend")
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:
            raise bad("activation", f"must be a transformers activation ({', '.join(sorted(ACT2FN))})")
        if self.router == "expert_choice" and self.null_experts:
            raise bad("null_experts", "must be 0 with the expert_choice router")

    @property
    def expert_width(self) -> int:
        """Width the routed experts read and write: ``bigmac_rank`` if set, else ``hidden_size``."""
        return self.bigmac_rank or self.hidden_size

    @property
    def shared_width(self) -> int:
        """Intermediate width of the fused shared-expert FFN (0 when there is none)."""
        if self.shared_size is not None:
            return self.shared_size
        return self.num_shared * self.expert_size

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots per expert, ``max(min_capacity, ceil(k * cf * T / E))``, or None when dropless."""
        cf = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        if cf is None:
            return None
        return max(self.min_capacity, math.ceil(self.top_k * cf * num_tokens / self.num_experts - 1e-9))

