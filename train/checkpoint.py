"""Training checkpoints that never need unpickling: Lightning's checkpoint dict (model, optimizer, scheduler, loop
progress, callback states) stored as ``tensors.safetensors`` (every tensor) + ``state.json`` (everything else, with
tuples, non-string dict keys and tensor references tagged so they come back exactly as they were saved).

A checkpoint is a directory written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one. `PeriodicCheckpoint` writes one every N optimizer
steps and keeps the newest ``keep``; `latest_checkpoint` finds the newest complete one to resume from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO

TENSORS = "tensors.safetensors"
STATE = "state.json"
_MARKERS = ("__tensor__", "__tuple__", "__items__", "__ndarray__")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "checkpoint") -> Any:
    """A JSON-able copy of ``obj``; tensors (and numpy arrays) go into ``tensors`` under generated keys. Raises
    ``TypeError`` naming the path of a value that is neither a tensor, a container nor a JSON scalar."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # a private contiguous copy: tied weights share storage, which safetensors refuses
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{path}.<key>"), encode_tree(v, tensors, f"{path}[{k!r}]")]
                              for k, v in obj.items()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, "
                    "lists, tuples and dicts only)")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def staging_directory(directory: str | Path) -> Path:
    """The temporary directory a checkpoint is written into before `publish` renames it into place (emptied)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a kill during an earlier write
    tmp.mkdir(parents=True)
    return tmp


def write_tree(checkpoint: Mapping[str, Any], directory: Path) -> None:
    """``state.json`` + ``tensors.safetensors`` of ``checkpoint`` into an existing directory, synced to disk."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(dict(checkpoint), tensors)
    save_file(tensors, str(directory / TENSORS))
    (directory / STATE).write_text(json.dumps(tree))
    for name in (TENSORS, STATE):
        _fsync(directory / name)


def publish(tmp: Path, directory: str | Path) -> Path:
    """Rename a fully written `staging_directory` into place (replacing an older checkpoint of that name)."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory


@contextlib.contextmanager
def staged(directory: str | Path):
    """Write a checkpoint directory atomically: yields the `staging_directory` to fill, then `publish`es it. A failed
    write (disk full, ...) raises `zoo.checkpoint.WriteError` naming ``directory``, removes the staging directory and
    leaves earlier checkpoints as they were."""
    from zoo.checkpoint import writing

    directory = Path(directory)
    try:
        with writing(directory):
            tmp = staging_directory(directory)
            yield tmp
            publish(tmp, directory)
    except OSError:
        shutil.rmtree(directory.with_name(directory.name + ".tmp"), ignore_errors=True)
        raise


def save_tree(checkpoint: Mapping[str, Any], directory: str | Path) -> Path:
    """Write ``checkpoint`` as a checkpoint directory, atomically (`staged`)."""
    with staged(directory) as tmp:
        write_tree(checkpoint, tmp)
    return Path(directory)


def load_tree(directory: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint directory written by `save_tree` (no pickle); errors name the missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (TENSORS, STATE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (not a zoo training checkpoint)")
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        tensors = load_file(str(directory / TENSORS), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{directory / TENSORS}: corrupt ({e})") from e
    try:
        tree = json.loads((directory / STATE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / STATE}: corrupt ({e})") from e
    return decode_tree(tree, tensors)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through `save_tree` / `load_tree`: ``trainer.fit(ckpt_path=...)`` resumes from a
    checkpoint directory without unpickling anything."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_tree(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_tree(path, map_location)

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete ``step-NNNNNNNN`` checkpoint in ``directory`` (temporary leftovers are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a ``step-NNNNNNNN`` checkpoint directory was saved after."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a step-NNNNNNNN checkpoint directory")
    return int(match.group(1))


def save_between_steps(trainer: L.Trainer, path: str | Path) -> None:
    """``trainer.save_checkpoint`` from a batch start or the end of training (after the step's metrics row is
    written). Lightning's restart adds one to the loop's count of stepped batches (the logged ``step``), as if the
    save had happened inside the step (``on_train_batch_end``); between steps it has been counted already, so the
    checkpoint records one less (or every row after a resume would be logged one step late)."""
    loop = trainer.fit_loop.epoch_loop
    loop._batches_that_stepped -= 1
    try:
        trainer.save_checkpoint(path, weights_only=False)
    finally:
        loop._batches_that_stepped += 1


class PeriodicCheckpoint(L.Callback):
    """Saves ``directory/step-NNNNNNNN`` every ``every`` optimizer steps (after the step, so the checkpoint holds the
    weights, optimizer and scheduler of that step) and removes all but the newest ``keep``.

    It saves when the next batch starts (or training ends), after Lightning has logged the step's metrics: a kill
    right after a checkpoint (a dead peer makes the others fail in its closing barrier) leaves every row the
    resumed run keeps in ``metrics.csv``."""

    def __init__(self, directory: str | Path, every: int, keep: int = 1):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and keep must be >= 1, got {every} and {keep}")
        self.directory, self.every, self.keep = Path(directory), every, keep
        self._last_saved: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last_saved:
            return  # (with gradient accumulation the step count stays put over the accumulated micro-batches)
        self._last_saved = step
        save_between_steps(trainer, self.directory / f"step-{step:08d}")
        if trainer.is_global_zero:
            done = sorted(p for p in self.directory.iterdir() if _STEP_DIR.match(p.name))
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self._last_saved = trainer.global_step  # a resumed run does not write its own checkpoint again

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        self._save(trainer)


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) random states."""
    import random

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    import random

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """The part of the training state Lightning does not checkpoint: random states, the data position (the
    ``data_position`` of the last batch the module trained on, handed to the dataset's ``load_state_dict``), the
    dataset's skip counter and the per-step losses. Restored when ``trainer.fit(ckpt_path=...)`` loads a checkpoint,
    before the data loader starts iterating."""

    def __init__(self, dataset=None):
        self.dataset = dataset if hasattr(dataset, "load_state_dict") else None
        self.module = None
        self._restore: dict | None = None

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        module = self.module
        data = self.dataset.state_dict(module.data_position) if self.dataset is not None else None
        return {"rng": rng_states(), "data": data, "losses": [float(v) for v in module.losses]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dataset is not None and state["data"] is not None:
            self.dataset.load_state_dict(state["data"])
        self._restore = state

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if self._restore is not None:  # last, so nothing between here and the first step draws random numbers
            module.losses[:] = [torch.tensor(v) for v in self._restore["losses"]]
            set_rng_states(self._restore["rng"])
            self._restore = None


__all__ = ["PeriodicCheckpoint", "ResumeState", "SafetensorsCheckpointIO", "decode_tree", "encode_tree", "latest_checkpoint",
           "load_tree", "publish", "rng_states", "save_between_steps", "save_tree", "set_rng_states", "staged", "staging_directory",
           "write_tree"]
