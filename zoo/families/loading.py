"""Building and loading transformers-native models: from a catalogue config, from a transformers checkpoint."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from zoo.config import ConfigError, LoRAExpertConfig, ModelConfig, SparsityConfig, TransformersConfig, from_dict
from zoo.families.model import ZOO_KEY, FamilyModel
from zoo.families.spec import FamilySpec, family_spec
from zoo.hf import config_to_dict

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _rejections() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import StrictDataclassError

    return ValueError, TypeError, KeyError, StrictDataclassError


def _model_class(spec: FamilySpec) -> type:
    import transformers

    return getattr(transformers, spec.class_name)


def transformers_config(data: dict[str, Any], where: str):
    """A transformers config from a config mapping (with ``model_type``); a value the config class rejects is an
    error naming ``where`` with transformers' own message."""
    from transformers import AutoConfig

    data = dict(data)
    spec = family_spec(data.pop("model_type", None), where=f"{where}: transformers.config")
    try:
        return spec, AutoConfig.for_model(spec.model_type, **data)
    except _rejections() as e:
        raise ConfigError(f"{where}: transformers.config: {type(e).__name__}: {e}") from e


def _given_vocab(data: dict[str, Any]) -> int | None:
    text = data.get("thinker_config", data).get("text_config", {})
    return text.get("vocab_size")


def build_family(config: ModelConfig, meta: bool = False, where: str | None = None) -> FamilyModel:
    """A fresh transformers-native model from a config with a ``transformers`` block (random weights, seeded by
    torch's generator). Its processor is ``transformers.processor`` or, when that is None, a tiny offline one whose
    token ids and vocabulary are written into the model's config. ``meta``: on the meta device, without loading a
    released processor (the config holds the vocabulary), for counting real-size models."""
    from zoo.families.tiny import fill_token_ids, tiny_processor

    where = where or config.name
    spec, hf_config = transformers_config(config.transformers.config, where)
    processor = None
    if config.transformers.processor is None:  # a tiny twin: its vocabulary is its offline tokenizer's
        processor = tiny_processor(spec.model_type)
        fill_token_ids(hf_config, processor, _given_vocab(config.transformers.config))
    elif not meta:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(config.transformers.processor)
    with torch.device("meta") if meta else contextlib.nullcontext():
        hf_model = _model_class(spec)._from_config(hf_config)
        return FamilyModel(hf_model, processor, config)


def is_family_checkpoint(meta: dict) -> bool:
    """Whether a ``config.json`` mapping is a transformers checkpoint (any model type: an unsupported one gets the
    error listing the supported ones from `load_family`)."""
    return "zoo_format" not in meta and isinstance(meta.get("model_type"), str) and (
        "architectures" in meta or "text_config" in meta or "thinker_config" in meta)


def load_family(directory: str | Path, device: str | torch.device | None = None) -> FamilyModel:
    """A transformers checkpoint directory as a `FamilyModel`: transformers' ``from_pretrained`` (its weight
    conversions, sharding), the processor when the directory has one, the sparse blocks converted. A checkpoint with
    a ``zoo`` entry (a sparsity policy, LoRA) is rebuilt from its config and its tensors loaded by name."""
    from transformers import AutoConfig, AutoProcessor

    from zoo.checkpoint import CheckpointError, load_weights

    directory = Path(directory)
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    spec = family_spec(meta.get("model_type"), where=str(path))
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except _rejections() as e:
        raise CheckpointError(f"{path}: transformers rejected the config: {type(e).__name__}: {e}") from e
    extras = meta.get(ZOO_KEY) or {}
    if hasattr(hf_config, ZOO_KEY):
        delattr(hf_config, ZOO_KEY)
    has_processor = any((directory / name).is_file() for name in PROCESSOR_FILES)
    processor = AutoProcessor.from_pretrained(directory) if has_processor else None
    config = ModelConfig(name=directory.name, family=spec.family, prompt="{question}",
                         transformers=TransformersConfig(config=config_to_dict(hf_config),
                                                         processor=str(directory) if has_processor else None))
    try:
        if "sparsity" in extras:
            config.lm.sparsity = from_dict(SparsityConfig, extras["sparsity"], path=f"{ZOO_KEY}.sparsity")
        if "lora" in extras:
            config.lm.lora = from_dict(LoRAExpertConfig, extras["lora"], path=f"{ZOO_KEY}.lora")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if extras:
        model = FamilyModel(_model_class(spec)._from_config(hf_config), processor, config)
        load_weights(model.hf, directory)
    else:
        model = FamilyModel(_model_class(spec).from_pretrained(directory, config=hf_config), processor, config)
    if device is not None:
        model.to(device)
    return model.eval()


__all__ = ["build_family", "is_family_checkpoint", "load_family", "transformers_config"]
