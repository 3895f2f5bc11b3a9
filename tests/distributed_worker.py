"""Checks that need several real processes, run by the tests under ``torchrun --standalone`` (gloo, a free port):
``python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_worker.py OUT TASK [TASK ...]``.

Each rank writes ``OUT/<task>.rank<r>.json`` with what it measured; the tests assert on those numbers, so one
launch (one ~10 s import of the stack per process) serves several tests. Tasks:

- ``ep_layer``: scale_out.md section 4 for one MoE layer per router kind and a MoE connector: expert parallelism
  over all ranks vs each rank running its own micro-batch through the whole layer.
- ``deepspeed``: a tiny sparse zoo LLaVA trained under ``deepspeed.initialize`` (ZeRO-2, ZeRO-3) vs torch DDP on the
  same batches, and the zoo ``moe-llava`` layer vs ``deepspeed.moe.layer.MoE`` on the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def _all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


# ----------------------------------------------------------------------------------------------------- ep_layer
EP_CASES = {
    "softmax_topk_capacity": dict(num_experts=4, top_k=2, capacity_factor=0.75, eval_capacity_factor=0.75),
    "sigmoid_bias": dict(num_experts=4, top_k=2, router="sigmoid_bias", num_groups=2, topk_groups=1,
                         routed_scaling=2.5, balance_loss="deepseek"),
    "top_p": dict(num_experts=4, top_k=3, router="top_p", top_p=0.6),
    "null_experts": dict(num_experts=4, top_k=2, null_experts=2, num_shared=1, shared_size=16),
}


def _layer_case(make, x: torch.Tensor, mesh, world: int) -> dict:
    """Run one layer sharded over the EP mesh and whole, on this rank's micro-batch ``x``; compare."""
    from zoo.moe.parallel import reduce_expert_gradients, shard_experts

    torch.manual_seed(0)
    whole = make()
    sharded = copy.deepcopy(whole)
    ep, expert_dp = mesh["ep"].get_group(), mesh["expert_dp"].get_group()
    banks = shard_experts(sharded, ep, mesh["ep"].size(), mesh["ep"].get_local_rank())
    outputs, grads = [], []
    for layer in (whole, sharded):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        y, aux = (out.output, out.aux_losses) if hasattr(out, "output") else (out.tokens, out.aux_losses)
        loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(7))).sum()
        loss = loss + 0.1 * sum(aux.values())
        loss.backward()
        outputs.append((y, out))
        grads.append(xi.grad)
    reduce_expert_gradients(sharded, expert_dp, world)
    bank = next(iter(banks.values()))
    name = next(iter(banks))
    result = {"output": _max_diff(outputs[0][0], outputs[1][0]), "input_grad": _max_diff(grads[0], grads[1]),
              "router_grad": max(_max_diff(p.grad, q.grad) for (n, p), (_, q) in
                                 zip(whole.named_parameters(), sharded.named_parameters()) if "router" in n),
              "experts_held": bank.num_experts, "expert_parameters": sum(p.numel() for p in bank.parameters()),
              "expert_parameters_whole": sum(p.numel() for p in whole.get_submodule(name).parameters())}
    stats = getattr(outputs[0][1], "stats", None)
    result["dropped"] = int(stats.dropped) if stats is not None else 0
    result["null_slots"] = int(stats.null) if stats is not None else 0
    # expert e's gradient on its rank == the mean over ranks of the one-process gradients on each rank's batch
    worst = 0.0
    for p_name in ("w_in", "w_out", "b_in", "b_out"):
        full = getattr(whole.get_submodule(name), p_name)
        if full is None:
            continue
        mean = torch.stack(_all_gather(full.grad)).mean(0)
        shard = bank.parallel
        want = mean[shard.first: shard.first + shard.local]
        worst = max(worst, _max_diff(want, getattr(bank, p_name).grad) / max(1.0, float(want.abs().max())))
    result["expert_grad"] = worst  # relative to the largest gradient entry (when above 1)
    bias = getattr(getattr(sharded, "router", None), "bias", None)
    if bias is not None:
        from zoo.moe import update_router_biases

        update_router_biases(whole), update_router_biases(sharded)
        result["bias_equal_across_ranks"] = all(torch.equal(b, bias) for b in _all_gather(bias))
        result["bias_equals_one_process"] = bool(torch.equal(bias, whole.router.bias)) and bool(bias.abs().sum() > 0)
    return result


def task_ep_layer(out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from zoo.config import ConnectorConfig
    from zoo.connectors.moe_mlp import MoEMLPConnector
    from zoo.moe import MoEConfig, MoELayer

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("expert_dp", "ep"))
    rank = dist.get_rank()
    x = torch.randn(37 + 11 * rank, 16, generator=torch.Generator().manual_seed(rank))  # uneven micro-batches
    results = {}
    for case, fields in EP_CASES.items():
        results[case] = _layer_case(lambda f=fields: MoELayer(MoEConfig(hidden_size=16, expert_size=24,
                                                                          router_init_std=0.5, **f)).train(),
                                    x, mesh, world)
    tokens = torch.randn(2 + rank, 9, 12, generator=torch.Generator().manual_seed(10 + rank))
    results["moe_mlp_connector"] = _layer_case(
        lambda: MoEMLPConnector(ConnectorConfig(kind="moe_mlp", projector="mlp2x_gelu",
                                                moe={"num_experts": 4, "router_init_std": 0.5}), 12, 16).train(),
        tokens, mesh, world)
    return results


TASKS = {"ep_layer": task_ep_layer}


def launch(out: Path, nproc: int, *tasks: str, timeout: float = 300) -> dict[str, list[dict]]:
    """Run ``tasks`` in ``nproc`` processes (torchrun, gloo, a free port); ``{task: [rank 0's result, ...]}``."""
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__,
            str(out), *tasks]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return {task: [json.loads((out / f"{task}.rank{r}.json").read_text()) for r in range(nproc)] for task in tasks}


def main() -> None:
    out, tasks = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for task in tasks:
        result = TASKS[task](out)
        (out / f"{task}.rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
