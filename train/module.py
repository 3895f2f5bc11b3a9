"""The Lightning module and a one-stage ``fit`` for a :class:`~zoo.model.ZooModel`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from zoo.model import ZooModel

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


class ZooLightningModule(L.LightningModule):
    """Trains a ZooModel on batches of ``input_ids``/``attention_mask``/``labels``/``pixel_values``.

    The loss is the model's (LM cross-entropy + weighted aux losses); each aux term is logged on its own.
    Frozen parameters are kept out of the optimizer.
    """

    def __init__(self, model: ZooModel, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.losses: list[torch.Tensor] = []  # per optimizer step (detached; no device sync while training)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.losses.append(out.loss.detach())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        for name, value in out.aux_losses.items():
            self.log(f"train/aux/{name}", value, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def configure_optimizers(self):
        cfg = self.config
        unknown = set(cfg.lr_scale) - {name for name, _ in self.model.named_children()}
        if unknown:
            raise ValueError(f"lr_scale: unknown part(s) {sorted(unknown)}; parts: "
                             f"{[name for name, _ in self.model.named_children()]}")
        groups = []
        for part, module in self.model.named_children():
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


def fit(model: ZooModel, dataset, config: TrainConfig, run_dir: str | Path | None = None,
        progress: bool = True) -> ZooLightningModule:
    """Train `model` in place on `dataset` (which provides ``collate``) for ``config.steps`` optimizer steps."""
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
    module = ZooLightningModule(model, config)
    logger = L.pytorch.loggers.CSVLogger(str(run_dir), name="", version="") if run_dir else False
    trainer = L.Trainer(max_steps=config.steps, accelerator="auto", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                        gradient_clip_val=config.grad_clip or None, log_every_n_steps=config.log_every,
                        num_sanity_val_steps=0, deterministic=False)
    with warnings.catch_warnings():
        # frozen vision experts stay in eval mode on purpose (VisionExpert.train); Lightning warns about it
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, loader)
    return module
