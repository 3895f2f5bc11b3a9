"""Balance and stability losses, unscaled (the model applies the coefficients).

Notation: T tokens, E experts (null experts count as experts here), P_e = mean_t p[t, e] the mean router
probability (differentiable), counts_e the number of slots routed to e (no gradient), k slots per token.

| function | value | at uniform routing |
|---|---|---|
| `switch_balance` | E * sum_e F_e P_e, F_e = fraction of tokens whose first choice is e | 1 |
| `sequence_switch_balance` | the Switch loss of each sequence (image), averaged (CuMo, MoCHA) | 1 |
| `mixtral_balance` | E * sum_e (counts_e / T) P_e (transformers' `load_balancing_loss_func`) | k |
| `expert_balance` | sum_e (E / (k T)) counts_e P_e (DeepSeekMoE expert-level) | 1 |
| `device_balance` | sum_g mean_{e in g} f_e * sum_{e in g} P_e (DeepSeekMoE device-level) | 1 |
| `z_loss` | mean_t logsumexp(z_t)^2 (ST-MoE) | (log E)^2 at z = 0 |
"""

from __future__ import annotations

import torch


def _mean_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.float().mean(dim=0)


def switch_balance(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch / GShard / MoE-LLaVA loss E * sum_e F_e P_e with F from each token's first choice ([T] ids)."""
    t, e = probs.shape
    fraction = torch.bincount(top1, minlength=e).float() / max(t, 1)
    return e * torch.sum(fraction * _mean_probs(probs))


def sequence_switch_balance(probs: torch.Tensor, top1: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """CuMo / MoCHA's balance loss E^2 * mean_{b,e} P_be F_be: the Switch loss of each sequence ``b`` (``sequence``
    [T], the sequence of each token), averaged over the sequences that have tokens. One sequence: `switch_balance`."""
    t, e = probs.shape
    if t == 0:
        return probs.sum() * 0.0
    ids, sequence = torch.unique(sequence, return_inverse=True)
    n = ids.numel()
    tokens = torch.bincount(sequence, minlength=n).float().unsqueeze(1)
    mean_probs = probs.float().new_zeros(n, e).index_add_(0, sequence, probs.float()) / tokens
    first = torch.zeros(n, e, device=probs.device).index_put_((sequence, top1), torch.ones_like(top1, dtype=torch.float),
                                                               accumulate=True) / tokens
    return e * (mean_probs * first).sum(1).mean()


def _slot_fraction(expert: torch.Tensor, num_experts: int, num_tokens: int) -> torch.Tensor:
    return torch.bincount(expert, minlength=num_experts).float()[:num_experts] / max(num_tokens, 1)


def mixtral_balance(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """transformers' Mixtral variant: fractions over all k slots, not divided by k (k at uniform routing)."""
    t, e = probs.shape
    return e * torch.sum(_slot_fraction(expert, e, t) * _mean_probs(probs))


def expert_balance(probs: torch.Tensor, expert: torch.Tensor, top_k: float) -> torch.Tensor:
    """DeepSeekMoE expert-level loss sum_i f_i P_i with f_i = E / (k T) * counts_i (1 at uniform routing)."""
    t, e = probs.shape
    f = _slot_fraction(expert, e, t) * e / top_k
    return torch.sum(f * _mean_probs(probs))


def device_balance(probs: torch.Tensor, expert: torch.Tensor, top_k: float, groups: int) -> torch.Tensor:
    """DeepSeekMoE device-level loss over ``groups`` equal contiguous groups of experts (1 at uniform routing)."""
    t, e = probs.shape
    if e % groups:
        raise ValueError(f"device_groups: {groups} does not divide the {e} experts")
    f = (_slot_fraction(expert, e, t) * e / top_k).view(groups, -1).mean(dim=1)
    p = _mean_probs(probs).view(groups, -1).sum(dim=1)
    return torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over tokens; log E when uniform, 0 when one-hot."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
