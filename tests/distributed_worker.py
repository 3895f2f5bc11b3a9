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


# ---------------------------------------------------------------------------------------------------- deepspeed
MOE_LLAVA_ZERO = {  # MoE-LLaVA's scripts/zero2.json as released (Hugging Face Trainer's "auto" placeholders)
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto"},
}
DS_STEPS, DS_BATCH, CLIP = 4, 4, 1.0  # steps, samples per rank, gradient clipping (the recipes' default)


def _deepspeed_engine_config(out: Path, stage: int) -> dict:
    from zoo.train.deepspeed import read_deepspeed_config

    path = out / f"zero{stage}.json"
    zero = {**MOE_LLAVA_ZERO["zero_optimization"], "stage": stage}
    path.write_text(json.dumps({**MOE_LLAVA_ZERO, "zero_optimization": zero}))
    config = read_deepspeed_config(path, stage)  # what train.deepspeed_config gives Lightning
    return {**config, "train_micro_batch_size_per_gpu": DS_BATCH, "gradient_accumulation_steps": 1,
            "gradient_clipping": CLIP, "steps_per_print": 10**9}  # what Lightning adds from the recipe


def _train_losses(engine: str, model, batches, out: Path) -> list[float]:
    import deepspeed
    from torch.nn.parallel import DistributedDataParallel

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    if engine == "ddp":
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        for batch in batches:
            loss = ddp(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            losses.append(float(loss))
        return losses
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                       config=_deepspeed_engine_config(out, int(engine[-1])))
    for batch in batches:
        loss = ds(**batch).loss
        ds.backward(loss)
        ds.step()
        losses.append(float(loss))
    return losses


def _layer_parity() -> dict:
    """The zoo's moe-llava layer vs deepspeed.moe.layer.MoE on the same weights (exported by the zoo's own
    DeepSpeed-MoE writer), a Phi FFN (fc1 / gelu_new / fc2 with biases) as the expert."""
    from deepspeed.moe.layer import MoE
    from torch import nn
    from transformers.activations import ACT2FN

    from zoo.config import SPARSITY_PRESETS
    from zoo.lm.interop import moe_layer_to_deepspeed
    from zoo.moe import MoEConfig, MoELayer

    class PhiMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(16, 32), nn.Linear(32, 16), ACT2FN["gelu_new"]

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    preset = SPARSITY_PRESETS["moe-llava"]["moe"]
    torch.manual_seed(0)
    ours = MoELayer(MoEConfig(hidden_size=16, expert_size=32, expert_form="mlp", activation="gelu_new", bias=True,
                              router_init_std=0.5, **preset))
    theirs = MoE(hidden_size=16, expert=PhiMLP(), num_experts=preset["num_experts"], ep_size=1, k=preset["top_k"],
                 capacity_factor=preset["capacity_factor"], eval_capacity_factor=preset["eval_capacity_factor"],
                 min_capacity=0, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    g = torch.Generator().manual_seed(1)
    favourite = torch.randn(16, generator=g)
    with torch.no_grad():  # most tokens' first choice is expert 0: train-mode capacity (1.5) drops slots
        ours.router.weight[0] += favourite
    theirs.deepspeed_moe.load_state_dict(moe_layer_to_deepspeed(ours, ("fc1", "fc2")))
    x = torch.randn(3, 20, 16, generator=g) + favourite
    result = {}
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = ours(a)
        y, l_aux, _ = theirs(b)
        (out.output * x).sum().backward(), (y * x).sum().backward()
        result[mode] = {"output": _max_diff(out.output, y), "balance": abs(float(out.aux_losses["balance"] - l_aux)),
                        "input_grad": _max_diff(a.grad, b.grad), "dropped": int(out.stats.dropped),
                        "router_grad": _max_diff(ours.router.weight.grad, theirs.deepspeed_moe.gate.wg.weight.grad)}
        ours.zero_grad(), theirs.zero_grad()
    return result


def task_deepspeed(out: Path) -> dict:
    """ZeRO-2 and ZeRO-3 (DeepSpeed's own engine on gloo) vs torch DDP, a tiny sparse zoo LLaVA from the same
    weights on the same batches; and the layer parity above."""
    import zoo
    from zoo.train.data import VQATrainingSet, load_easy_vqa

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = zoo.build("tiny-moe-llava")
    train = load_easy_vqa("train")
    per_step = DS_BATCH * world
    split = type(train)(train.images, train.samples[: DS_STEPS * per_step])
    data = VQATrainingSet(model, split)
    batches = [data.collate([data[i] for i in range(s * per_step + rank * DS_BATCH, s * per_step + (rank + 1) * DS_BATCH)])
               for s in range(DS_STEPS)]
    losses = {engine: _train_losses(engine, copy.deepcopy(model).train(), batches, out)
              for engine in ("ddp", "zero2", "zero3")}
    return {"losses": losses, "layer": _layer_parity()}


TASKS = {"ep_layer": task_ep_layer, "deepspeed": task_deepspeed}


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
