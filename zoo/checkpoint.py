"""Zoo checkpoints: ``config.json`` + ``model.safetensors`` (+ tokenizer files). Never pickle.

Loading checks every tensor by name and shape against the model built from ``config.json`` and names the file
and the tensor on any mismatch; a truncated or corrupt file is reported with its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zoo.config import ConfigError, ModelConfig
from zoo.errors import UserError

if TYPE_CHECKING:
    from zoo.model import ZooModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config; names the file/tensor."""


def save_checkpoint(model: ZooModel, directory: str | Path) -> Path:
    """Write `model` to `directory` atomically per file (a crash never leaves a half-written file in place)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.resolved_config().to_dict()
    config["zoo_format"] = FORMAT_VERSION
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "zoo_format": str(FORMAT_VERSION)})
    os.replace(tmp, directory / WEIGHTS_NAME)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
        _keep_legacy_flag(model.tokenizer, directory)
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
        path.write_text(json.dumps({**config, "legacy": legacy}, indent=2, ensure_ascii=False) + "\n")


def read_checkpoint_config(directory: Path) -> ModelConfig:
    """Read and strictly validate ``config.json`` of a checkpoint directory."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a zoo checkpoint directory)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
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
