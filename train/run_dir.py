"""Run directories that are owned: a run directory holds one run of one recipe, and one process trains into it.

* A directory that already holds a run (``recipe.yaml``, ``run.json`` or a stage folder) is refused unless the run
  is resumed (``--resume``: the recipe must be the run's own; fields that only extend training, such as more
  steps, may change; so may the number of processes, if the global batch stays: a 2-process run resumes in one) or
  replaced (``--overwrite``: the run's files are removed, and the message lists them).
* ``run.lock`` names the process that trains into the directory (pid, host, start time); a second process is
  refused, naming it. A lock whose process is gone (same host, pid not running) is stale and taken over, with a
  message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from zoo.config import ConfigError

log = logging.getLogger(__name__)

LOCK = "run.lock"
RUN_FILES = ("recipe.yaml", "run.json", "features", "model", "results.json")  # with the NN-name stage folders
_STAGE_DIR = re.compile(r"^\d{2}-.+$")
# resolved-recipe fields a resumed run may change: they extend training or only change how it is watched
EXTENDING = (re.compile(r"^stages\[\d+\]\.train\.(steps|checkpoint_every|log_every|num_workers)$"),
             re.compile(r"^description$"))


class RunDirError(ConfigError):
    """A run directory cannot be used as asked (it holds another run, another process trains into it, ...)."""


def run_files(run_dir: Path) -> list[Path]:
    """The files and folders of a run in ``run_dir`` (what ``--overwrite`` removes), sorted."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name in RUN_FILES or (p.is_dir() and _STAGE_DIR.match(p.name)))


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first field (``stages[2].train.lr``) where two resolved recipe mappings differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def check_resumable(stored: dict, recipe: dict, where: Path) -> None:
    """Refuse to resume a run with a recipe that differs from the stored one, except in `EXTENDING` fields (and a
    ``steps`` field only upwards); the error names the first field that differs."""
    remaining = json.loads(json.dumps(recipe))  # compared after dropping the allowed differences, one by one
    _same_global_batch(stored, remaining)
    while (found := first_difference(stored, remaining)) is not None:
        path, old, new = found
        if not any(rule.match(path) for rule in EXTENDING) or (path.endswith(".steps") and new < old):
            raise RunDirError(f"--resume: the recipe differs from the run's ({where}) at {path}: {old!r} there, "
                              f"{new!r} here; resume with the run's recipe, or start a new run directory")
        _set(remaining, path, old)


LAYOUT = ("batch_size", "devices", "num_nodes", "expert_parallel", "timeout")  # how a stage's global batch is spread


def _same_global_batch(stored: dict, recipe: dict) -> None:
    """A resumed stage may run on another number of processes (checkpoints reshard): where the global batch
    (``batch_size`` x ``devices`` x ``num_nodes``) is unchanged, take the stored `LAYOUT` fields into ``recipe``."""
    def global_batch(train: dict) -> Any:
        devices = train.get("devices", 1)
        return train.get("batch_size", 1) * devices * train.get("num_nodes", 1) if isinstance(devices, int) else None

    for old, new in zip(stored.get("stages") or [], recipe.get("stages") or []):
        a, b = (old or {}).get("train") or {}, (new or {}).get("train") or {}
        if a and b and global_batch(a) is not None and global_batch(a) == global_batch(b):
            b.update({k: a[k] for k in LAYOUT if k in a})


def _set(data: Any, path: str, value: Any) -> None:
    parts = re.findall(r"[^.\[\]]+", path)
    for part in parts[:-1]:
        data = data[int(part)] if isinstance(data, list) else data[part]
    last = parts[-1]
    if isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``run.lock`` in a run directory, created atomically; `release` removes it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == me["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    log.warning("%s: taking over the stale lock of pid %s on %s (no longer running)", self.path,
                                holder["pid"], holder["host"])
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                    continue
                raise RunDirError(f"{self.path.parent}: another process trains into this run directory (pid "
                                  f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                                  f"{holder.get('started', '?')}); wait for it, or use another --run-dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the lock")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def claim(run_dir: Path, recipe: dict, resume: bool, overwrite: bool) -> RunLock:
    """Take ``run_dir`` for a run of ``recipe`` (its resolved mapping): lock it, then refuse, resume-check or clear an
    earlier run as the flags say. Returns the held lock (release it when the run ends)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite: give one (resume the run, or replace it)")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        existing = run_files(run_dir)
        if existing and overwrite:
            log.warning("--overwrite: removing the earlier run in %s: %s", run_dir, ", ".join(p.name for p in existing))
            for path in existing:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif existing and resume and (run_dir / "recipe.yaml").is_file():
            import yaml

            check_resumable(yaml.safe_load((run_dir / "recipe.yaml").read_text()), recipe, run_dir / "recipe.yaml")
        elif existing and not resume:
            done = [p.name for p in existing if (p / "stage.json").is_file()]
            raise RunDirError(f"{run_dir}: holds a run already ({', '.join(p.name for p in existing)}"
                              f"{'; finished stages: ' + ', '.join(done) if done else ''}); continue it with "
                              "--resume, replace it with --overwrite, or choose another --run-dir")
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["LOCK", "RunDirError", "RunLock", "check_resumable", "claim", "first_difference", "run_files"]
