"""Training past one process, as real gloo processes running `zoo train` (scale_out.md section 4; the runs are
tests/distributed_worker.py `run_all`): one tiny sparse LLaVA recipe (tiny-moe-llava, dropless, 6 steps of a global
batch of 16) trained with

- ``ddp`` on 2 processes (the reference) and ``fsdp`` (FSDP2): the same losses within 1e-5;
- ``fsdp`` whose rank 1 is killed after the step-3 checkpoint: rank 0 stops by itself within ``train.timeout`` with
  an error naming rank 1 and the checkpoint is intact; resumed on 2 processes it ends bitwise where the
  uninterrupted run ends, resumed in 1 process (batch 16) it continues with the same losses;
- ``expert_parallel: 2`` with ddp on two torchrun "nodes" (``num_nodes: 2``) and with fsdp on 4 processes (2 x 2):
  the losses of ddp, E/2 experts per rank, one export with every expert that `zoo.load` reads in one process and
  that answers as the ddp model does; the two-node run writes once, from rank 0;
- the planner (`zoo.plan`) predicts exactly the parameter, gradient and optimizer bytes each rank held.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from distributed_worker import STEPS, TIMEOUT
from safetensors.torch import load_file

import zoo


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "00-moe" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def _gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "00-moe" / "model" / "model.safetensors")


def test_fsdp_trains_like_ddp(distributed):
    root = distributed["root"]
    ddp, fsdp = _losses(root / "ddp"), _losses(root / "fsdp")
    assert ddp[-1] < ddp[0] - 0.5  # it trains: the comparison is over changing weights
    assert _gap(fsdp, ddp) < 1e-5, (fsdp, ddp)
    a, b = _weights(root / "ddp"), _weights(root / "fsdp")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_dead_rank_stops_the_others_naming_it_and_the_checkpoint_survives(distributed):
    death = distributed["death"]
    assert death["returncode"] != 0 and not death["finished"]
    assert death["seconds"] < TIMEOUT  # it stopped by itself, within train.timeout
    last = death["stderr"].strip().splitlines()[-1]
    assert "rank 1 stopped responding" in last and f"train.timeout {TIMEOUT} s" in last, last
    assert death["latest"] == "step-00000003" and death["global_step"] == 3  # intact: it loads
    assert len(death["shards"]) == 2  # each rank's safetensors shard file


def test_resumed_fsdp_run_ends_bitwise_where_the_uninterrupted_one_ends(distributed):
    root = distributed["root"]
    got, want = _weights(root / "killed"), _weights(root / "fsdp")
    assert got.keys() == want.keys()
    assert not [k for k in want if not torch.equal(got[k], want[k])]
    assert _losses(root / "killed") == _losses(root / "fsdp")


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_losses(distributed):
    root = distributed["root"]
    one, fsdp = _losses(root / "killed-one"), _losses(root / "fsdp")
    assert one[:3] == fsdp[:3]  # the rows logged before the checkpoint, kept
    assert _gap(one, fsdp) < 1e-5, (one, fsdp)


@pytest.mark.parametrize("run,world", [("ep-nodes", 2), ("ep-fsdp", 4)])
def test_expert_parallel_trains_like_ddp_and_exports_every_expert(distributed, run, world):
    root = distributed["root"]
    ddp, ep = _losses(root / "ddp"), _losses(root / run)
    assert _gap(ep, ddp) < 1e-5, (ep, ddp)
    memory = json.loads((root / run / "00-moe" / "memory.json").read_text())
    assert memory["expert_parallel"] == 2 and memory["world_size"] == world
    weights, reference = _weights(root / run), _weights(root / "ddp")
    experts = [k for k in weights if k.endswith("experts.w_in")]
    assert experts and all(weights[k].shape[0] == 4 for k in experts)  # all E experts gathered into the export
    if world == 2:  # the same micro-batches as ddp (on 4 ranks the per-rank balance losses differ a little)
        assert max(float((weights[k] - reference[k]).abs().max()) for k in weights) < 1e-5


@pytest.mark.parametrize("run,share", [("ep-nodes", 2), ("ep-fsdp", 2), ("fsdp", 2), ("ddp", 1)])
def test_each_rank_holds_its_share_of_the_routed_experts(distributed, run, share):
    """E/2 experts per rank with expert_parallel 2 (replicated over the expert-data-parallel ranks under fsdp on 4);
    counted on every rank of the run."""
    from zoo.moe.parallel import expert_banks

    whole = sum(p.numel() for bank in expert_banks(zoo.build("tiny-moe-llava")).values() for p in bank.parameters())
    held = json.loads((distributed["root"] / run / "00-moe" / "memory.json").read_text())["ranks"]
    assert whole > 0 and [r["routed_expert_elements"] for r in held] == [whole // share] * len(held)


def test_expert_parallel_export_loads_in_one_process_and_answers_as_the_ddp_model(distributed, easy_vqa):
    test = easy_vqa["test"]
    images = [test.images[s.image] for s in test.samples[:6]]
    questions = [s.question for s in test.samples[:6]]
    ep = zoo.load(str(distributed["root"] / "ep-fsdp" / "00-moe" / "model"))
    ddp = zoo.load(str(distributed["root"] / "ddp" / "00-moe" / "model"))
    assert ep.answer(images, questions, max_new_tokens=3) == ddp.answer(images, questions, max_new_tokens=3)


def test_two_node_run_writes_once_from_rank_0(distributed):
    stage = distributed["root"] / "ep-nodes" / "00-moe"
    assert (stage / "model" / "model.safetensors").is_file() and (stage / "stage.json").is_file()
    with open(stage / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(STEPS))  # one row per step: only rank 0 logs
    assert not (stage / "checkpoints").exists()


@pytest.mark.parametrize("run,strategy,world,ep", [("ddp", "ddp", 2, 1), ("fsdp", "fsdp", 2, 1),
                                                    ("ep-nodes", "ddp", 2, 2), ("ep-fsdp", "fsdp", 4, 2)])
def test_planner_bytes_equal_what_each_rank_held(distributed, run, strategy, world, ep):
    from zoo.plan import plan_memory
    from zoo.train.recipe import build_model, load_recipe, set_trainable

    recipe = load_recipe(distributed["recipe"])
    model = build_model(recipe)
    set_trainable(model, recipe.stages[0].trainable)
    plan = plan_memory(model, world, strategy, ep, precision="32-true")
    held = json.loads((distributed["root"] / run / "00-moe" / "memory.json").read_text())["ranks"]
    assert [r.held() for r in plan.ranks] == [{k: r[k] for k in ("parameters", "gradients", "optimizer")}
                                              for r in held]
