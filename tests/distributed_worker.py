"""The multi-process runs of the test suite, shared by the tests that assert on them (conftest's ``distributed``
fixture calls `run_all` once per session): each launch costs every process the ~10 s import of the stack, so one
launch serves many checks.

`run_all` runs, in a fresh directory:

1. ``killed``: `zoo train` of `RECIPE` with ``fsdp`` on 2 processes started as torchrun would start them, rank 1
   killed (SIGKILL) once the step-3 checkpoint exists; rank 0 must stop by itself;
2. two torchrun "nodes" of one process each (``--nnodes 2``, static rendezvous on a free port) running this file as
   the worker of ``plan.json``: `zoo train` with ``ddp`` (the reference), ``fsdp``, ``fsdp --resume`` of the killed
   run, ``ddp`` + ``expert_parallel: 2``; then the tasks ``ep_layer`` and ``deepspeed`` below;
3. ``ep-fsdp``: `zoo train` with ``fsdp`` + ``expert_parallel: 2`` on 4 processes (2 x 2), with gradient
   checkpointing (recomputed FSDP units);
4. ``killed-one``: the killed run resumed in this process (1 rank, the same global batch).

Worker tasks (each rank writes ``OUT/<task>.rank<r>.json``):

- ``ep_layer``: scale_out.md section 4 for one MoE layer per router kind and a MoE connector: expert parallelism
  over all ranks vs each rank running its own micro-batch through the whole layer.
- ``deepspeed``: a tiny sparse zoo LLaVA trained under ``deepspeed.initialize`` (ZeRO-2, ZeRO-3, MoE-LLaVA's
  zero2.json read by `zoo.train.deepspeed`) vs torch DDP on the same batches, and the zoo ``moe-llava`` layer vs
  ``deepspeed.moe.layer.MoE`` on the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
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
    weight = torch.randn(3, 20, 16, generator=g)
    result = {}
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = ours(a)
        y, l_aux, _ = theirs(b)
        ((out.output * weight).sum() + out.aux_losses["balance"]).backward(), ((y * weight).sum() + l_aux).backward()
        router = (ours.router.weight.grad, theirs.deepspeed_moe.gate.wg.weight.grad)
        result[mode] = {"output": _max_diff(out.output, y), "balance": abs(float(out.aux_losses["balance"] - l_aux)),
                        "input_grad": _max_diff(a.grad, b.grad) / max(1.0, float(b.grad.abs().max())),
                        "router_grad": _max_diff(*router) / max(1.0, float(router[1].abs().max())),
                        "dropped": int(out.stats.dropped)}  # gradients: relative to the largest entry above 1
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
    samples = train.samples[: DS_STEPS * per_step]
    used = sorted({s.image for s in samples})  # only these images are decoded and preprocessed
    split = type(train)([train.images[i] for i in used],
                        [dataclasses.replace(s, image=used.index(s.image)) for s in samples])
    data = VQATrainingSet(model, split)
    batches = [data.collate([data[i] for i in range(s * per_step + rank * DS_BATCH, s * per_step + (rank + 1) * DS_BATCH)])
               for s in range(DS_STEPS)]
    losses = {engine: _train_losses(engine, copy.deepcopy(model).train(), batches, out)
              for engine in ("ddp", "zero2", "zero3")}
    return {"losses": losses, "layer": _layer_parity()}


TASKS = {"ep_layer": task_ep_layer, "deepspeed": task_deepspeed}


STEPS, BATCH = 6, 16  # the global batch: 8 per rank on 2 processes, 4 on 4, 16 in one
TIMEOUT = 20  # train.timeout (seconds) of the run whose rank 1 dies
RECIPE = {
    "name": "parallel-check", "model": "tiny-moe-llava",
    # dropless routing: the global batch is split differently over 1, 2 and 4 processes (scale_out.md section 4)
    "model_overrides": ["lm.sparsity.moe={capacity_factor: null, eval_capacity_factor: null}"],
    "data": {"easy-vqa": {"kind": "easy-vqa", "limit": 300}},
    "stages": [{"name": "moe", "trainable": ["connector", "lm"],
                "train": {"steps": STEPS, "batch_size": BATCH // 2, "lr": 2.0e-3, "log_every": 1,
                          "checkpoint_every": 3}}],
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(recipe: Path, run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    """``zoo`` arguments of one `zoo train` run; ``overrides`` set ``stages.0.train.<key>=<value>``."""
    argv = ["train", str(recipe), "--run-dir", str(run_dir), "--no-progress"] + ["--resume"] * resume
    for item in overrides:
        argv += ["--set", f"stages.0.train.{item}"]
    return argv


def _check(done: subprocess.CompletedProcess | tuple, what: str) -> None:
    code, err = (done.returncode, done.stderr) if isinstance(done, subprocess.CompletedProcess) else done
    assert code == 0, f"{what} failed:\n{err[-4000:]}"


def kill_rank_1_after_step_3(recipe: Path, run_dir: Path) -> dict:
    """Two ranks started as torchrun would start them (no agent that would stop the survivor); rank 1 gets SIGKILL
    as soon as the step-3 checkpoint exists."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
        args = [sys.executable, "-m", "zoo.cli",
                *train_argv(recipe, run_dir, "strategy=fsdp", "devices=2", f"timeout={TIMEOUT}")]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    checkpoint = run_dir / "00-moe" / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step-3 checkpoint appeared"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=TIMEOUT + 120)
    procs[1].wait()
    return {"returncode": procs[0].returncode, "seconds": time.monotonic() - killed, "stderr": err,
            "finished": (run_dir / "00-moe" / "stage.json").exists()}


def launch_nodes(out: Path, plan: list[dict], timeout: float = 900) -> None:
    """This file as the worker of ``plan`` on two torchrun "nodes" of one process each (static rendezvous)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               __file__, str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for node in (0, 1)]
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    for node, (p, err) in enumerate(zip(procs, errors)):
        _check((p.returncode, err), f"node {node}")


def results(out: Path, task: str, nproc: int) -> list[dict]:
    return [json.loads((out / f"{task}.rank{r}.json").read_text()) for r in range(nproc)]


def run_all(root: Path) -> dict:
    """Every run of the module docstring, in order; returns their directories, the death report, the worker
    results and the wall time of each launch."""
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps(RECIPE))
    seconds = {}
    start = time.monotonic()
    death = kill_rank_1_after_step_3(recipe, root / "killed")
    checkpoint = root / "killed" / "00-moe" / "checkpoints" / "step-00000003"
    from zoo.train.checkpoint import latest_checkpoint, load_tree

    death["latest"] = latest_checkpoint(checkpoint.parent).name
    death["global_step"] = load_tree(checkpoint)["global_step"]  # intact: it loads (before a resume removes it)
    death["shards"] = sorted(p.name for p in (checkpoint / "shards").iterdir())
    shutil.copytree(root / "killed", root / "killed-one")
    seconds["killed (2 processes)"] = time.monotonic() - start
    nodes = ["devices=1", "num_nodes=2"]
    plan = [{"train": train_argv(recipe, root / "ddp", "strategy=ddp", *nodes)},
            {"train": train_argv(recipe, root / "fsdp", "strategy=fsdp", *nodes)},
            {"train": train_argv(recipe, root / "killed", "strategy=fsdp", *nodes, resume=True)},
            {"train": train_argv(recipe, root / "ep-nodes", "strategy=ddp", "expert_parallel=2", *nodes)},
            {"task": "ep_layer"}, {"task": "deepspeed"}]
    start = time.monotonic()
    launch_nodes(root / "worker", plan)
    seconds["2 torchrun nodes: ddp, fsdp, resume, EP + ddp, ep_layer, deepspeed"] = time.monotonic() - start
    start = time.monotonic()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "zoo.cli",
            *train_argv(recipe, root / "ep-fsdp", "strategy=fsdp", "devices=4", "expert_parallel=2",
                        f"batch_size={BATCH // 4}", "gradient_checkpointing=true")]
    _check(subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600), "ep-fsdp (4 processes)")
    seconds["EP + fsdp (4 processes)"] = time.monotonic() - start
    start = time.monotonic()
    resume_in_this_process(recipe, root / "killed-one")
    seconds["resume in 1 process (in the test process)"] = time.monotonic() - start
    return {"root": root, "recipe": recipe, "death": death, "seconds": seconds,
            "ep_layer": results(root / "worker", "ep_layer", 2), "deepspeed": results(root / "worker", "deepspeed", 2)}


def resume_in_this_process(recipe: Path, run_dir: Path) -> None:
    """`zoo train --resume` of a 2-process checkpoint here, as one rank with the whole global batch (fsdp over a
    1-rank process group, which is then taken down again)."""
    from zoo.cli import main as zoo_main

    try:
        assert zoo_main(train_argv(recipe, run_dir, "strategy=fsdp", "devices=1", f"batch_size={BATCH}",
                                   resume=True)) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """Worker: run ``OUT/plan.json`` (``{"train": zoo arguments}`` or ``{"task": name}`` items) on every rank."""
    from zoo.cli import main as zoo_main

    out = Path(sys.argv[1])
    plan = json.loads((out / "plan.json").read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    for item in plan:
        if "train" in item:
            assert zoo_main(item["train"]) == 0
            continue
        result = TASKS[item["task"]](out)
        (out / f"{item['task']}.rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
