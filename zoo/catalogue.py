"""The catalogue (``configs/models/*.yaml``) and the public entry points ``build``, ``load``, ``list_models`` and
``convert_checkpoint`` (``zoo convert``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zoo.config import ConfigError, ModelConfig, configs_dir
from zoo.errors import MissingWeightsError
from zoo.registry import Registry, UnknownPartError

CATALOGUE: Registry[Path] = Registry("model")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _scan() -> None:
    for path in sorted((configs_dir() / "models").glob("*.yaml")):
        if path.stem not in CATALOGUE:
            CATALOGUE.register(path.stem, path)


TINY_SUFFIX = "-tiny"


def list_models(family: str | None = None, tiny: bool | None = None) -> list[str]:
    """Catalogue names, optionally only those of one `family` (``llava``, ``moe-llava``, ``cumo``, ``mova``,
    ``mocha``, ``moiie``, ``deepseek-moe``, ``bigmac``); ``tiny=True`` keeps only the ``-tiny`` twins, ``False`` only
    the real-size entries. An unknown family is an error listing the known ones."""
    _scan()
    names = CATALOGUE.names()
    if tiny is not None:
        names = [n for n in names if n.endswith(TINY_SUFFIX) == tiny]
    if family is None:
        return names
    families = {n: ModelConfig.from_file(CATALOGUE.get(n)).family for n in CATALOGUE.names()}
    if family not in families.values():
        raise UnknownPartError(f"family: unknown model family {family!r}; known: "
                               f"{', '.join(sorted(set(families.values())))}")
    return [n for n in names if families[n] == family]


def twin_of(name: str) -> str | None:
    """The real-size entry a ``-tiny`` twin mirrors (None for an entry that is not a twin of one)."""
    _scan()
    base = name.removesuffix(TINY_SUFFIX)
    return base if name.endswith(TINY_SUFFIX) and base in CATALOGUE else None


def get_config(name_or_path: str | Path | ModelConfig) -> ModelConfig:
    """A :class:`ModelConfig` from a catalogue name, a YAML/JSON path, or a config (returned as is)."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        return ModelConfig.from_file(path)
    _scan()
    return ModelConfig.from_file(CATALOGUE.get(str(name_or_path)))


def build(name_or_config: str | Path | ModelConfig, device: str | torch.device | None = None):
    """A fresh model from a catalogue name, a YAML path or a :class:`ModelConfig`.

    Parts marked ``pretrained`` load their weights (local dir or offline cache); the rest start random. A config
    with a ``transformers`` block builds a transformers-native model (`zoo.families.FamilyModel`).
    """
    from zoo.model import ZooModel
    from zoo.tokenizer import build_tokenizer

    config = get_config(name_or_config)
    if config.transformers is not None:
        from zoo.families import build_family

        where = config.name  # errors name the YAML file the config came from, if any
        if not isinstance(name_or_config, ModelConfig):
            where = str(CATALOGUE.get(str(name_or_config)) if str(name_or_config) in CATALOGUE else name_or_config)
        model = build_family(config, where=where)
        return model.to(device) if device is not None else model
    model = ZooModel(config, build_tokenizer(config.tokenizer))
    return model.to(device) if device is not None else model


def resolve_hub_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """A local snapshot of hub repo `repo_id` (only the offline cache when ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:  # huggingface_hub raises several error types for "not available offline"
        raise MissingWeightsError(f"{repo_id!r}: not a local directory and not available from the hub or its offline "
                                  f"cache ({type(e).__name__}: {e})") from e


def load_dir(directory: str | Path, device: str | torch.device | None = None, verify: bool = False):
    """Load a checkpoint directory: a zoo checkpoint, a transformers ``LlavaForConditionalGeneration`` one (llava-hf
    layout, converted exactly by :func:`zoo.convert.from_transformers`), a released LLaVA, MoE-LLaVA or CuMo one
    (:func:`zoo.released.from_released`; their vision tower is read from the name in their config) or a transformers
    checkpoint of a `zoo.families` model type (Qwen3-VL-MoE, GLM-4.5V, Llama 4, Aria, ERNIE-4.5-VL, Qwen3-Omni).
    ``verify``: check the files against the sha256 sums of the export's ``checksums.json`` first (zoo exports and
    the transformers-layout checkpoints `zoo.families` writes)."""
    from zoo.checkpoint import CONFIG_NAME, CheckpointError, verify_checksums
    from zoo.families import FAMILIES, is_family_checkpoint, load_family
    from zoo.model import ZooModel
    from zoo.released import ReleasedCheckpointError, detect_layout, from_released

    directory = Path(directory)
    if verify:
        verify_checksums(directory)
    config_path = directory / CONFIG_NAME
    try:
        meta = json.loads(config_path.read_text())
        if is_family_checkpoint(meta) and meta["model_type"] in FAMILIES:
            return load_family(directory, device=device)
        layout = detect_layout(meta)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read a checkpoint config ({e})") from e
    except ReleasedCheckpointError as e:
        raise CheckpointError(f"{config_path}: model_type {meta.get('model_type')!r} is not supported; supported: "
                              f"zoo, llava-hf, llava, moe-llava, cumo checkpoints and the transformers model types "
                              f"{', '.join(FAMILIES.names())}") from e
    if layout == "zoo":
        return ZooModel.from_pretrained(directory, device=device)
    if layout == "llava-hf":
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from zoo.convert import from_transformers

        llava = LlavaForConditionalGeneration.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = from_transformers(llava, tokenizer).eval()
    else:
        model = from_released(directory)
    return model.to(device) if device is not None else model


def convert_checkpoint(source: str | Path, destination: str | Path, vision_tower: str | None = None) -> Path:
    """`zoo convert SRC DST`: read any supported checkpoint (zoo, llava-hf, or a released layout) and write it as a
    zoo checkpoint (``config.json`` + ``model.safetensors`` + tokenizer). ``vision_tower``: as for
    :func:`zoo.released.from_released`, for a released layout whose checkpoint does not hold its tower."""
    from zoo.released import detect_layout, from_released, read_config

    source = Path(source)
    layout = detect_layout(read_config(source))
    model = load_dir(source) if layout in ("zoo", "llava-hf") else from_released(source, vision_tower=vision_tower)
    return model.save_pretrained(destination)


def load(source: str | Path, device: str | torch.device | None = None, cache_dir: str | Path | None = None,
         verify: bool = False):
    """Load a trained model from a local checkpoint dir (zoo, llava-hf, or a released LLaVA / MoE-LLaVA / CuMo
    layout), a Hugging Face hub id (offline
    cache honoured; `cache_dir` overrides the hub cache location) or a catalogue name whose entry names released
    ``weights`` (the entry's name and prompt template then apply). ``verify``: a local export's files (a zoo checkpoint, or
    a transformers-layout one `zoo.families` wrote) must match the sha256 sums of its ``checksums.json`` (a mismatch
    names the file and both hashes)."""
    path = Path(source)
    if path.is_dir():
        return load_dir(path, device=device, verify=verify)
    _scan()
    if str(source) in CATALOGUE:
        config = get_config(str(source))
        if not config.weights:
            raise ConfigError(f"{source}: the catalogue entry names no released weights; "
                              f"use zoo.build({str(source)!r}) for a fresh model")
        model = load(config.weights, device=device, cache_dir=cache_dir)
        model.config.name, model.config.prompt = config.name, config.prompt
        return model
    if _HUB_ID.match(str(source)):
        return load_dir(resolve_hub_dir(str(source), cache_dir), device=device)
    raise UnknownPartError(f"{source!r} is not a directory, a hub id (org/name) or a catalogue name. "
                           f"Catalogue: {', '.join(CATALOGUE.names())}")
