"""The catalogue (``configs/models/*.yaml``) and the public entry points ``build``, ``load``, ``list_models``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zoo.config import ConfigError, ModelConfig, configs_dir
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

    Parts marked ``pretrained`` load their weights (local dir or offline cache); the rest start random.
    """
    from zoo.model import ZooModel
    from zoo.tokenizer import build_tokenizer

    config = get_config(name_or_config)
    model = ZooModel(config, build_tokenizer(config.tokenizer))
    return model.to(device) if device is not None else model


def resolve_hub_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """A local snapshot of hub repo `repo_id` (only the offline cache when ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # huggingface_hub raises several error types for "not available offline"
        raise OSError(f"{repo_id!r}: not a local directory and not available from the hub or its offline cache "
                      f"({type(e).__name__}: {e})") from e


def load_dir(directory: str | Path, device: str | torch.device | None = None, verify: bool = False):
    """Load a checkpoint directory: a zoo checkpoint, a transformers ``LlavaForConditionalGeneration`` one (llava-hf
    layout, converted exactly by :func:`zoo.convert.from_transformers`) or a released LLaVA, MoE-LLaVA or CuMo one
    (:func:`zoo.released.from_released`; their vision tower is read from the name in their config). ``verify``: check
    the files against the sha256 sums of the export's ``checksums.json`` first (zoo exports)."""
    from zoo.checkpoint import CONFIG_NAME, CheckpointError, verify_checksums
    from zoo.model import ZooModel
    from zoo.released import ReleasedCheckpointError, detect_layout, from_released

    directory = Path(directory)
    if verify:
        verify_checksums(directory)
    config_path = directory / CONFIG_NAME
    try:
        meta = json.loads(config_path.read_text())
        layout = detect_layout(meta)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read a checkpoint config ({e})") from e
    except ReleasedCheckpointError as e:
        raise CheckpointError(f"{config_path}: neither a zoo checkpoint (no 'zoo_format'), a llava-hf one nor a "
                              f"released LLaVA-family one ({e})") from e
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


def load(source: str | Path, device: str | torch.device | None = None, cache_dir: str | Path | None = None,
         verify: bool = False):
    """Load a trained model from a local checkpoint dir (zoo, llava-hf, or a released LLaVA / MoE-LLaVA / CuMo
    layout), a Hugging Face hub id (offline
    cache honoured; `cache_dir` overrides the hub cache location) or a catalogue name whose entry names released
    ``weights`` (the entry's name and prompt template then apply). ``verify``: a local zoo export's files must match
    the sha256 sums of its ``checksums.json`` (a mismatch names the file and both hashes)."""
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
