"""Exact resume (zoo.train.checkpoint): a `zoo train` process killed with SIGKILL in the middle of a stage, resumed
with --resume, ends with bitwise the weights of an uninterrupted run; checkpoints hold no pickle and survive a kill
in the middle of a write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.train.checkpoint import latest_checkpoint, load_tree, save_tree

RECIPE = Path(__file__).parent.parent / "configs" / "recipes" / "moe-llava-tiny.yaml"
# three stages (align, instruct, then upcycle + MoE-tune) cut to a few steps of small batches
OVERRIDES = ["data.easy-vqa.limit=400", "stages.0.train.steps=3", "stages.1.train.steps=3",
             "stages.2.train.steps=14", "stages.2.train.checkpoint_every=2", "stages.2.train.log_every=1"]
for stage in range(3):
    OVERRIDES.append(f"stages.{stage}.train.batch_size=8")


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "zoo.cli", "train", str(RECIPE), "--run-dir", str(run_dir), "--no-progress"]
    for item in OVERRIDES:
        args += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args + list(extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def test_sigkill_mid_stage_then_resume_gives_bitwise_the_uninterrupted_weights(tmp_path):
    reference = _train(tmp_path / "reference")  # runs alongside the one that gets killed
    killed_dir = tmp_path / "killed"
    victim = _train(killed_dir)
    checkpoints = killed_dir / "02-moe" / "checkpoints"
    deadline = time.monotonic() + 240
    while (latest_checkpoint(checkpoints) is None or latest_checkpoint(checkpoints).name < "step-00000006"):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "02-moe" / "stage.json").exists()  # killed in the middle of the stage
    _finish(_train(killed_dir, "--resume"))
    _finish(reference)

    got = load_file(killed_dir / "02-moe" / "model" / "model.safetensors")
    want = load_file(tmp_path / "reference" / "02-moe" / "model" / "model.safetensors")
    assert got.keys() == want.keys() and any("experts" in k for k in got)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    stats = [json.loads((d / "run.json").read_text())["stages"]["moe"] for d in (killed_dir, tmp_path / "reference")]
    assert stats[0]["loss_last_fifth"] == stats[1]["loss_last_fifth"]  # the loss history survived the kill too
    assert not checkpoints.exists()  # a finished stage drops its checkpoints
    # the steps logged between the last checkpoint and the kill are logged again after resuming, once
    metrics = [(d / "02-moe" / "metrics.csv").read_text() for d in (killed_dir, tmp_path / "reference")]
    assert metrics[0] == metrics[1] and metrics[0].count("\n") == 15  # header + 14 steps


def test_checkpoint_tree_round_trips_exactly_without_pickle(tmp_path):
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None}]},
             "rng": (3, tuple(range(5)), None), "weights": {"a": torch.arange(4), "tied": torch.arange(4)[:2]},
             "__tensor__": "a key that looks like a marker"}
    save_tree(state, tmp_path / "step-00000001")
    back = load_tree(tmp_path / "step-00000001")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints (the optimizer maps them to parameters)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["rng"] == state["rng"] and back["__tensor__"] == state["__tensor__"]
    assert torch.equal(back["weights"]["tied"], torch.arange(2))
    assert sorted(p.name for p in (tmp_path / "step-00000001").iterdir()) == ["state.json", "tensors.safetensors"]
    with pytest.raises(TypeError, match=r"checkpoint\.bad: cannot store a object"):
        save_tree({"bad": object()}, tmp_path / "step-00000002")


def test_a_write_killed_halfway_leaves_the_previous_checkpoint(tmp_path):
    save_tree({"x": torch.ones(2)}, tmp_path / "step-00000002")
    half = tmp_path / "step-00000004.tmp"  # what a kill during the next write leaves behind
    half.mkdir()
    (half / "tensors.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    save_tree({"x": torch.zeros(2)}, tmp_path / "step-00000004")
    assert latest_checkpoint(tmp_path).name == "step-00000004" and not half.exists()
