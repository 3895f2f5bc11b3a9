"""`MoELayer`: router -> capacity -> dispatch to stacked experts -> combine, plus shared experts and BigMac.

    y = shared(x) + ascend( sum_{kept slots s of x} g_s * expert_{e_s}( descend(x) ) )

``shared`` is the fused always-on FFN (optionally sigmoid-gated, Qwen2-MoE); ``descend``/``ascend`` exist only for
BigMac (``bigmac_rank``), otherwise they are the identity. With ``gate_input`` (Llama 4) the gate scales what the
expert reads instead: ``expert_{e_s}(g_s * x)``. Every call returns the output with its unscaled aux
losses and routing statistics (`MoEOutput`), so no hooks are needed to watch the routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe import losses as L
from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import get_dispatch
from zoo.moe.experts import ExpertMLP, StackedExperts
from zoo.moe.routing import ROUTERS, Routing, capacity_keep


@dataclass
class TokenRouting:
    """Where each token of one call went: one entry per slot (a token may have several, top-k), detached.

    ``shape`` is the leading shape of the layer's input (``[B, T]`` for an LM layer, ``[N, L]`` for a vision block
    or a connector); ``token`` [S] indexes its flattened positions, ``expert`` [S] the chosen expert (``>=
    num_experts``: a null expert) and ``weight`` [S] the slot's combine gate (0 when the slot was dropped).
    Positions without a slot (padding) have no entry.
    """

    shape: tuple[int, ...]
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor

    def top_experts(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts, weights)``, each ``[*shape, k]``: every position's slots by falling weight (ties: the
        router's slot order); -1 and weight 0 where a position has fewer than ``k`` slots. ``experts[..., 0]`` is
        the expert each token went to (its kept slot of highest weight; a token whose slots were all dropped shows
        its first choice with weight 0)."""
        positions = int(torch.tensor(self.shape).prod()) if self.shape else 1
        token, expert, weight = self.token.cpu(), self.expert.cpu(), self.weight.detach().float().cpu()
        order = torch.argsort(-weight, stable=True)
        order = order[torch.argsort(token[order], stable=True)]  # by token, then by falling weight
        token, expert, weight = token[order], expert[order], weight[order]
        starts = torch.searchsorted(token, token)  # first slot of each token: a slot's place among its token's
        place = torch.arange(len(token)) - starts
        keep = place < k
        experts = torch.full((positions, k), -1, dtype=torch.long)
        weights = torch.zeros(positions, k)
        experts[token[keep], place[keep]] = expert[keep]
        weights[token[keep], place[keep]] = weight[keep]
        return experts.view(*self.shape, k), weights.view(*self.shape, k)


@dataclass
class RoutingStats:
    """Routing statistics of one call (detached tensors; `as_dict` turns them into floats for logging).

    ``assigned`` counts slots per expert before capacity, ``kept`` after; ``dropped`` the slots that did not fit;
    ``null`` the slots that chose a null expert; ``entropy`` is the mean router entropy in nats;
    ``by_modality`` holds the same statistics for image and text tokens when a modality mask was given;
    ``token_routing`` (`TokenRouting`) says where each token went, for per-token views (``zoo serve``'s Experts).
    """

    assigned: torch.Tensor
    kept: torch.Tensor
    dropped: torch.Tensor
    null: torch.Tensor
    tokens: int
    entropy: torch.Tensor
    by_modality: dict[str, RoutingStats] = field(default_factory=dict)
    token_routing: TokenRouting | None = None

    @property
    def drop_rate(self) -> float:
        total = float(self.assigned.sum())
        return float(self.dropped) / total if total else 0.0

    @property
    def load_imbalance(self) -> float:
        """max / mean kept load (1.0 is perfect balance)."""
        mean = float(self.kept.float().mean())
        return float(self.kept.max()) / mean if mean else 0.0

    def as_dict(self) -> dict:
        out = {
            "tokens": self.tokens, "tokens_per_expert": self.kept.tolist(), "assigned_per_expert": self.assigned.tolist(),
            "dropped": int(self.dropped), "drop_rate": self.drop_rate, "null_slots": int(self.null),
            "entropy": float(self.entropy), "load_imbalance": self.load_imbalance,
        }
        for name, sub in self.by_modality.items():
            out[name] = sub.as_dict()
        return out


@dataclass
class MoEOutput:
    """Output of a `MoELayer` call: ``output`` (same shape as the input), unscaled ``aux_losses`` by name
    ("balance", "device_balance", "z_loss" as configured), ``stats`` and the raw ``routing`` of the routed tokens."""

    output: torch.Tensor
    aux_losses: dict[str, torch.Tensor]
    stats: RoutingStats
    routing: Routing


def routing_stats(routing: Routing, keep: torch.Tensor, num_experts: int, rows: torch.Tensor | None = None
                  ) -> RoutingStats:
    """`RoutingStats` of one routing: ``keep`` [S] which slots fit their capacity; ``rows`` (bool [T]) restricts them
    to a subset of the tokens (a modality)."""
    expert, probs = routing.expert, routing.probs
    if rows is not None:  # restrict to the slots of a subset of tokens (bool [T])
        slot_sel = rows[routing.token]
        expert, keep, probs = expert[slot_sel], keep[slot_sel], probs[rows]
    bins = routing.probs.shape[1]
    with torch.no_grad():
        assigned = torch.bincount(expert, minlength=bins)
        kept = torch.bincount(expert[keep], minlength=bins)
        return RoutingStats(
            assigned=assigned[:num_experts], kept=kept[:num_experts],
            dropped=(assigned - kept)[:num_experts].sum(), null=assigned[num_experts:].sum(),
            tokens=int(probs.shape[0]), entropy=L.router_entropy(probs),
        )


def combine_weights(routing: Routing, keep: torch.Tensor) -> torch.Tensor:
    """Gates of the slots: dropped slots zeroed, then per-token normalisation (if the router asks) and scale.
    The per-token sum is clamped at the dtype's eps, DeepSpeed-MoE's rule: a token whose kept gates are all tiny
    (its likely expert dropped) keeps tiny gates instead of being blown up to 1."""
    w = routing.score * keep.to(routing.score.dtype)
    if routing.normalize:
        denom = torch.zeros(routing.num_tokens, dtype=w.dtype, device=w.device).index_add_(0, routing.token, w)
        w = w / denom.clamp_min(torch.finfo(w.dtype).eps)[routing.token]
    return w * routing.scale if routing.scale != 1.0 else w


def routing_losses(cfg: MoEConfig, routing: Routing, suffix: str = "", sequence: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """The balance / device-balance / z losses ``cfg`` asks for, unscaled, named ``balance{suffix}`` etc.
    ``sequence`` [T]: the sequence (image) of each routed token, for ``switch_per_sequence`` (None: one sequence)."""
    out = {}
    slots_per_token = routing.expert.numel() / max(routing.num_tokens, 1)
    if cfg.balance_loss == "switch" or (cfg.balance_loss == "switch_per_sequence" and sequence is None):
        out["balance"] = L.switch_balance(routing.probs, routing.top1())
    elif cfg.balance_loss == "switch_per_sequence":
        out["balance"] = L.sequence_switch_balance(routing.probs, routing.top1(), sequence)
    elif cfg.balance_loss == "mixtral":
        out["balance"] = L.mixtral_balance(routing.probs, routing.expert)
    elif cfg.balance_loss == "deepseek":
        out["balance"] = L.expert_balance(routing.probs, routing.expert, slots_per_token)
    if cfg.device_groups > 1:
        probs = routing.probs[:, : cfg.num_experts]
        expert = routing.expert[routing.expert < cfg.num_experts]
        out["device_balance"] = L.device_balance(probs, expert, slots_per_token, cfg.device_groups)
    if cfg.z_loss:
        out["z_loss"] = L.z_loss(routing.logits)
    return {f"{name}{suffix}": value for name, value in out.items()}


class MoELayer(nn.Module):
    """A sparse MoE FFN built from a `MoEConfig` (see the module docstring).

    ``forward(x, padding_mask=None, modality=None)``: ``x`` [..., d]; ``padding_mask`` (same leading shape, True for
    real tokens) keeps padding out of routing, capacity, losses and statistics (padding rows get only the shared
    path); ``modality`` (bool, True for image tokens) splits the statistics by modality.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = ROUTERS.get(config.router, field="router")(config)
        self.experts = StackedExperts(config.num_experts, config.expert_width, config.expert_size, config.expert_form,
                                      config.activation, config.bias)
        self.dispatch = get_dispatch(config.backend)
        self.descend = self.ascend = None
        if config.bigmac_rank is not None:
            self.descend = nn.Linear(config.hidden_size, config.bigmac_rank, bias=False)
            self.ascend = nn.Linear(config.bigmac_rank, config.hidden_size, bias=False)
        self.shared = None
        self.shared_gate = None
        if config.shared_width:
            self.shared = ExpertMLP(config.hidden_size, config.shared_width, config.expert_form, config.activation,
                                    config.bias)
            if config.shared_gate:
                self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def active_parameters(self) -> int:
        """Parameters one token runs through: all but the routed experts, plus ``top_k`` of them (see `zoo.params`)."""
        total = sum(p.numel() for p in self.parameters())
        bank = sum(p.numel() for p in self.experts.parameters())
        E = self.config.num_experts
        return total - bank + bank * min(self.config.top_k, E) // E

    def set_backend(self, name: str) -> None:
        """Switch the dispatch backend (``loop``, ``grouped``, ``padded``); outputs do not change."""
        self.dispatch = get_dispatch(name)
        self.config.backend = name

    def combine_weights(self, routing: Routing, keep: torch.Tensor) -> torch.Tensor:
        """Gates of the slots (see `combine_weights`)."""
        return combine_weights(routing, keep)

    def aux_losses(self, routing: Routing, sequence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The configured balance / z losses of one routing, unscaled (``sequence``: see `routing_losses`)."""
        return routing_losses(self.config, routing, sequence=sequence)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                modality: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.config
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"MoELayer: input width {x.shape[-1]} != hidden_size {cfg.hidden_size}")
        flat = x.reshape(-1, cfg.hidden_size)
        rows = None
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:-1]:
                raise ValueError(f"padding_mask: shape {tuple(padding_mask.shape)} != tokens {tuple(x.shape[:-1])}")
            rows = torch.nonzero(padding_mask.reshape(-1)).squeeze(1)
        tokens = flat if rows is None else flat[rows]

        routing = self.router(tokens)
        capacity = cfg.capacity(routing.num_tokens, self.training) if cfg.router != "expert_choice" else None
        keep = capacity_keep(routing, cfg.num_experts, capacity, cfg.drop_policy)
        weight = self.combine_weights(routing, keep)
        real = keep & (routing.expert < cfg.num_experts)
        expert_in = tokens if self.descend is None else self.descend(tokens)
        if cfg.gate_input:  # Llama 4: each slot runs its expert on the gated token, y_t = sum_s expert_s(g_s x_t)
            slot_token = routing.token[real]
            slot_in = expert_in[slot_token] * weight[real].to(expert_in.dtype).unsqueeze(-1)
            slots = torch.arange(slot_in.shape[0], device=x.device)
            per_slot = self.experts(slot_in, slots, routing.expert[real], torch.ones_like(weight[real]), self.dispatch)
            routed = per_slot.new_zeros(expert_in.shape[0], per_slot.shape[1]).index_add_(0, slot_token, per_slot)
        else:
            routed = self.experts(expert_in, routing.token[real], routing.expert[real], weight[real], self.dispatch)
        if self.ascend is not None:
            routed = self.ascend(routed)
        routed = routed.to(x.dtype)
        if rows is not None:
            routed = torch.zeros_like(flat).index_copy(0, rows, routed)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = F.sigmoid(self.shared_gate(flat)) * shared
            routed = routed + shared

        stats = routing_stats(routing, keep, cfg.num_experts)
        token = routing.token if rows is None else rows[routing.token]
        stats.token_routing = TokenRouting(tuple(x.shape[:-1]), token.detach(), routing.expert.detach(),
                                           weight.detach())
        if modality is not None:
            mod = modality.reshape(-1).bool()
            if rows is not None:
                mod = mod[rows]
            stats.by_modality = {"image": routing_stats(routing, keep, cfg.num_experts, mod),
                                 "text": routing_stats(routing, keep, cfg.num_experts, ~mod)}
        sequence = None
        if cfg.balance_loss == "switch_per_sequence" and x.dim() >= 3:  # each leading row is one sequence (image)
            sequence = torch.arange(flat.shape[0], device=x.device) // x.shape[-2]
            sequence = sequence if rows is None else sequence[rows]
        return MoEOutput(routed.reshape(x.shape), self.aux_losses(routing, sequence), stats, routing)


def update_router_biases(model: nn.Module, rate: float | None = None) -> int:
    """Apply the aux-loss-free bias update to every ``sigmoid_bias`` router in ``model``; returns how many."""
    from zoo.moe.routing import SigmoidBiasRouter

    routers = [m for m in model.modules() if isinstance(m, SigmoidBiasRouter)]
    for router in routers:
        router.update_bias(rate)
    return len(routers)
