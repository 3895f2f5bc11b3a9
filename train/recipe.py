"""Staged training recipes: one YAML file says which model to build, which data sources exist, and the stages (data
mix, trainable parameters, optimisation, actions at the stage boundary such as upcycling the LM).

>>> from zoo.train.recipe import load_recipe, run_recipe
>>> run_recipe(load_recipe("configs/recipes/moe-llava-tiny.yaml"), "runs/moe-llava-tiny")

or ``zoo train configs/recipes/moe-llava-tiny.yaml --set stages.0.train.steps=10``. The run directory holds
``recipe.yaml`` (resolved), ``run.json`` (git revision, package versions, timings), and per stage ``NN-name/``
with ``metrics.csv``, ``skipped.json`` (every skipped sample's id by reason), ``routing.csv`` / ``routing.png`` (expert load per layer, for models that route),
``checkpoints/`` while the stage trains (every ``train.checkpoint_every`` steps), ``model/`` (a `save_pretrained`
export) and ``stage.json`` (written last: the stage is done).

A stage with ``objective: contrastive`` pretrains the model's open_clip vision tower on image-caption pairs with
open_clip's loss (`zoo.train.contrastive`), saves it as an open_clip checkpoint (``NN-name/open_clip``) and makes it
the model's (frozen) vision expert. Stages whose vision tower is frozen and dense read its features from a cache
(``features/``, `zoo.encoders.FeatureCache`: each image encoded once) unless ``feature_cache: false``. With ``resume=True`` finished stages are loaded from
their exports and an unfinished one continues from its newest checkpoint, ending bitwise where an uninterrupted run
ends (on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

import zoo
from zoo.checkpoint import write_text_atomic
from zoo.config import ConfigError, ConnectorConfig, SparsityConfig, from_dict, read_mapping, to_dict
from zoo.families import FamilyModel
from zoo.model import ZooModel
from zoo.registry import Registry

from .contrastive import ContrastiveConfig
from .conversations import TEMPLATES, Conversation, ConversationStream, read_llava_json, read_webdataset
from .data import SkipCounter, load_easy_vqa
from .family_data import FamilyConversationStream
from .module import TrainConfig, fit

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """A data source. ``kind``: ``easy-vqa`` (``split``; ``task``: ``questions``, one conversation per question, or
    ``captions``, one ``"a {colour} {shape}"`` caption per image from what its questions' answers reveal, see
    `zoo.train.captions`), ``llava-json`` (``path``, ``image_root``: default the file's folder; image paths leaving
    it are counted skips unless ``allow_outside_image_root``), ``webdataset`` (``urls``: shard paths or a brace
    pattern). ``limit`` keeps the first N samples."""

    kind: Literal["easy-vqa", "llava-json", "webdataset"]
    split: str = "train"
    task: Literal["questions", "captions"] = "questions"
    path: str | None = None
    image_root: str | None = None
    allow_outside_image_root: bool = False
    urls: str | list[str] | None = None
    limit: int | None = None

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1 (or null for all samples), got {self.limit}")


@dataclass
class ActionConfig:
    """An action at the start of a stage: ``sparsify`` (the LM, by ``policy``: a `SparsityConfig` mapping or preset),
    ``sparsify_vision`` (vision experts' blocks, e.g. ``policy: {preset: cumo}``; ``options.experts``: indices),
    ``co_upcycle`` (the connector into MoE experts copied from it; ``policy``: ``connector.moe`` settings,
    ``options``: MoCHA options, ``coefficients``: aux-loss weights, default the new connector's), ``load`` (weights
    of a zoo checkpoint at ``path`` into the model), or any action registered in `ACTIONS`."""

    action: str
    policy: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    coefficients: dict[str, float] | None = None

    def __post_init__(self):
        """The policy's values are checked when the recipe is read, not when an earlier stage has trained."""
        if self.action in ("sparsify", "sparsify_vision"):
            from_dict(SparsityConfig, dict(self.policy), path="policy")
        elif self.action == "co_upcycle":  # connector.moe settings: the same ranges as a model config's
            try:
                ConnectorConfig(moe=dict(self.policy), coefficients=dict(self.coefficients or {}))
            except ConfigError as e:
                raise ConfigError(str(e).replace("moe.", "policy.", 1)) from e


@dataclass
class StageConfig:
    """One stage: ``data`` maps source names to mixing weights (empty: every source, weighted by size);
    ``trainable``: part names (``vision``, ``connector``, ``lm``) or globs over parameter names
    (``lm.*.mlp.*``); everything else is frozen. ``before``: actions run first. ``train``: optimisation.
    ``objective``: ``lm`` (next-token loss on the assistant turns) or ``contrastive`` (open_clip pretraining of the
    vision tower on the sources' image-caption pairs, settings in ``contrastive``; ``trainable: [vision]``)."""

    name: str
    objective: Literal["lm", "contrastive"] = "lm"
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    data: dict[str, float] = field(default_factory=dict)
    template: str = "zoo"
    trainable: list[str] = field(default_factory=lambda: ["connector"])
    before: list[ActionConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        for source, weight in self.data.items():
            if not weight > 0:
                raise ConfigError(f"data.{source}: a mixing weight must be > 0, got {weight!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template: unknown template {self.template!r}; templates: {', '.join(TEMPLATES)}")
        if not self.trainable:
            raise ConfigError("trainable: a stage trains at least one part or parameter glob")


@dataclass
class RecipeConfig:
    """A whole training recipe (see the module docstring)."""

    name: str
    model: str  # a catalogue name or a model YAML path
    data: dict[str, SourceConfig]
    stages: list[StageConfig]
    seed: int = 0
    description: str = ""
    model_overrides: list[str] = field(default_factory=list)  # ``key=value`` on the model config: lm.sparsity=null
    feature_cache: bool = True  # stages with a frozen dense vision tower read its features from run_dir/features

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError("stages: a recipe needs at least one stage")
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.data) - set(self.data))
            if unknown:
                raise ConfigError(f"stages[{i}].data: unknown source(s) {unknown}; sources: {sorted(self.data)}")
            if stage.objective == "contrastive" and stage.trainable != ["vision"]:
                raise ConfigError(f"stages[{i}].trainable: a contrastive stage trains the vision tower (and its "
                                  f"text tower): set trainable: [vision], got {stage.trainable}")
        for name, source in self.data.items():
            if source.task == "captions" and source.kind != "easy-vqa":
                raise ConfigError(f"data.{name}.task: captions are derived for easy-vqa only; a {source.kind} "
                                  "source holds its own conversations")


ACTIONS: Registry[Callable[[ZooModel, ActionConfig], None]] = Registry("stage action")


@ACTIONS.register("sparsify")
def _sparsify(model: ZooModel, action: ActionConfig) -> None:
    """Upcycle / sparsify the LM by ``policy`` (MoE-LLaVA's stage III start)."""
    layers = model.sparsify(from_dict(SparsityConfig, dict(action.policy), path="before.policy"))
    log.info("sparsified LM layers %s", layers)


@ACTIONS.register("sparsify_vision")
def _sparsify_vision(model: ZooModel, action: ActionConfig) -> None:
    """Upcycle the MLPs of vision experts' transformer blocks by ``policy`` (CuMo's CLIP-MoE at SFT: preset
    ``cumo``); ``options.experts``: indices into ``vision`` (default: every expert)."""
    unknown = sorted(set(action.options) - {"experts"})
    if unknown:
        raise ConfigError(f"before.options.{unknown[0]}: sparsify_vision takes only 'experts'")
    policy = from_dict(SparsityConfig, dict(action.policy), path="before.policy")
    log.info("sparsified vision blocks %s", model.sparsify_vision(policy, action.options.get("experts")))


@ACTIONS.register("load")
def _load(model: ZooModel, action: ActionConfig) -> None:
    """Load the weights of a zoo checkpoint (same architecture) into the model."""
    from zoo.checkpoint import load_weights

    if not action.path:
        raise ConfigError("before.path: the checkpoint directory to load")
    load_weights(model, Path(action.path))


@ACTIONS.register("co_upcycle")
def _co_upcycle(model: ZooModel, action: ActionConfig) -> None:
    """CuMo's co-upcycling: a dense ``mlp`` connector becomes ``moe_mlp`` (one vision expert), per-expert ``mlp``
    connectors become MoCHA's ``mocha`` connector (sequence-fused experts); every expert starts as a copy of the
    trained MLP, routers are new, and the model config records the new connector (exports rebuild it)."""
    from zoo.connectors.base import PerExpertConnector
    from zoo.connectors.mlp import MLPProjector
    from zoo.connectors.mocha import upcycle_mocha
    from zoo.connectors.moe_mlp import upcycle_connector

    old = model.connector
    if isinstance(old, MLPProjector):
        if action.options:
            raise ConfigError("before.options: co-upcycling one mlp connector into moe_mlp takes no options")
        new = upcycle_connector(old, **action.policy)
    elif isinstance(old, PerExpertConnector) and all(isinstance(c, MLPProjector) for c in old.connectors):
        new = upcycle_mocha(old, options=action.options, **action.policy)
    else:
        raise ConfigError(f"before.action: co_upcycle needs an mlp connector or per-expert mlp connectors; the "
                          f"model's connector is {model.config.connector.kind!r} ({type(old).__name__})")
    coefficients = action.coefficients if action.coefficients is not None else type(new).default_coefficients
    new.config = dataclasses.replace(new.config, coefficients=dict(coefficients))
    model.connector = new
    model.config.connector = new.config
    log.info("co-upcycled the connector into %s (%s)", new.config.kind, new.config.moe)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub.0.field=value`` assignments (values parsed as YAML) applied to a recipe mapping; a path that does
    not exist is an error naming it."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            try:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            except (IndexError, ValueError) as e:
                raise ConfigError(f"--set {key}: no element {'.'.join(parts[: i + 1])!r}") from e
        last = parts[-1]
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (IndexError, ValueError) as e:
                raise ConfigError(f"--set {key}: no element {key!r}") from e
        else:
            node[last] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe from YAML, with ``--set`` style overrides; errors name the file and the field."""
    data = apply_overrides(read_mapping(path), overrides or [])
    try:
        return from_dict(RecipeConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def build_model(recipe: RecipeConfig) -> ZooModel:
    """The recipe's starting model: its catalogue entry with ``model_overrides`` applied."""
    from zoo.config import ModelConfig

    config = zoo.get_config(recipe.model)
    if recipe.model_overrides:
        try:
            config = ModelConfig.from_dict(apply_overrides(config.to_dict(), recipe.model_overrides))
        except ConfigError as e:
            raise ConfigError(f"model_overrides: {e}") from e
    return zoo.build(config)


def build_source(config: SourceConfig, skipped: SkipCounter):
    """The conversations of a source: a list (easy-vqa, LLaVA JSON) or a re-iterable callable (webdataset)."""
    if config.kind == "easy-vqa":
        # questions: only the first `limit` and their images are read; captions need every question of an image
        split = load_easy_vqa(config.split, config.limit if config.task == "questions" else None)
        skipped.extend(split.skipped)  # questions about images that cannot be used (their images are left out)
        if config.task == "captions":
            from .captions import caption_images

            captioned = caption_images(split, config.split, skipped)
            captioned = captioned[: config.limit] if config.limit else captioned
            # no placeholder in the user turn: encoding puts the model's own image token there
            return [Conversation(c.id, [("user", ""), ("assistant", c.caption)], [split.images[c.image]],
                                 labels={"colour": c.colour, "shape": c.shape}) for c in captioned]
        return [Conversation(s.id, [("user", s.question), ("assistant", s.answer)], [split.images[s.image]])
                for s in split.samples]  # already the first `limit` questions
    if config.kind == "llava-json":
        if not config.path:
            raise ConfigError("data.path: the LLaVA JSON file")
        samples = read_llava_json(config.path, config.image_root, skipped=skipped,
                                  allow_outside_root=config.allow_outside_image_root)
        return samples[: config.limit] if config.limit else samples
    if not config.urls:
        raise ConfigError("data.urls: the webdataset shards")

    def stream():
        for n, sample in enumerate(read_webdataset(config.urls, skipped=skipped)):
            if config.limit and n >= config.limit:
                return
            yield sample

    return stream


class DataSourceError(ConfigError):
    """A data source's files are missing or unreadable; checked before anything trains."""


def _local_path(url: str) -> Path | None:
    """The file a shard url names, or None for remote ones (http(s), s3, pipe:, ...) that cannot be checked first."""
    if url.startswith("file:"):
        return Path(url[5:])
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) else Path(url)


def _unreadable(path: Path) -> str | None:
    if not path.exists():
        return "missing"
    if not path.is_file() or not os.access(path, os.R_OK):
        return "not a readable file"
    return None


def check_sources(recipe: RecipeConfig) -> None:
    """Before the first step: every local shard of a webdataset source and every LLaVA JSON file exists and is
    readable (remote shards are counted per shard while reading); the error names the source, the first bad file
    and how many are bad."""
    from .conversations import shard_urls

    for name, source in recipe.data.items():
        if source.kind == "llava-json" and source.path:
            problem = _unreadable(Path(source.path))
            if problem:
                raise DataSourceError(f"data.{name}.path: {source.path} is {problem}")
            if source.image_root and not Path(source.image_root).is_dir():
                raise DataSourceError(f"data.{name}.image_root: {source.image_root} is not a directory")
        elif source.kind == "webdataset" and source.urls:
            bad = [(url, problem) for url in shard_urls(source.urls) if (local := _local_path(url)) is not None
                   and (problem := _unreadable(local))]
            if bad:
                url, problem = bad[0]
                raise DataSourceError(f"data.{name}.urls: {len(bad)} of {len(shard_urls(source.urls))} shard(s) "
                                      f"missing or unreadable, the first: {url} ({problem})")


def set_trainable(model: ZooModel, patterns: list[str]) -> int:
    """``requires_grad`` from part names or parameter-name globs (frozen vision experts stay frozen); returns the
    number of trainable parameters. A pattern that matches nothing is an error naming it."""
    globs = [p if any(c in p for c in "*?[") else f"{p}.*" for p in patterns]
    used = set()
    frozen_vision = {name for name, p in model.vision.named_parameters(prefix="vision") if not p.requires_grad}
    total = 0
    for name, param in model.named_parameters():
        hits = [g for g in globs if fnmatch.fnmatchcase(name, g)]
        used.update(hits)
        train = bool(hits) and name not in frozen_vision
        param.requires_grad_(train)
        total += param.numel() if train else 0
    unused = [p for p, g in zip(patterns, globs) if g not in used]
    if unused:
        parts = ", ".join(name for name, _ in model.named_children())
        why = [f"{p}: {model.missing_part(p)}" for p in unused if isinstance(model, FamilyModel) and model.missing_part(p)]
        raise ConfigError(f"trainable: {unused} match no parameter (parts of {model.config.name}: {parts}; or globs "
                          f"over parameter names such as lm.*.mlp.*)" + "".join(f"; {w}" for w in why))
    return total


def _environment() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    versions = {}
    for pkg in ("torch", "transformers", "timm", "lightning", "webdataset", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_revision": rev, "versions": versions, "zoo": zoo.__version__}


def _cacheable(model: ZooModel) -> bool:
    """Whether the vision tower's outputs can come from a feature cache: every parameter frozen and no sparse
    (routing) blocks whose statistics the stage would report. A transformers-native model's tower runs inside
    transformers' forward: never cached."""
    if isinstance(model, FamilyModel):
        return False
    configs = model.config.vision if isinstance(model.config.vision, list) else [model.config.vision]
    frozen = not any(p.requires_grad for p in model.vision.parameters())
    return frozen and all(c.sparsity is None for c in configs)


def _feature_cache(model: ZooModel, run_dir: Path, sources: list, progress: bool):
    """The run's `FeatureCache` of the model's vision tower, with every image of the in-memory sources encoded. Rank 0
    owns the run directory; other ranks of a data-parallel run keep their own cache in a temporary directory (removed
    at exit), so no rank writes into the run directory before rank 0 has claimed it or beside it."""
    from zoo.encoders import FeatureCache

    directory = run_dir / "features"
    if not _is_main_process():
        import atexit
        import shutil
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="zoo-features-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    cache = FeatureCache(directory, model.vision)
    seen: dict[int, object] = {}
    for source in sources:
        if isinstance(source, list):
            for sample in source:
                for image in sample.images:
                    seen.setdefault(id(image), image)  # easy-vqa samples share their PIL images
    from PIL import Image

    images = [im for im in seen.values() if isinstance(im, Image.Image)]
    if images:
        added = cache.add(images, progress=progress)
        log.info("feature cache %s: %d images, %d encoded now", cache.dir, len(cache), added)
    return cache


def _stage_stream(model: ZooModel, recipe: RecipeConfig, stage: StageConfig, index: int, sources: dict,
                  features=None):
    names = list(stage.data) or list(sources)
    weights = [stage.data[n] for n in names] if stage.data else None
    sources = [sources[n] for n in names]
    if isinstance(model, FamilyModel):  # its own chat template and processor (no feature cache)
        return FamilyConversationStream(model, sources, weights=weights, template=stage.template,
                                        seed=recipe.seed + index, epochs=10**6)
    return ConversationStream(model, sources, weights=weights, template=stage.template, seed=recipe.seed + index,
                              epochs=10**6, features=features)


def _load_export(model: ZooModel | FamilyModel, export: Path) -> None:
    """A finished stage's export back into the model (resume): a zoo checkpoint, or a transformers-native model's
    transformers checkpoint."""
    from zoo.checkpoint import load_weights

    if isinstance(model, FamilyModel):
        model.load_state_dict(zoo.load(export).state_dict())
    else:
        load_weights(model, export)


def _stage_sources(stage: StageConfig, sources: dict) -> list:
    return [sources[n] for n in (list(stage.data) or list(sources))]


def _loss_ends(losses) -> dict:
    """Mean loss of the first and of the last fifth of a stage's steps."""
    losses = [float(v) for v in losses]
    k = max(1, len(losses) // 5)
    return {"loss_first_fifth": sum(losses[:k]) / k if losses else None,
            "loss_last_fifth": sum(losses[-k:]) / k if losses else None}


def _is_main_process() -> bool:
    """Rank 0 (or no distributed run): the one process that writes the run directory."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"  # torchrun's ranks before Lightning sets up the process group


def run_recipe(recipe: RecipeConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
               callbacks: list | None = None, overwrite: bool = False, command: str | None = None) -> ZooModel:
    """Run every stage of ``recipe`` in ``run_dir`` (see the module docstring); returns the final model.

    The run directory is owned (`zoo.train.run_dir`): one that holds a run is refused unless ``resume`` (the same
    recipe; finished stages are loaded from their exports, an unfinished one continues from its newest checkpoint) or
    ``overwrite`` (the earlier run's files are removed), and a lock keeps out a second process. Data sources are
    checked before anything trains (`check_sources`). SIGTERM / SIGINT stop the run after the current step with a
    checkpoint of it (`zoo.train.preemption.Interrupted`, whose message says how to resume: ``command`` is the
    command line that resumes). Under data parallelism every rank trains and rank 0 writes the run directory.
    ``callbacks``: Lightning callbacks added to every stage's trainer (their ``pl_module`` is the stage's module: a
    `ZooLightningModule`, or a `zoo.train.contrastive.ContrastiveModule` in contrastive stages)."""
    import torch

    from .preemption import PreemptionGuard
    from .run_dir import claim

    run_dir = Path(run_dir)
    check_sources(recipe)
    resolved = yaml.safe_load(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    lock = claim(run_dir, resolved, resume, overwrite) if _is_main_process() else None
    resume_command = command or f"run_recipe(..., {str(run_dir)!r}, resume=True)"
    try:
        with PreemptionGuard() as guard:
            if lock is not None:
                write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
            info = {**_environment(), "recipe": recipe.name, "stages": {}}
            torch.manual_seed(recipe.seed)
            model = build_model(recipe)
            skipped = SkipCounter()
            sources = {name: build_source(cfg, skipped) for name, cfg in recipe.data.items()}
            for i, stage in enumerate(recipe.stages):
                guard.agree()  # (every rank stops, or none)
                guard.stop(f"before stage {stage.name}", f"resume with: {resume_command}")
                _run_stage(model, recipe, i, run_dir, sources, skipped, info, resume, progress,
                           [*(callbacks or [])], guard, resume_command)
            if lock is not None:
                write_text_atomic(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    finally:
        if lock is not None:
            lock.release()
    model.eval()
    return model


def _run_stage(model: ZooModel, recipe: RecipeConfig, i: int, run_dir: Path, sources: dict, skipped: SkipCounter,
               info: dict, resume: bool, progress: bool, callbacks: list, guard, resume_command: str) -> None:
    """One stage: its boundary actions, then (unless resumed from its export) training, export and records."""
    import torch
    import torch.distributed as dist

    from zoo.checkpoint import CHECKSUMS_NAME

    from .preemption import PreemptionCheckpoint
    from .routing import RoutingMonitor

    stage = recipe.stages[i]
    stage_dir = run_dir / f"{i:02d}-{stage.name}"
    export, done = stage_dir / "model", stage_dir / "stage.json"
    main = _is_main_process()
    torch.manual_seed(recipe.seed + i)  # actions draw the same numbers whether earlier stages ran or were loaded
    for action in stage.before:
        ACTIONS.get(action.action, field=f"stages[{i}].before.action")(model, action)
    if resume and done.exists():
        if stage.objective == "contrastive":  # the pretrained tower becomes the expert, as when the stage ran
            from .contrastive import OPEN_CLIP_DIR, pretrained_expert

            pretrained_expert(model, stage_dir / OPEN_CLIP_DIR, stage.contrastive.freeze)
        _load_export(model, export)
        info["stages"][stage.name] = json.loads(done.read_text())
        log.info("stage %s: loaded its export (resume)", stage.name)
        return
    if stage.objective == "contrastive" and isinstance(model, FamilyModel):
        raise ConfigError(f"stages[{i}].objective: contrastive pretrains a zoo vision expert; {model.config.name} "
                          "is a transformers-native model (its vision tower is transformers'): use objective lm")
    start = time.perf_counter()
    train = dataclasses.replace(stage.train, seed=recipe.seed + i)
    log.info("stage %d/%d %s (%s): %d steps of %d", i + 1, len(recipe.stages), stage.name, stage.objective,
             train.steps, train.batch_size)
    callbacks = [*callbacks, PreemptionCheckpoint(guard, stage_dir / "checkpoints", stage.name, resume_command)]
    if stage.objective == "contrastive":
        from .contrastive import run_contrastive_stage

        report, losses = run_contrastive_stage(model, _stage_sources(stage, sources), stage.contrastive, train,
                                               stage_dir, skipped, progress=progress, resume=resume,
                                               seed=recipe.seed + i, callbacks=callbacks)
        trainable = sum(p.numel() for p in model.vision.parameters())
        stream, summary = None, {**_loss_ends(losses), "contrastive": report}
    else:
        trainable = set_trainable(model, stage.trainable)
        cache = None
        if recipe.feature_cache and _cacheable(model):
            cache = _feature_cache(model, run_dir, _stage_sources(stage, sources), progress)
        stream = _stage_stream(model, recipe, stage, i, sources, features=cache)
        monitor = RoutingMonitor(stage_dir, title=f"{recipe.name} / {stage.name}")
        module = fit(model, stream, train, run_dir=stage_dir, progress=progress, resume=resume,
                     callbacks=[monitor, *callbacks])
        if cache is not None:
            cache.flush()
        summary = {**_loss_ends(module.losses), "routing": monitor.summary(), "feature_cache": cache is not None}
    seconds = time.perf_counter() - start
    log.info("stage %s done in %.1f s (mean loss %.4g over its first fifth, %.4g over its last)", stage.name,
             seconds, summary["loss_first_fifth"] or float("nan"), summary["loss_last_fifth"] or float("nan"))
    if not main:
        dist.barrier()  # rank 0 writes the stage's files
        return
    model.save_pretrained(export)
    info["stages"][stage.name] = {
        "objective": stage.objective, "trainable_parameters": trainable, "seconds": round(seconds, 1),
        "steps": train.steps,
        "skipped": {reason: len(ids) for reason, ids in (stream.skipped.by_reason.items() if stream else ())},
        **summary,  # skipped ids: skipped.json
        "export_sha256": json.loads((export / CHECKSUMS_NAME).read_text())}
    named = {**skipped.state_dict()}  # reading (malformed lines, unreadable shards) + encoding skips, by id
    for reason, ids in (stream.skipped.state_dict().items() if stream else ()):
        named.setdefault(reason, []).extend(ids)
    write_text_atomic(stage_dir / "skipped.json", json.dumps(named, indent=1) + "\n")
    # the stage counts as done only once its export is complete
    write_text_atomic(done, json.dumps(info["stages"][stage.name], indent=2) + "\n")
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    write_text_atomic(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
