"""The Lightning module and a one-stage ``fit`` for a :class:`~zoo.model.ZooModel`: strategies by name, precision,
gradient accumulation and checkpointing, periodic checkpoints and exact resume (see `zoo.train.checkpoint`)."""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from zoo.config import ConfigError
from zoo.model import IGNORE_INDEX, ZooModel

from .data import ImageGroupedBatchSampler


@dataclass
class TrainConfig:
    """One training stage: AdamW with linear warm-up then cosine decay to ``min_lr_ratio`` of the peak."""

    steps: int = 1000
    batch_size: int = 64
    questions_per_image: int = 1  # > 1: batches group questions by image (batch_size / this images per batch)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    lr_scale: dict[str, float] = field(default_factory=dict)  # per part: {"vision": 4.0} trains it at 4 x lr
    augment: str | None = None  # "dihedral": random flips/rotations of the images (orientation-free answers)
    turns_per_sample: int = 1  # > 1: pack up to this many questions about one image into one conversation
    seed: int = 0
    num_workers: int = 0
    log_every: int = 25
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3 (`zoo.train.strategy`)
    devices: int | str = 1  # per node; "auto" takes every visible device
    num_nodes: int = 1
    expert_parallel: int = 1  # ranks each MoE layer's routed experts are split over (with ddp or fsdp)
    timeout: float = 1800.0  # seconds a rank waits on the others in a collective before the run stops
    deepspeed_config: str | None = None  # a DeepSpeed JSON for deepspeed_stage_2/3 (`zoo.train.deepspeed`)
    precision: str = "32-true"  # any Lightning precision: bf16-mixed, 16-mixed, bf16-true, ...
    accumulate_grad_batches: int = 1  # the optimizer steps every N batches (``batch_size`` is per device)
    gradient_checkpointing: bool = False  # recompute the LM's decoder layers in the backward pass
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps (0: never; needs a run dir)

    def __post_init__(self) -> None:
        """Value ranges, checked where the config is read; errors name the field (``steps: must be >= 1, got -3``;
        a recipe prefixes the path: ``stages[0].train.steps``)."""
        from .strategy import STRATEGIES

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why}, got {getattr(self, name)!r}")

        for name, low in (("steps", 1), ("batch_size", 1), ("questions_per_image", 1), ("turns_per_sample", 1),
                          ("log_every", 1), ("num_nodes", 1), ("accumulate_grad_batches", 1), ("num_workers", 0),
                          ("checkpoint_every", 0)):
            if getattr(self, name) < low:
                raise bad(name, f"must be >= {low}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite number > 0")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "must be a finite number >= 0" + (" (0: no clipping)" if name == "grad_clip" else ""))
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for part, scale in self.lr_scale.items():
            if not (math.isfinite(scale) and scale >= 0):
                raise ConfigError(f"lr_scale.{part}: must be a finite number >= 0, got {scale!r}")
        if self.augment not in (None, "dihedral"):
            raise bad("augment", "expected null or 'dihedral'")
        if self.devices != "auto" and not (isinstance(self.devices, int) and self.devices >= 1):
            raise bad("devices", "must be an integer >= 1 or 'auto'")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"expected one of {', '.join(STRATEGIES)}")


class ZooLightningModule(L.LightningModule):
    """Trains a ZooModel on batches of ``input_ids``/``attention_mask``/``labels``/``pixel_values``.

    The loss is the model's (LM cross-entropy + weighted aux losses); each aux term is logged on its own.
    Frozen parameters are kept out of the optimizer. Under data parallelism the LM loss is weighted by each rank's
    share of the supervised tokens of the global batch, so training (and the logged loss) equals one process
    training on the whole global batch. A batch's ``data_position`` (streams) is remembered for checkpoints.
    """

    def __init__(self, model: ZooModel, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.losses: list[torch.Tensor] = []  # per batch, global (detached; no device sync while training)
        self.data_position: dict | None = None  # where the data continues after the last batch trained on
        self.last_routing = None  # the last forward's routing_stats, for routing callbacks

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        position = batch.pop("data_position", None)
        out = self.model(**batch)
        loss, lm_loss = out.loss, out.lm_loss
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and lm_loss is not None:
            # DDP averages the ranks' gradients: scale each rank's token-mean by its share of the global tokens
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(lm_loss.dtype)
            total = self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum")  # (reduces in place)
            loss = loss - lm_loss + lm_loss * tokens * world / total
        reported = loss.detach().clone()
        if world > 1:
            reported = self.trainer.strategy.reduce(reported, reduce_op="mean")
        self.losses.append(reported)
        self.last_routing = out.routing_stats  # not the whole output: its logits are large
        self.data_position = position
        size = batch["input_ids"].shape[0]
        self.log("train/loss", reported, prog_bar=True, batch_size=size)
        for name, value in out.aux_losses.items():
            self.log(f"train/aux/{name}", value, batch_size=size)
        return loss

    def configure_model(self) -> None:
        """Strategies that place the model themselves (`zoo.train.parallel.ZooParallelStrategy`: FSDP2, experts over
        ranks) do it here, before the optimizer is built."""
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self.model)

    def on_before_zero_grad(self, optimizer) -> None:
        # right after each optimiser step (once per accumulated step): the aux-loss-free balancing of bias routers
        self.model.update_balancing_biases()

    def configure_optimizers(self):
        return adamw_with_schedule(list(self.model.named_children()), self.config)


def adamw_with_schedule(parts: list[tuple[str, torch.nn.Module]], cfg: TrainConfig) -> dict:
    """AdamW over the trainable parameters of named ``parts`` (frozen ones hold no optimizer state; no weight decay on
    biases and norms; ``cfg.lr_scale`` per part name) with linear warm-up, then cosine decay to ``min_lr_ratio``:
    Lightning's ``configure_optimizers`` result."""
    names = [name for name, _ in parts]
    unknown = set(cfg.lr_scale) - set(names)
    if unknown:
        raise ValueError(f"lr_scale: unknown part(s) {sorted(unknown)}; parts: {names}")
    groups = []
    for part, module in parts:
        lr = cfg.lr * cfg.lr_scale.get(part, 1.0)
        params = [p for p in module.parameters() if p.requires_grad]  # frozen parts hold no optimizer state
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr, "name": f"{part}/decay"},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": f"{part}/no_decay"}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _MetricsLogger(L.pytorch.loggers.CSVLogger):
    """``run_dir/metrics.csv``, a row per logged step, written as it is logged (Lightning's default buffers 100 steps,
    which a crash would lose). ``resume_step``: a run resumed from the checkpoint of that optimizer step keeps the
    rows logged before it (Lightning's writer would delete the file) and drops the later ones, which it logs again."""

    def __init__(self, run_dir: str, resume_step: int | None):
        super().__init__(run_dir, name="", version="", flush_logs_every_n_steps=1)
        self.resume_step = resume_step

    def save(self) -> None:
        from zoo.checkpoint import writing

        with writing(Path(self.log_dir) / "metrics.csv"):  # a full disk is one line naming the file
            super().save()

    @property
    def experiment(self):
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if self._experiment is not None or self.resume_step is None or rank_zero_only.rank != 0:
            return super().experiment  # (other ranks get Lightning's dummy and must not touch the file)
        path = Path(self.log_dir) / "metrics.csv"
        fields, rows = [], []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < self.resume_step]
                fields = list(reader.fieldnames or [])
        writer = super().experiment  # removes an existing metrics.csv
        if fields:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fields)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = fields
        return writer


@contextlib.contextmanager
def without_log_lines(logger: logging.Logger, prefixes: tuple[str, ...]):
    """Drop ``logger``'s records whose message starts with one of ``prefixes`` (known notices that say nothing about
    the zoo's run), for the duration of the block; everything else passes."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefixes)

    drop = Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# Lightning's per-run info lines: the litlogger advertisement, the device summary (printed again for every stage) and
# the "max_steps reached" notice (the zoo reports each stage's end itself)
LIGHTNING_CHATTER = ("💡 Tip: For seamless cloud logging", "GPU available:", "TPU available:", "HPU available:",
                     "`Trainer.fit` stopped: `max_steps=")


@contextlib.contextmanager
def _quiet_lightning():
    """`LIGHTNING_CHATTER` off Lightning's rank-zero logger, and the FutureWarning torch raises each time Lightning's
    pytree helper builds a ``LeafSpec`` (lightning 2.6 with torch 2.14), for the duration of one ``fit``."""
    with without_log_lines(logging.getLogger("lightning.pytorch.utilities.rank_zero"), LIGHTNING_CHATTER), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        # frozen vision experts stay in eval mode on purpose (VisionExpert.train); Lightning warns about it
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        yield


def fit(model: torch.nn.Module, dataset, config: TrainConfig, run_dir: str | Path | None = None,
        progress: bool = True, resume: bool = False, callbacks: list[L.Callback] | None = None,
        module: L.LightningModule | None = None) -> L.LightningModule:
    """Train `model` in place on `dataset` (which provides ``collate``) for ``config.steps`` optimizer steps.

    ``run_dir``: ``metrics.csv`` and, with ``config.checkpoint_every``, ``checkpoints/step-NNNNNNNN`` (safetensors +
    JSON; see `zoo.train.checkpoint`). ``resume``: continue from the newest checkpoint there, if any; with a
    resumable dataset (`ConversationStream`) the result is bitwise the one of an uninterrupted run on CPU.
    ``callbacks``: more Lightning callbacks (e.g. `zoo.train.routing.RoutingMonitor`). ``module``: the Lightning
    module that trains `model` (default a `ZooLightningModule`; `zoo.train.contrastive.ContrastiveModule` for
    contrastive pretraining): it keeps ``losses`` and ``data_position`` as `ZooLightningModule` does.
    """
    from .checkpoint import PeriodicCheckpoint, ResumeState, SafetensorsCheckpointIO, checkpoint_step, latest_checkpoint
    from .parallel import ParallelTraining, ZooParallelStrategy, full_state_dict
    from .ranks import MemoryReport, RankWatch
    from .strategy import build_strategy, enable_gradient_checkpointing

    L.seed_everything(config.seed, workers=True, verbose=False)
    workers = {"num_workers": config.num_workers, "persistent_workers": config.num_workers > 0,
               "collate_fn": dataset.collate}
    if isinstance(dataset, IterableDataset):  # streams (webdataset, ConversationStream) come in their own order
        loader = DataLoader(dataset, batch_size=config.batch_size, **workers)
    elif config.questions_per_image > 1:
        if config.batch_size % config.questions_per_image:
            raise ValueError(f"batch_size: {config.batch_size} is not a multiple of questions_per_image "
                             f"{config.questions_per_image}")
        sampler = ImageGroupedBatchSampler([dataset.image_of(i) for i in range(len(dataset))],
                                           config.batch_size // config.questions_per_image,
                                           config.questions_per_image, seed=config.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, **workers)
    else:
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, **workers)
    checkpoints = Path(run_dir) / "checkpoints" if run_dir else None
    resume_from = latest_checkpoint(checkpoints) if resume and checkpoints else None
    if resume_from is not None and not hasattr(dataset, "load_state_dict"):
        raise ValueError(f"resume: {type(dataset).__name__} cannot restore its position; exact resume needs a "
                         "resumable dataset such as ConversationStream")
    if hasattr(dataset, "report_position"):
        dataset.report_position = True  # its batches say where the data continues; checkpoints record it
    strategy = build_strategy(config.strategy, model, expert_parallel=config.expert_parallel, devices=config.devices,
                              num_nodes=config.num_nodes, timeout=config.timeout,
                              deepspeed_config=config.deepspeed_config,
                              gradient_checkpointing=config.gradient_checkpointing)
    placed = isinstance(strategy, ZooParallelStrategy)  # trains a sharded copy; the weights come back at the end
    if config.gradient_checkpointing and not placed:  # (a placed model recomputes its FSDP units itself)
        enable_gradient_checkpointing(model)
    if module is not None and placed:
        raise ConfigError(f"train.strategy: {config.strategy} with expert_parallel {config.expert_parallel} places a "
                          f"ZooModel itself; {type(module).__name__} trains with strategy auto or ddp")
    module = module if module is not None else ZooLightningModule(copy.deepcopy(model) if placed else model, config)
    resume_step = checkpoint_step(resume_from) if resume_from is not None else None
    logger = _MetricsLogger(str(run_dir), resume_step) if run_dir else False
    watch = RankWatch(config.timeout)
    extra = [ResumeState(dataset), watch] + ([ParallelTraining(config.grad_clip)] if placed else [])
    extra += [MemoryReport(run_dir)] if run_dir else []
    if config.checkpoint_every:
        if checkpoints is None:
            raise ValueError("checkpoint_every: periodic checkpoints need a run directory")
        if config.strategy.startswith("deepspeed"):
            raise ConfigError("train.checkpoint_every: DeepSpeed writes its own pickled checkpoints, which zoo does "
                              "not load; use strategy ddp or fsdp for resumable runs")
        extra.append(PeriodicCheckpoint(checkpoints, config.checkpoint_every))
    with _quiet_lightning():
        trainer = L.Trainer(max_steps=config.steps, accelerator="auto", devices=config.devices,
                            num_nodes=config.num_nodes, strategy=strategy,
                            precision=config.precision, accumulate_grad_batches=config.accumulate_grad_batches,
                            plugins=[SafetensorsCheckpointIO()], logger=logger,
                            callbacks=extra + list(callbacks or []), enable_checkpointing=False,
                            enable_progress_bar=progress, enable_model_summary=False,
                            gradient_clip_val=None if placed else config.grad_clip or None,
                            log_every_n_steps=config.log_every, num_sanity_val_steps=0, deterministic=False)
        try:
            trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from is not None else None)
        except Exception as error:  # a collective failed: name the rank that stopped, if one did
            explained = watch.explain(error)
            if explained is not None:
                raise explained from error
            raise
        finally:
            watch.close()
    if placed:
        model.load_state_dict(full_state_dict(module.model))
    return module
