"""Expert parallelism: each MoE layer's routed experts split over the ranks of an expert-parallel (EP) group.

With EP degree ``ep`` the E routed experts of a layer are cut into ``ep`` contiguous shards of E/ep; rank r of an
EP group holds shard r (`shard_experts`). A layer call then goes (DeepSpeed-MoE's and torchtitan's design):

1. route locally: the router, capacity and balance losses see only this rank's tokens (its micro-batch is the
   capacity group, as DeepSpeed-MoE does); shared and null experts and the router never leave the rank;
2. sort the kept slots by expert, exchange the per-destination counts (all-to-all of a small integer tensor), then
   the slots' inputs ``[S, d]`` with uneven splits through the autograd all-to-all
   (``all_to_all_single_autograd`` of torch's functional collectives);
3. the local experts run the received slots with the layer's own dispatch backend (``grouped`` by default);
4. the outputs travel back by the inverse all-to-all and are weighted by the gates and summed per token at home.

Gradients: the all-to-all's backward brings every rank's contribution to the experts it holds, so an expert's
gradient on its rank is the sum over the EP group's micro-batches. `reduce_expert_gradients` sums it over the
expert-data-parallel group (the ranks holding the same shard) and divides by the world size, the scale of the
data-parallel mean the rest of the model gets.

Expert choice routing selects over the whole batch, which under EP would be one rank's micro-batch: it is refused
(`check_expert_parallel`). Every rank of an EP group must call a sharded layer equally often (all ranks run the
same model on their own micro-batches); a MoE connector therefore needs images in every rank's micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from zoo.errors import ConfigError
from zoo.moe.experts import StackedExperts

PARAMETERS = ("w_in", "b_in", "w_out", "b_out")


def expert_banks(model: nn.Module) -> dict[str, StackedExperts]:
    """Every routed expert bank of ``model`` by module name (LM MoE layers, MoIIE layers, sparse vision blocks, MoE
    connectors)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def bank_config(model: nn.Module, bank_name: str):
    """The `MoEConfig` of the layer that owns the bank ``bank_name`` (``config`` of a MoE layer, ``moe`` of a MoE
    connector), or None."""
    from zoo.moe.config import MoEConfig

    owner = model.get_submodule(bank_name.rsplit(".", 1)[0]) if "." in bank_name else model
    for attr in ("config", "moe"):
        value = getattr(owner, attr, None)
        if isinstance(value, MoEConfig):
            return value
    return None


def check_expert_parallel(model: nn.Module, size: int, world_size: int) -> dict[str, StackedExperts]:
    """The banks to shard for EP degree ``size`` over ``world_size`` ranks; `ConfigError` naming
    ``train.expert_parallel`` and the layer when the degree does not divide the world size or a layer's experts, or
    when a layer's router cannot run on one rank's tokens (expert choice)."""
    if size < 1:
        raise ConfigError(f"train.expert_parallel: must be >= 1, got {size}")
    if world_size % size:
        raise ConfigError(f"train.expert_parallel: {size} does not divide the world size {world_size} "
                          "(devices x num_nodes)")
    banks = expert_banks(model)
    if size > 1 and not banks:
        raise ConfigError(f"train.expert_parallel: {size}, but the model has no MoE layer (sparsify it first)")
    for name, bank in banks.items():
        layer = name.removesuffix(".experts")
        if bank.num_experts % size:
            raise ConfigError(f"train.expert_parallel: {size} does not divide the {bank.num_experts} experts of "
                              f"{layer} (num_experts)")
        config = bank_config(model, name)
        if size > 1 and config is not None and config.router == "expert_choice":
            raise ConfigError(f"train.expert_parallel: {layer} routes by expert choice (router: expert_choice), "
                              "which selects over the whole batch; under expert parallelism it would see one rank's "
                              "micro-batch only. Use a token-choice router or expert_parallel: 1")
    return banks


class ExpertShard:
    """A bank's place in its EP group: it holds experts ``first .. first + local - 1`` of ``num_experts``. Called
    by `StackedExperts.forward` in place of the dispatch backend (module docstring, steps 2-4)."""

    def __init__(self, group, size: int, rank: int, num_experts: int):
        self.group, self.size, self.rank, self.num_experts = group, size, rank, num_experts
        self.local = num_experts // size
        self.first = rank * self.local

    def __call__(self, experts: StackedExperts, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                 weight: torch.Tensor, dispatch: Callable[..., torch.Tensor]) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        order = torch.argsort(expert, stable=True)
        token, expert, weight = token[order], expert[order], weight[order]
        send = torch.bincount(expert // self.local, minlength=self.size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        received_expert = expert.new_empty(sum(recv_sizes))
        dist.all_to_all_single(received_expert, expert % self.local, recv_sizes, send_sizes, group=self.group)
        rows = x.index_select(0, token)
        received = wait_tensor(all_to_all_single_autograd(rows, recv_sizes, send_sizes, self.group))
        n = received.shape[0]
        out = dispatch(experts, received, torch.arange(n, device=x.device), received_expert,
                       torch.ones(n, dtype=weight.dtype, device=x.device))
        back = wait_tensor(all_to_all_single_autograd(out, send_sizes, recv_sizes, self.group))
        y = back.new_zeros(x.shape[0], back.shape[1])
        return y.index_add(0, token, back * weight.to(back.dtype).unsqueeze(1))


def shard_experts(model: nn.Module, group, size: int, rank: int) -> dict[str, StackedExperts]:
    """Keep only shard ``rank`` of ``size`` of every expert bank (new, smaller parameters) and route its slots
    through the EP ``group`` (`ExpertShard`); returns the banks. Call `check_expert_parallel` first."""
    banks = expert_banks(model)
    for bank in banks.values():
        shard = ExpertShard(group, size, rank, bank.num_experts)
        for name in PARAMETERS:
            param = getattr(bank, name)
            if param is not None:
                local = param.detach()[shard.first: shard.first + shard.local].clone()
                setattr(bank, name, nn.Parameter(local, requires_grad=param.requires_grad))
        bank.num_experts = shard.local
        bank.parallel = shard
    return banks


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the sharded expert banks, by full name."""
    return {f"{name}.{p}": getattr(bank, p) for name, bank in expert_banks(model).items() if bank.parallel
            for p in PARAMETERS if getattr(bank, p) is not None}


def reduce_expert_gradients(model: nn.Module, expert_dp_group, world_size: int) -> None:
    """Expert gradients summed over the expert-data-parallel group and divided by the world size: the gradient of
    the mean loss over all ranks, the scale data parallelism gives every other parameter (module docstring)."""
    for param in expert_parameters(model).values():
        if not param.requires_grad:
            continue
        if param.grad is None:  # no slot reached these experts on any rank of the EP group this step
            param.grad = torch.zeros_like(param)
        if dist.get_world_size(expert_dp_group) > 1:
            dist.all_reduce(param.grad, group=expert_dp_group)
        param.grad.div_(world_size)


def gather_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state dict of ``model``) with every sharded expert tensor replaced by all E experts, gathered
    over its EP group (a collective: every rank calls it)."""
    out = dict(state)
    for name in expert_parameters(model):
        shard: ExpertShard = model.get_submodule(name.rsplit(".", 1)[0]).parallel
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.size)]
        dist.all_gather(parts, local, group=shard.group)
        out[name] = torch.cat(parts)
    return out


__all__ = ["ExpertShard", "bank_config", "check_expert_parallel", "expert_banks", "expert_parameters", "gather_experts",
           "reduce_expert_gradients", "shard_experts"]
