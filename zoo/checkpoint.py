"""Zoo checkpoints: ``config.json`` + ``model.safetensors`` (+ tokenizer files) + ``checksums.json``. Never pickle.

Loading checks every tensor by name and shape against the model built from ``config.json`` and names the file
and the tensor on any mismatch; a truncated or corrupt file is reported with its path. Exports are reproducible
files: the same weights give byte-identical safetensors (tied names stored once, under the first name in sorted
order; one metadata entry, so no hash-map order in the header), and ``checksums.json`` records the sha256 of each
file, which ``load_weights(..., verify=True)`` (``zoo.load(..., verify=True)``) checks. A write that fails (disk
full, permission, read-only file system, file-size limit) raises `WriteError` naming the path; files already in
place stay as they were (each file is written under a temporary name and renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from zoo.config import ConfigError, ModelConfig
from zoo.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config; names the file/tensor."""


class WriteError(UserError, OSError):
    """Writing a file failed (no space left, no permission, read-only file system, file too large); the message is
    one line: the path and the system's reason."""

    exit_code = 1  # not a mistake in what the user gave, but the command still ends with this one line


@contextlib.contextmanager
def writing(path: str | Path, cleanup: str | Path | None = None):
    """Turn an ``OSError`` raised by the block into a `WriteError` naming ``path``; ``cleanup``: a temporary file
    to remove when that happens (the half-written one)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        number = _os_error_number(e)
        if number is None:
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                os.remove(cleanup)
        reason = getattr(e, "strerror", None) or (os.strerror(number) if number > 0 else str(e))
        error = WriteError(f"{path}: cannot write ({reason})")  # one argument: str() is the message alone
        error.errno = number
        raise error from e


def _os_error_number(error: Exception) -> int | None:
    """The errno of an OSError, or of the I/O error safetensors reports in its own exception ("I/O error: ...
    (os error 28)"); None for other exceptions."""
    if isinstance(error, OSError):
        return error.errno or -1
    if type(error).__name__ == "SafetensorError" and "I/O error" in str(error):
        match = re.search(r"os error (\d+)", str(error))
        return int(match.group(1)) if match else -1
    return None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place; failures are `WriteError`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, cleanup=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) once, under its first name in sorted order, contiguous
    (a deterministic choice: the same weights always give the same file)."""
    state = model.state_dict()
    kept: dict[tuple, str] = {}
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in kept:
            continue
        kept[key] = name
    return {name: state[name].contiguous() for name in sorted(kept.values())}


class SavableModel(Protocol):
    """What `save_checkpoint` needs of a model: its tensors, the config that rebuilds it and its tokenizer (or None).
    `zoo.model.ZooModel` is one; this module sits below the model (which saves and loads through it)."""

    tokenizer: Any

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def resolved_config(self) -> ModelConfig: ...


def save_checkpoint(model: SavableModel, directory: str | Path) -> Path:
    """Write `model` to `directory` atomically per file (a crash never leaves a half-written file in place), with
    ``checksums.json`` (sha256 per file). The same weights and config give byte-identical files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    config = model.resolved_config().to_dict()
    config["zoo_format"] = FORMAT_VERSION
    write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    weights, tmp = directory / WEIGHTS_NAME, directory / (WEIGHTS_NAME + ".tmp")
    with writing(weights, cleanup=tmp):
        save_file(unique_tensors(model), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, weights)
    if model.tokenizer is not None:
        with writing(directory):
            model.tokenizer.save_pretrained(directory)
        _keep_legacy_flag(model.tokenizer, directory)
    write_checksums(directory, [CONFIG_NAME, WEIGHTS_NAME])
    return directory


def _keep_legacy_flag(tokenizer, directory: Path) -> None:
    """transformers 5 leaves a Llama tokenizer's ``legacy`` setting out of the ``tokenizer_config.json`` it saves and
    reloads it as ``legacy=False``, which tokenizes the text after a special token differently (LLaVA-1.5's vicuna
    tokenizer is legacy: ``<image>`` then ``\n`` gives ``▁ <0x0A>``, LLaVA's own prompt ids). Write it back."""
    legacy = getattr(tokenizer, "legacy", None)
    path = directory / "tokenizer_config.json"
    if legacy is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("legacy") != legacy:
        write_text_atomic(path, json.dumps({**config, "legacy": legacy}, indent=2, ensure_ascii=False) + "\n")


def write_checksums(directory: Path, names: list[str]) -> None:
    """``checksums.json``: the sha256 of each of ``names`` (paths relative to ``directory``), written atomically."""
    write_text_atomic(directory / CHECKSUMS_NAME, json.dumps(
        {name: sha256_of(directory / name) for name in names}, indent=2) + "\n")


@contextlib.contextmanager
def staged_directory(directory: str | Path):
    """For writers that write a whole directory themselves (transformers' ``save_pretrained``): yields a staging
    directory beside ``directory``; once the block is done each file is renamed into ``directory`` (so no file there
    is ever half-written, as with `save_checkpoint`) and ``checksums.json`` lists them all. Failures are
    `WriteError`; the staging directory is removed either way."""
    import shutil

    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    with writing(directory):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        with writing(directory):
            yield staging
        names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                       if p.is_file() and p.name != CHECKSUMS_NAME)
        for name in names:
            target = directory / name
            with writing(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target)
        write_checksums(directory, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: Path, missing: str) -> dict:
    """The JSON object in ``path``; `CheckpointError` naming the file when it is absent (``missing`` says what that
    means) or not valid JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def verify_checksums(directory: str | Path) -> None:
    """Check the files listed in ``checksums.json`` against their sha256; a mismatch names the file and both
    hashes, a missing list is an error too (the export predates checksums, or is not a zoo export)."""
    directory = Path(directory)
    expected = _read_json(directory / CHECKSUMS_NAME, "missing, so the export cannot be verified")
    for name, digest in expected.items():
        actual = sha256_of(directory / name) if (directory / name).is_file() else "(missing)"
        if actual != digest:
            raise CheckpointError(f"{directory / name}: sha256 {actual} does not match {digest} recorded in "
                                  f"{CHECKSUMS_NAME}")


def read_checkpoint_config(directory: Path) -> ModelConfig:
    """Read and strictly validate ``config.json`` of a checkpoint directory."""
    path = directory / CONFIG_NAME
    data = _read_json(path, "missing (not a zoo checkpoint directory)")
    version = data.pop("zoo_format", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: zoo_format {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` into `model`, checking names and shapes; tied tensors may be stored once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        stored = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    expected = model.state_dict()
    for name, tensor in stored.items():
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {name!r} is not in the model built from {CONFIG_NAME}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(expected[name].shape)}")
    # A tensor shared by several names (tied embeddings) is stored under one of them.
    by_storage: dict[tuple[int, int], list[str]] = {}
    for name, tensor in expected.items():
        by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    missing = [
        names[0] for names in by_storage.values()
        if not any(n in stored for n in names) and any(expected[n].numel() for n in names)
    ]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(sorted(missing)[:10])}"
                              f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    model.load_state_dict(stored, strict=False)
