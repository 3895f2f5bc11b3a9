"""Data parallelism by name (train.strategy: ddp): two gloo processes on CPU with half the batch each train exactly
like one process with the whole global batch (losses within 1e-5 at every step)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

from zoo.train.recipe import load_recipe, run_recipe

STEPS = 5
RECIPE = {
    "name": "ddp-check", "model": "tiny-llava",
    "data": {"easy-vqa": {"kind": "easy-vqa", "limit": 300}},
    "stages": [{"name": "instruct", "trainable": ["connector", "lm"],
                "train": {"steps": STEPS, "batch_size": 16, "lr": 2.0e-3, "log_every": 1}}],
}


def _losses(stage_dir: Path) -> list[float]:
    with open(stage_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "zoo.cli", "train", str(path), "--run-dir", str(tmp_path / "ddp"), "--no-progress",
            "--set", "stages.0.train.strategy=ddp", "--set", "stages.0.train.devices=2",
            "--set", "stages.0.train.batch_size=8"]  # per rank: 2 x 8 = the single process's 16
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_recipe(load_recipe(path), tmp_path / "single", progress=False)

    ddp, single = _losses(tmp_path / "ddp" / "00-instruct"), _losses(tmp_path / "single" / "00-instruct")
    assert len(ddp) == len(single) == STEPS
    assert single[-1] < single[0] - 0.1  # it trains: the comparison is over changing weights
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-5, (ddp, single)
