"""Runs that lose nothing (real `zoo train` processes and real files): owned run directories and their lock, data
sources checked before training, SIGTERM / SIGINT that checkpoint the step reached and resume bitwise, a write that
fails (file-size limit) reported in one line with earlier stages intact, reproducible and verifiable exports."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.checkpoint import CheckpointError
from zoo.train.conversations import Conversation, read_webdataset, write_webdataset
from zoo.train.data import SkipCounter

RECIPES = Path(__file__).parent.parent / "configs" / "recipes"
TINY = ["data.easy-vqa.limit=200", "stages.0.train.steps=2", "stages.1.train.steps=2", "stages.2.train.steps=2"]
TINY += [f"stages.{i}.train.batch_size=8" for i in range(3)]


def _command(run_dir: Path, *overrides: str, recipe: str = "moe-llava-tiny", extra: tuple[str, ...] = ()) -> list:
    args = [sys.executable, "-m", "zoo.cli", "train", str(RECIPES / f"{recipe}.yaml"), "--run-dir", str(run_dir),
            "--no-progress"]
    for item in (*TINY, *overrides):
        args += ["--set", item]
    return args + list(extra)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300, **kwargs)


def _main(args: list, capsys) -> subprocess.CompletedProcess:
    """The same command in this process (the CLI's ``main``; its exit status and what it printed)."""
    from zoo.cli import main

    capsys.readouterr()
    code = main(args[args.index("train"):])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("zoo train:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from zoo.cli import main

    run_dir = tmp_path_factory.mktemp("owned") / "run"
    assert main(_command(run_dir)[3:]) == 0
    return run_dir


def test_a_finished_run_is_refused_resumed_only_with_its_recipe_and_replaced_on_request(finished, capsys):
    before = _hashes(finished)
    refused = _main(_command(finished), capsys)
    assert refused.returncode == 2
    assert re.fullmatch(rf"zoo train: error: {re.escape(str(finished))}: holds a run already \(.*finished stages: "
                        r"00-align, 01-instruct, 02-moe\); continue it with --resume.*", _error_line(refused))
    other = _main(_command(finished, "stages.1.train.lr=0.01", extra=("--resume",)), capsys)
    assert other.returncode == 2
    assert "at stages[1].train.lr: 0.0005 there, 0.01 here" in _error_line(other)
    assert _hashes(finished) == before  # nothing touched
    more = _main(_command(finished, "stages.2.train.steps=3", extra=("--resume",)), capsys)  # extends training
    assert more.returncode == 0, more.stderr[-3000:]
    replaced = _main(_command(finished, extra=("--overwrite",)), capsys)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "--overwrite: removing the earlier run" in replaced.stderr and "00-align" in replaced.stderr
    assert (finished / "02-moe" / "stage.json").exists() and not (finished / "run.lock").exists()


def test_a_second_process_on_the_same_run_directory_is_refused_naming_the_first(tmp_path, capsys):
    """The first run is a process of its own; the second and the take-over run in this process (another pid)."""
    first = subprocess.Popen(_command(tmp_path / "run", "stages.0.train.steps=400"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "run.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.05)
        second = _main(_command(tmp_path / "run", "stages.0.train.steps=400", extra=("--resume",)), capsys)
        assert second.returncode == 2
        assert f"another process trains into this run directory (pid {first.pid} on" in _error_line(second)
    finally:
        first.kill()
        first.wait()
    # the killed holder left its lock: the next run takes it over, with a message
    again = _main(_command(tmp_path / "run", extra=("--overwrite",)), capsys)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the stale lock of pid {first.pid}" in again.stderr


# ------------------------------------------------------------------------------------------ data sources
@pytest.fixture(scope="module")
def shards(tmp_path_factory, easy_vqa):
    folder = tmp_path_factory.mktemp("shards")
    split = easy_vqa["train"]
    samples = [Conversation(s.id, [("user", s.question), ("assistant", s.answer)], [split.images[s.image]])
               for s in split.samples[:40]]
    write_webdataset(samples, str(folder / "train-%05d.tar"), maxcount=10)
    return folder


def _wds_recipe(folder: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "wds.yaml"
    recipe.write_text(f"""name: wds
model: tiny-llava
data:
  shards: {{kind: webdataset, urls: "{folder}/train-{{00000..00003}}.tar"}}
stages:
  - {{name: instruct, template: zoo, trainable: [connector, lm], train: {{steps: 2, batch_size: 4}}}}
""")
    return recipe


def test_a_missing_shard_stops_before_training_naming_it(shards, tmp_path, capsys):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    (folder / "train-00002.tar").unlink()
    result = _main([sys.executable, "-m", "zoo.cli", "train", str(_wds_recipe(folder, tmp_path)), "--run-dir",
                    str(tmp_path / "run"), "--no-progress"], capsys)
    assert result.returncode == 2
    assert _error_line(result) == (f"zoo train: error: data.shards.urls: 1 of 4 shard(s) missing or unreadable, the "
                                   f"first: {folder}/train-00002.tar (missing)")
    assert not (tmp_path / "run" / "00-instruct").exists()  # nothing trained


@pytest.mark.parametrize("truncated", [0, 2])
def test_a_truncated_shard_is_a_skip_named_by_its_own_url(shards, tmp_path, truncated):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    victim = folder / f"train-{truncated:05d}.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    skipped = SkipCounter()
    samples = list(read_webdataset(f"{folder}/train-{{00000..00003}}.tar", skipped=skipped))
    # the shard itself is named (cut mid-member: unreadable data; cut at a member boundary: no end-of-archive marker)
    shard = [r for r in skipped.by_reason if r.startswith(("unreadable shard data", "truncated shard"))]
    assert len(shard) == 1 and skipped.by_reason[shard[0]] == [str(victim)]
    # a record cut in half by the truncation is skipped too, named by its key inside that shard
    assert all(i.startswith(str(victim)) for ids in skipped.by_reason.values() for i in ids)
    assert 30 <= len(samples) < 40  # the three intact shards whole, the truncated one up to the cut


# ------------------------------------------------------------------------------------------ preemption
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from zoo.cli import main

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(_command(run_dir, *PREEMPT)[3:]) == 0
    return load_file(run_dir / "02-moe" / "model" / "model.safetensors")


PREEMPT = ["stages.2.train.steps=40", "stages.2.train.log_every=1"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_a_signal_checkpoints_the_step_reached_and_resume_is_bitwise(tmp_path, uninterrupted, signum, code, capsys):
    """SIGTERM / SIGINT everywhere; SIGUSR1 under SLURM, where the job is also requeued (a ``scontrol`` on PATH that
    records its arguments stands in for SLURM's, which this machine does not have)."""
    run_dir, env = tmp_path / "run", _env()
    if signum == signal.SIGUSR1:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        scontrol = bin_dir / "scontrol"
        scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
        scontrol.chmod(0o755)
        env.update(SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    victim = subprocess.Popen(_command(run_dir, *PREEMPT), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "02-moe" / "metrics.csv"
    deadline = time.monotonic() + 240
    while not metrics.exists() or metrics.read_text().count("\n") < 4:
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()[-3000:]
        time.sleep(0.05)
    victim.send_signal(signum)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == code, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("zoo train:")]
    then = r"requeued SLURM job 4242" if signum == signal.SIGUSR1 else r"resume with: zoo train .* --resume"
    step = int(re.fullmatch(rf"zoo train: interrupted \(SIG\w+\) at step (\d+) of stage moe; {then}", line).group(1))
    if signum == signal.SIGUSR1:
        assert (tmp_path / "scontrol.args").read_text() == "requeue 4242\n"
    assert 3 <= step < 40 and (run_dir / "02-moe" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not (run_dir / "02-moe" / "stage.json").exists()
    resumed = _main(_command(run_dir, *PREEMPT, extra=("--resume",)), capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = load_file(run_dir / "02-moe" / "model" / "model.safetensors")
    assert got.keys() == uninterrupted.keys()
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got)


# ------------------------------------------------------------------------------------------ write errors
def test_a_file_size_limit_fails_the_export_in_one_line_and_resume_finishes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # the dense exports (3.1 MB) fit under the limit, the upcycled model's (4.3 MB) does not
    limit = 3_800_000

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = _run(_command(run_dir), preexec_fn=limited)
    assert failed.returncode == 1, failed.stderr[-3000:]
    export = run_dir / "02-moe" / "model" / "model.safetensors"
    assert _error_line(failed) == f"zoo train: error: {export}: cannot write (File too large)"
    assert not export.exists() and not (run_dir / "02-moe" / "stage.json").exists()
    earlier = {d: _hashes(run_dir / d) for d in ("00-align", "01-instruct")}
    resumed = _main(_command(run_dir, extra=("--resume",)), capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {d: _hashes(run_dir / d) for d in earlier} == earlier
    assert zoo.load(run_dir / "02-moe" / "model", verify=True).config.lm.sparsity is not None


def test_identical_runs_write_identical_exports_and_verify_names_a_flipped_byte(finished, tmp_path, capsys):
    again = tmp_path / "again"
    result = _main(_command(again), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("00-align", "01-instruct", "02-moe"):
        for name in ("model.safetensors", "config.json", "checksums.json"):
            assert (finished / stage / "model" / name).read_bytes() == (again / stage / "model" / name).read_bytes()
    import json

    recorded = json.loads((again / "run.json").read_text())["stages"]["moe"]["export_sha256"]
    weights = again / "02-moe" / "model" / "model.safetensors"
    assert recorded["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: sha256 {actual} does not match "
                                              rf"{recorded['model.safetensors']} recorded in checksums.json"):
        zoo.load(again / "02-moe" / "model", verify=True)
