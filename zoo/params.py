"""Parameter accounting: total and active (used per token) parameters, split into vision / connector / LM.

>>> zoo.param_counts("moe-llava-phi2-4e")           # real size, built on the meta device: no weights, no memory
ParamCounts(total=..., active=..., parts={'vision': (...), 'connector': (...), 'lm': (...)})

"Active" is what one token runs through: every dense parameter, plus ``top_k`` of the ``E`` routed experts of each
MoE layer (shared experts always), plus one router per token. Layers say how many of their parameters one token
uses through an ``active_parameters()`` method (`zoo.moe.MoELayer`, `zoo.moe.ModalityMoELayer`, LoRA experts);
transformers' own sparse blocks (Mixtral, Qwen2-MoE, ...) are recognised by their ``experts.num_experts`` and
``top_k``, zoo MoE connectors by their ``experts`` and ``moe`` config. Papers' "activated parameters" (MoE-LLaVA, DeepSeekMoE) count the LM side: ``counts.parts["lm"]``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from zoo.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """``total`` and ``active`` parameters; ``parts`` maps ``vision`` / ``connector`` / ``lm`` to ``(total, active)``."""

    total: int
    active: int
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)
    embeddings: int = 0  # the LM's token embeddings and output head (counted in total and active; cards may omit them)

    def __str__(self) -> str:
        def b(n: int) -> str:
            return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"

        lines = [f"{'part':<10} {'total':>10} {'active':>10}"]
        for name, (tot, act) in self.parts.items():
            lines.append(f"{name:<10} {b(tot):>10} {b(act):>10}")
        lines.append(f"{'all':<10} {b(self.total):>10} {b(self.active):>10}")
        return "\n".join(lines)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _sparse_block(module: nn.Module) -> tuple[int, int, int] | None:
    """``(experts' params, num_experts, top_k)`` for a routed block that does not report its own active count: a
    transformers sparse MoE block (Mixtral-style: ``.experts`` with ``num_experts`` and a ``top_k`` on the block or its
    ``gate``) or a zoo MoE connector (``.experts`` and a `zoo.moe.MoEConfig` in ``.moe``: CuMo, MoCHA); else None."""
    from zoo.moe.config import MoEConfig

    experts = getattr(module, "experts", None)
    num = getattr(experts, "num_experts", None)
    moe = getattr(module, "moe", None)
    k = moe.top_k if isinstance(moe, MoEConfig) else (
        getattr(module, "top_k", None) or getattr(getattr(module, "gate", None), "top_k", None))
    if not isinstance(experts, nn.Module) or not isinstance(num, int) or not isinstance(k, int):
        return None
    return _numel(experts.parameters()), num, k


def count_module(module: nn.Module) -> tuple[int, int]:
    """``(total, active)`` parameters of one module, shared parameters counted once."""
    seen: set[int] = set()

    def fresh(params) -> list[torch.Tensor]:
        out = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in out)
        return out

    def walk(m: nn.Module) -> tuple[int, int]:
        active_fn = getattr(m, "active_parameters", None)
        if callable(active_fn):
            total = _numel(fresh(m.parameters()))
            return total, min(total, int(active_fn()))
        total = active = _numel(fresh(m.parameters(recurse=False)))
        block = _sparse_block(m)
        for name, child in m.named_children():
            t, a = walk(child)
            if block is not None and name == "experts":
                expert_params, num, k = block
                a = t * min(k, num) // num if t == expert_params else a
            total, active = total + t, active + a
        return total, active

    return walk(module)


def build_on_meta(name_or_config: str | Path | ModelConfig) -> nn.Module:
    """The model of a catalogue name / YAML / config built on the meta device: real shapes, no memory, no weights.

    Every part is built from its architecture: ``pretrained`` parts need it in the config (``vision.kwargs`` /
    ``lm.config`` with ``model_type``), as hub configs cannot be fetched offline. The vocabulary is
    ``lm.config.vocab_size`` when given, else the tokenizer's length (the tokenizer must then be buildable here).
    """
    from zoo.catalogue import get_config
    from zoo.model import ZooModel
    from zoo.tokenizer import build_tokenizer

    config = copy.deepcopy(get_config(name_or_config))
    if config.transformers is not None:  # a transformers-native model: its own config holds the vocabulary
        from zoo.families import build_family

        return build_family(config, meta=True)
    for expert in config.vision_experts:
        expert.pretrained = False
    config.lm.pretrained = False
    tokenizer = None
    if "vocab_size" not in (config.lm.config or {}):
        try:
            tokenizer = build_tokenizer(config.tokenizer)
        except (OSError, ValueError) as e:
            raise ValueError(f"{config.name}: lm.config.vocab_size is needed to count parameters without the "
                             f"tokenizer, which cannot be built here ({e})") from e
    elif config.image_token_id is None:
        config.image_token_id = 0  # no tokenizer needed to count
    try:
        with torch.device("meta"):
            return ZooModel(config, tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config.name}: cannot build on the meta device from the config alone: {e}") from e


def param_counts(model_or_name: nn.Module | str | Path | ModelConfig) -> ParamCounts:
    """Total and active parameters of a model (a `zoo.ZooModel`, any ``nn.Module``) or of a catalogue name / YAML /
    `ModelConfig`, which is built on the meta device (no weights, no memory), so real-size entries can be counted.

    ``parts`` splits a `ZooModel` into ``vision``, ``connector`` and ``lm`` (a `zoo.families.FamilyModel` into its
    own parts: ``vision``, ``lm``, ``connector`` where it has one, ...); another module is one part, ``model``.
    """
    model = model_or_name if isinstance(model_or_name, nn.Module) else build_on_meta(model_or_name)
    names = getattr(model, "part_names", ("vision", "connector", "lm"))  # a FamilyModel names its own parts
    if all(isinstance(getattr(model, n, None), nn.Module) for n in names):
        parts = {n: count_module(getattr(model, n)) for n in names}
        rest = count_module(model)
        extra = (rest[0] - sum(t for t, _ in parts.values()), rest[1] - sum(a for _, a in parts.values()))
        if extra[0]:
            parts["other"] = extra
    else:
        parts = {"model": count_module(model)}
    return ParamCounts(total=sum(t for t, _ in parts.values()), active=sum(a for _, a in parts.values()),
                       parts=parts, embeddings=embedding_parameters(model))


def embedding_parameters(model: nn.Module) -> int:
    """Parameters of the language model's input embeddings and output head (tied ones once): what model cards that
    count "non-embedding" parameters (GLM's activated count) leave out. 0 for a module without them."""
    lm = getattr(model, "generator", None) or getattr(model, "lm", None) or model  # FamilyModel, ZooModel, an LM
    modules = [getattr(lm, name, lambda: None)() for name in ("get_input_embeddings", "get_output_embeddings")]
    unique = {id(p): p for m in modules if m is not None for p in m.parameters()}
    return _numel(unique.values())


# ---------------------------------------------------------------------------------------------------------------
# Counts of catalogue entries, cached: `zoo list` counts every entry on the meta device once, then reads the cache.

_MEMO: dict[str, ParamCounts] = {}
_CACHE_FILE = "param_counts.json"


def cache_dir() -> Path:
    """Where cached counts live: ``$ZOO_CACHE_DIR`` or ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_CACHE_DIR") or Path.home() / ".cache" / "zoo")


@functools.cache
def _code_digest() -> str:
    """Digest of what decides a count besides the config: the installed libraries that build the parts and the
    source of the zoo packages that assemble them (so an edited connector never reads a stale count)."""
    import importlib.metadata as md

    from zoo import connectors, encoders

    h = hashlib.sha256()
    for dist in ("torch", "transformers", "timm", "open_clip_torch"):
        try:
            h.update(f"{dist}={md.version(dist)};".encode())
        except md.PackageNotFoundError:
            h.update(f"{dist}=none;".encode())
    for root in (Path(__file__).parent, Path(encoders.__file__).parent, Path(connectors.__file__).parent):
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def _cache_key(config: ModelConfig) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256((text + _code_digest()).encode()).hexdigest()


def cached_param_counts(name_or_config: str | Path | ModelConfig) -> ParamCounts:
    """`param_counts` of a catalogue name / YAML / config, cached in this process and in
    ``cache_dir()/param_counts.json`` under a key of the config and `_code_digest` (a changed config, library or zoo
    source is counted afresh). The file is rewritten atomically; an unreadable cache file is ignored and replaced."""
    from zoo.catalogue import get_config

    config = get_config(name_or_config)
    key = _cache_key(config)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / _CACHE_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        stored = {}
    if key in stored:
        entry = stored[key]
        counts = ParamCounts(entry["total"], entry["active"], {k: tuple(v) for k, v in entry["parts"].items()},
                             entry.get("embeddings", 0))
    else:
        counts = param_counts(config)
        stored[key] = {"name": config.name, "total": counts.total, "active": counts.active,
                       "parts": {k: list(v) for k, v in counts.parts.items()}, "embeddings": counts.embeddings}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError:  # a read-only home: counting still works, only slower next time
            pass
    _MEMO[key] = counts
    return counts
