"""Routers: token -> expert assignments as flat slots, plus the capacity rule that drops slots.

Every router returns a `Routing`: S slots, each a (token, expert, score, rank) quadruple. Top-k routers give
S = T*k slots laid out token-major; expert choice gives E*C; dynamic top-p a variable number. Experts with an
index >= ``num_experts`` are null experts (zero compute). Router math runs in fp32 whatever the input dtype.

Registered names (``MoEConfig.router``):

- ``softmax_topk``: top-k of softmax(x W^T); gates renormalised over the kept experts (``renormalize``) or raw.
  ``second_expert_sampling`` picks choices 2..k by Gumbel sampling in training (DeepSpeed's top-2 gate), or
  ``"always"``, in eval too, as the DeepSpeed 0.9.x that MoE-LLaVA pinned did.
- ``noisy_topk``: Shazeer et al. (2017): top-k of z + eps * softplus(x W_noise^T) in training; softmax over the kept.
- ``expert_choice``: each expert takes its C = ceil(T * expert_choice_factor / E) best tokens (Zhou et al., 2022).
- ``sigmoid_bias``: DeepSeek-V3: top-k of sigmoid(z) + b with group-limited selection; gates use sigmoid(z) only;
  b moves by the aux-loss-free update (`update_bias`).
- ``softmax_bias``: ERNIE 4.5: the same with softmax(z) in place of sigmoid(z).
- ``sigmoid_topk``: Llama 4: top-k of the logits; each gate is sigmoid(z) of its expert (raw unless ``renormalize``).
- ``top_p``: dynamic routing: experts in order of probability until their cumulative probability reaches ``top_p``
  (at least 1, at most ``top_k``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.config import ROUTERS, MoEConfig


class Routing(NamedTuple):
    """Flat token -> expert slots from one router call over T tokens.

    ``score`` holds the raw gate of each slot (differentiable); the layer zeroes dropped slots, then divides by the
    per-token sum when ``normalize`` and multiplies by ``scale``. ``logits`` and ``probs`` are [T, E + null] fp32;
    ``probs`` rows sum to 1 and feed the balance losses and the entropy statistic.

    A named tuple, so wrappers that hook a module's output tensors (DeepSpeed ZeRO-3 re-gathers a router's weight
    for the backward through them; FSDP2 walks outputs as a pytree) find the tensors of a router's output.
    """

    token: torch.Tensor  # [S] long
    expert: torch.Tensor  # [S] long; >= num_experts means a null expert
    score: torch.Tensor  # [S] fp32
    rank: torch.Tensor  # [S] long: 0 for a token's first choice, 1 for its second, ...
    logits: torch.Tensor  # [T, E + null] fp32
    probs: torch.Tensor  # [T, E + null] fp32
    normalize: bool
    scale: float = 1.0

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    def top1(self) -> torch.Tensor:
        """Each token's first choice, [T] (argmax of the router scores for routers that rank per token)."""
        return self.probs.argmax(dim=-1)

    def indices(self, k: int) -> torch.Tensor:
        """[T, k] chosen experts of a top-k routing (slots are token-major), for parity checks and analysis."""
        return self.expert.view(self.num_tokens, k)


class Router(nn.Module):
    """Base router: a bias-free linear map to E + null logits, computed in fp32."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.num_choices = config.num_experts + config.null_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(self.num_choices, config.hidden_size))
        nn.init.normal_(self.weight, std=config.router_init_std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def topk_slots(self, scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Token-major flat slots from [T, k] chosen indices and their scores."""
        t, k = index.shape
        token = torch.arange(t, device=index.device).repeat_interleave(k)
        rank = torch.arange(k, device=index.device).repeat(t)
        return token, index.reshape(-1), scores.gather(1, index).reshape(-1), rank

    def forward(self, x: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


@ROUTERS.register("softmax_topk")
class SoftmaxTopKRouter(Router):
    """Top-k of p = softmax(z) (GShard, Mixtral, MoE-LLaVA; raw gates for DeepSeekMoE V1 with renormalize=False)."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        sampling = self.config.second_expert_sampling
        if self.top_k > 1 and (sampling == "always" or (sampling is True and self.training)):
            first = probs.argmax(dim=-1, keepdim=True)
            uniform = torch.rand_like(logits).clamp(1e-20, 1.0 - 1e-7)
            gumbel = -torch.log(-torch.log(uniform))
            noisy = (logits + gumbel).scatter(1, first, float("-inf"))
            rest = noisy.topk(self.top_k - 1, dim=-1).indices
            index = torch.cat([first, rest], dim=1)
        else:
            index = probs.topk(self.top_k, dim=-1).indices
        token, expert, score, rank = self.topk_slots(probs, index)
        return Routing(token, expert, score, rank, logits, probs, normalize=self.config.renormalize,
                       scale=self.config.routed_scaling)


@ROUTERS.register("noisy_topk")
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al., 2017): H = z + eps * softplus(x W_noise^T) while training."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.noise_weight = nn.Parameter(torch.zeros(self.num_choices, config.hidden_size))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        if self.training:
            noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        probs = logits.softmax(dim=-1)
        index = probs.topk(self.top_k, dim=-1).indices
        token, expert, score, rank = self.topk_slots(probs, index)
        # softmax over the kept logits == kept probabilities renormalised
        return Routing(token, expert, score, rank, logits, probs, normalize=True, scale=self.config.routed_scaling)


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al., 2022): expert e takes the C tokens with the highest softmax(z)[t, e].

    Every expert processes exactly C = min(T, ceil(T * expert_choice_factor / E)) tokens; a token may get no expert
    or several. Selection looks at the whole batch, so it is not causal: do not use it in an autoregressive decoder.
    """

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(num_tokens * self.config.expert_choice_factor / self.num_experts - 1e-9))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        c = self.capacity(x.shape[0])
        score, token = probs.t().topk(c, dim=-1)  # [E, C]
        expert = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        rank = torch.zeros_like(expert)
        return Routing(token.reshape(-1), expert, score.reshape(-1), rank, logits, probs, normalize=False,
                       scale=self.config.routed_scaling)


@ROUTERS.register("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """DeepSeek-V3 routing: s = sigmoid(z); experts chosen by top-k of s + b inside the ``topk_groups`` best groups.

    A group scores the sum of its two best s + b. Gates are s of the chosen experts (b excluded), normalised when
    ``renormalize`` and multiplied by ``routed_scaling``. ``b`` (buffer ``bias``) gets no gradient: in training the
    router counts the load per expert, and `update_bias` moves b by gamma * sign(mean load - load).
    """

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("bias", torch.zeros(self.num_choices))
        self.register_buffer("load", torch.zeros(self.num_choices), persistent=False)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The per-expert scores that the bias shifts for selection and the gates are taken from."""
        return logits.sigmoid()

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        scores = self.scores(logits)
        choice = scores + self.bias
        groups = self.config.num_groups
        if groups > 1:
            t = choice.shape[0]
            per_group = choice.view(t, groups, -1)
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
            keep = group_score.topk(self.config.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(per_group.shape[-1], dim=1), float("-inf"))
        index = choice.topk(self.top_k, dim=-1).indices
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(index.reshape(-1), minlength=self.num_choices).to(self.load.dtype)
        token, expert, score, rank = self.topk_slots(scores, index)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return Routing(token, expert, score, rank, logits, probs, normalize=self.config.renormalize,
                       scale=self.config.routed_scaling)

    @torch.no_grad()
    def update_bias(self, rate: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step: b += rate * sign(mean load - load); resets the load counter.

        Call it after each optimiser step (`zoo.moe.update_router_biases` does it for a whole model). Returns the
        load that was used.
        """
        rate = self.config.bias_update_rate if rate is None else rate
        load = self.load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank moves its bias by the global load: biases stay equal
        if load.sum() > 0:
            self.bias += rate * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


@ROUTERS.register("softmax_bias")
class SoftmaxBiasRouter(SigmoidBiasRouter):
    """ERNIE 4.5: p = softmax(z); experts chosen by top-k of p + b (b: ``bias``, moved like DeepSeek-V3's); the gates
    are p of the chosen experts, normalised when ``renormalize``."""

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)


@ROUTERS.register("sigmoid_topk")
class SigmoidTopKRouter(Router):
    """Llama 4: the experts of the top-k logits, each gated by sigmoid(z) of its logit (raw unless ``renormalize``).
    With ``gate_input`` the layer scales the expert's input by the gate rather than its output, as Llama 4 does."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        scores = logits.sigmoid()
        index = logits.topk(self.top_k, dim=-1).indices
        token, expert, score, rank = self.topk_slots(scores, index)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return Routing(token, expert, score, rank, logits, probs, normalize=self.config.renormalize,
                       scale=self.config.routed_scaling)


@ROUTERS.register("top_p")
class TopPRouter(Router):
    """Dynamic routing (Huang et al., 2024): experts by decreasing probability until the cumulative probability
    reaches ``top_p``; at least one expert and at most ``top_k`` per token."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        before = top.cumsum(dim=-1) - top  # probability mass of the experts ranked above
        chosen = (before < self.config.top_p).reshape(-1)
        chosen[:: self.top_k] = True
        token, expert, score, rank = (v[chosen] for v in self.topk_slots(probs, index))
        return Routing(token, expert, score, rank, logits, probs, normalize=self.config.renormalize,
                       scale=self.config.routed_scaling)


def capacity_keep(routing: Routing, num_experts: int, capacity: int | None, policy: str = "position") -> torch.Tensor:
    """Which slots fit in their expert's ``capacity`` (bool [S]); null-expert slots always fit.

    ``position``: an expert's queue is filled with all first choices in token order, then all second choices, ...
    (DeepSpeed top-2). ``probs``: the highest-scoring slots are kept first (DeepSpeed ``drop_policy="probs"``).
    """
    s = routing.expert.numel()
    if capacity is None or s == 0:
        return torch.ones(s, dtype=torch.bool, device=routing.expert.device)
    if policy == "position":
        priority = routing.rank * routing.num_tokens + routing.token
        order = torch.argsort(priority, stable=True)
    elif policy == "probs":
        order = torch.argsort(routing.score.detach(), descending=True, stable=True)
    else:
        raise ValueError(f"drop_policy: expected 'position' or 'probs', got {policy!r}")
    position = position_in_expert(routing.expert, order, routing.probs.shape[1])
    return (position < capacity) | (routing.expert >= num_experts)


def position_in_expert(expert: torch.Tensor, order: torch.Tensor | None, num_bins: int) -> torch.Tensor:
    """Each slot's 0-based place in its expert's queue, queues filled in ``order`` (slot order if None)."""
    ordered = expert if order is None else expert[order]
    grouped = torch.argsort(ordered, stable=True)
    counts = torch.bincount(ordered, minlength=num_bins)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.arange(ordered.numel(), device=expert.device) - starts[ordered[grouped]]
    position = torch.empty_like(place)
    slots = grouped if order is None else order[grouped]
    position[slots] = place
    return position
