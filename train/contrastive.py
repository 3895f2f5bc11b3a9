"""Contrastive image-text pretraining of the vision expert with open_clip: a recipe stage with
``objective: contrastive`` (stage 0 of ``configs/recipes/easy-vqa.yaml``).

Every LVLM this zoo reproduces starts from a contrastively pretrained tower (CLIP, SigLIP) and keeps it frozen while
the connector is aligned. This stage makes one: the model's vision expert must be an open_clip model name (e.g.
``tiny-byob-clip``, a zoo config registered with open_clip's ``add_model_config``); open_clip builds the whole CLIP
model of that name (image tower + text tower), which trains on the stage's (image, caption) pairs with open_clip's
loss, and is saved as an open_clip ``local-dir`` checkpoint (``open_clip_config.json`` + ``open_clip_model.safetensors``,
what ``open_clip.create_model("local-dir:...")`` reads). The zoo then loads that checkpoint as its vision expert
through the ``open_clip`` expert kind (``vision.name: local-dir:<stage>/open_clip``), frozen unless
``contrastive.freeze`` is false.

Repeated captions. Many images share a caption ("a red circle"), so one batch holds several positives per caption.
The text tower encodes each distinct caption of the batch once; image i's target is its caption (cross-entropy over
the batch's distinct captions) and caption u's target is the uniform distribution over the images that carry it
(soft-target cross-entropy): `MultiPositiveClipLoss`. With all captions distinct this is exactly open_clip's
``ClipLoss``. The SigLIP variant (`MultiPositiveSigLipLoss`) labels every (image, caption) pair +1 when the image
carries the caption and -1 otherwise; with distinct captions it is exactly open_clip's ``SigLipLoss``.

A linear probe reports what the frozen features know: the stage holds ``contrastive.hold_out`` of its images out of
training, fits a logistic regression on the expert's tokens (flattened, as the connector sees them) of the others
and scores it on the held-out ones, for each label the samples carry (easy-vqa captions: colour and shape), before
training (the random tower) and after.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.data import IterableDataset

from zoo.config import ConfigError, VisionConfig
from zoo.encoders import build_encoder
from zoo.model import ZooModel

from .conversations import BadSample, load_image
from .data import SkipCounter
from .module import TrainConfig, adamw_with_schedule, fit, without_log_lines

log = logging.getLogger(__name__)

OPEN_CLIP_DIR = "open_clip"  # inside the stage directory


@dataclass
class ContrastiveConfig:
    """Settings of an ``objective: contrastive`` stage: ``loss`` (``clip`` or ``siglip``, both with repeated
    captions as multiple positives), ``hold_out`` images kept out of training for the linear probe (0: no probe),
    ``freeze``: the pretrained tower stays frozen for the later stages."""

    loss: Literal["clip", "siglip"] = "clip"
    hold_out: int = 500
    freeze: bool = True

    def __post_init__(self):
        if self.hold_out < 0:
            raise ConfigError(f"contrastive.hold_out: expected >= 0, got {self.hold_out}")


# --------------------------------------------------------------------------------------------- losses
def _positives(caption_index: torch.Tensor, captions: int) -> torch.Tensor:
    """``[B, U]``: 1 where image b carries caption u."""
    return F.one_hot(caption_index, captions).to(torch.float32)


class MultiPositiveClipLoss(ClipLoss):
    """open_clip's CLIP loss over a batch of images and its distinct captions (see the module docstring).

    ``forward(image_features [B, D], text_features [U, D], logit_scale, caption_index [B] in 0..U-1)``; features
    L2-normalised as open_clip's ``encode_*(normalize=True)`` gives them. Local to one process (no feature gather).
    """

    def forward(self, image_features, text_features, logit_scale, caption_index, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            raise ValueError("MultiPositiveClipLoss: computed per process; gathering features is not supported")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        positives = _positives(caption_index, text_features.shape[0]).to(logits_per_image.dtype)
        per_caption = positives.T / positives.T.sum(1, keepdim=True)  # uniform over the images of each caption
        loss = (F.cross_entropy(logits_per_image, caption_index) + F.cross_entropy(logits_per_text, per_caption)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class MultiPositiveSigLipLoss(SigLipLoss):
    """open_clip's SigLIP loss with labels +1 for every (image, caption) pair where the image carries the caption and
    -1 elsewhere; same arguments as `MultiPositiveClipLoss` (``logit_bias`` required, as SigLIP learns one)."""

    def forward(self, image_features, text_features, logit_scale, caption_index, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            raise ValueError("MultiPositiveSigLipLoss: computed per process; exchanging features is not supported")
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = 2 * _positives(caption_index, text_features.shape[0]).to(logits.dtype) - 1
        loss = -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
        return {"contrastive_loss": loss} if output_dict else loss


LOSSES = {"clip": MultiPositiveClipLoss, "siglip": MultiPositiveSigLipLoss}


# --------------------------------------------------------------------------------------------- data
@dataclass
class CaptionedPixels:
    """Preprocessed images ``[N, 3, S, S]`` with their captions and optional labels per task."""

    pixels: torch.Tensor
    captions: list[str]
    labels: dict[str, list[str]]
    ids: list[str]

    def subset(self, rows: list[int]) -> CaptionedPixels:
        return CaptionedPixels(self.pixels[rows], [self.captions[r] for r in rows],
                               {k: [v[r] for r in rows] for k, v in self.labels.items()}, [self.ids[r] for r in rows])


def caption_pairs(sources: list, expert, skipped: SkipCounter) -> CaptionedPixels:
    """(image, caption) pairs of conversation sources: each conversation's single image and its first assistant turn
    (the caption); a conversation with no or several images, no caption or an unreadable image is skipped and
    counted. Images are preprocessed by ``expert`` once."""
    images, captions, ids = [], [], []
    labels: dict[str, list[str]] = {}
    for source in sources:
        for sample in (source() if callable(source) else source):
            caption = next((t for r, t in sample.turns if r == "assistant"), "").strip()
            try:
                if len(sample.images) != 1:
                    raise BadSample(f"contrastive pairs need one image per sample, got {len(sample.images)}")
                if not caption:
                    raise BadSample("no caption (assistant turn)")
                images.append(load_image(sample.images[0]))
            except BadSample as e:
                skipped.skip(str(e), sample.id)
                continue
            captions.append(caption)
            ids.append(sample.id)
            for task, value in getattr(sample, "labels", {}).items():
                labels.setdefault(task, []).append(value)
    if not images:
        raise ValueError("data: the contrastive stage found no (image, caption) pair in its sources")
    labels = {k: v for k, v in labels.items() if len(v) == len(images)}  # tasks every sample labels
    return CaptionedPixels(expert.preprocess(images), captions, labels, ids)


class CaptionBatches(IterableDataset):
    """Endless single images with their caption index, in a fresh seeded order every epoch; batches (`collate`) are
    ``{"pixel_values": [B, 3, S, S], "caption": [B]}`` with ``caption`` indexing `names`. Resumable exactly
    (``state_dict`` / ``load_state_dict``: the number of samples consumed)."""

    def __init__(self, data: CaptionedPixels, seed: int = 0):
        self.data = data
        self.names = sorted(set(data.captions))
        lookup = {name: i for i, name in enumerate(self.names)}
        self.index = torch.tensor([lookup[c] for c in data.captions])
        self.seed, self.start = seed, 0
        self.report_position = False

    def __iter__(self):
        n, epoch, position = len(self.index), 0, 0
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for row in order:
                if position >= self.start:
                    yield row, position
                position += 1
            epoch += 1

    def collate(self, batch) -> dict[str, torch.Tensor]:
        rows = [row for row, _ in batch]
        out = {"pixel_values": self.data.pixels[rows], "caption": self.index[rows]}
        if self.report_position:
            out["data_position"] = {"consumed": batch[-1][1] + 1}
        return out

    def state_dict(self, position: dict | None = None) -> dict:
        return {"position": dict(position or {"consumed": self.start})}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["position"]["consumed"])


class ContrastiveModule(L.LightningModule):
    """Trains an open_clip CLIP model on `CaptionBatches` with a multi-positive loss; the text tower encodes each
    distinct caption of a batch once. Keeps ``losses`` and ``data_position`` for `fit`'s checkpoints."""

    def __init__(self, clip: torch.nn.Module, tokens: torch.Tensor, loss: ClipLoss | SigLipLoss, config: TrainConfig):
        super().__init__()
        self.clip, self.loss_fn, self.config = clip, loss, config
        self.register_buffer("tokens", tokens, persistent=False)  # [captions, context] of CaptionBatches.names
        self.losses: list[torch.Tensor] = []
        self.data_position: dict | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.data_position = batch.pop("data_position", None)
        unique, caption_index = batch["caption"].unique(return_inverse=True)
        image = self.clip.encode_image(batch["pixel_values"], normalize=True)
        text = self.clip.encode_text(self.tokens[unique], normalize=True)
        bias = getattr(self.clip, "logit_bias", None)
        loss = self.loss_fn(image, text, self.clip.logit_scale.exp(), caption_index, logit_bias=bias)
        self.losses.append(loss.detach().clone())
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(caption_index))
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule([("clip", self.clip)], self.config)


# --------------------------------------------------------------------------------------------- open_clip I/O
def create_clip(vision: VisionConfig, loss: str = "clip"):
    """``(model, tokenizer, model_cfg, preprocess_cfg)``: the whole open_clip model the vision expert's name stands
    for (random weights unless ``vision.pretrained``); ``loss: siglip`` gives it SigLIP's learnable logit bias."""
    import open_clip

    from zoo.encoders.open_clip_expert import register_model_configs

    if vision.kind != "open_clip" or not vision.name:
        raise ConfigError(f"vision.kind: a contrastive stage pretrains an open_clip tower; the model's vision expert "
                          f"is {vision.kind!r} {vision.name or ''} (use kind open_clip with a model name such as "
                          "tiny-byob-clip)")
    register_model_configs()
    model_cfg = open_clip.get_model_config(vision.name) if not vision.name.startswith(("local-dir:", "hf-hub:")) else None
    if model_cfg is None and not vision.pretrained:
        raise ConfigError(f"vision.name: {vision.name!r} is not an open_clip model config (open_clip.list_models(); "
                          "the zoo's own are in configs/open_clip)")
    kwargs = {"init_logit_bias": -10.0} if loss == "siglip" else {}
    tag = vision.kwargs.get("pretrained_tag") if vision.pretrained else None
    with without_log_lines(logging.getLogger(), ("No pretrained weights loaded",)):  # random on purpose
        model = open_clip.create_model(vision.name, pretrained=tag, **kwargs)
    if model_cfg is None:  # local-dir / hf-hub: the checkpoint's own config
        from zoo.encoders.open_clip_expert import _source

        model_cfg = _source(open_clip, vision.name, vision.name.split(":", 1)[0])["model_cfg"]
    preprocess = dict(model.visual.preprocess_cfg)
    return model, open_clip.get_tokenizer(vision.name), dict(model_cfg), preprocess


def save_open_clip(clip: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, directory: str | Path) -> Path:
    """Write an open_clip ``local-dir`` checkpoint (config + safetensors weights), atomically per file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "open_clip_model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: preprocess_cfg[k] for k in ("mean", "std", "size",
                                                                                          "interpolation", "resize_mode")
                                                         if k in preprocess_cfg}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def pretrained_expert(model: ZooModel, directory: str | Path, freeze: bool) -> VisionConfig:
    """Replace the model's vision expert by the open_clip checkpoint in ``directory`` (through the ``open_clip``
    expert kind, ``local-dir:``); the model config records it. Returns the new vision config."""
    config = dataclasses.replace(model.config.vision, name=f"local-dir:{Path(directory).resolve()}", pretrained=True,
                                 frozen=freeze, kwargs={})
    expert = build_encoder(config).to(next(model.parameters()).device)
    model.vision = expert
    model.config.vision = config
    return config


# --------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def expert_features(expert, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[N, L * C]``: the expert's tokens (what the connector reads), flattened, in eval mode."""
    was_training = expert.training
    expert.eval()
    try:
        return torch.cat([expert(pixels[i:i + batch_size]).flatten(1) for i in range(0, len(pixels), batch_size)])
    finally:
        expert.train(was_training)


def linear_probe(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str],
                 weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Accuracy on ``test`` of a multinomial logistic regression fit on ``train`` (standardised features, L2
    penalty, L-BFGS): how linearly the features separate the labels."""
    classes = sorted(set(train_y) | set(test_y))
    lookup = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([lookup[v] for v in train_y])
    y_test = torch.tensor([lookup[v] for v in test_y])
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x_train, x_test = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def probe_expert(expert, train: CaptionedPixels, held_out: CaptionedPixels) -> dict[str, float]:
    """Linear-probe accuracy per label task of ``expert``'s frozen features, trained on ``train``, scored on
    ``held_out``."""
    if not train.labels or not len(held_out.ids):
        return {}
    x_train, x_test = expert_features(expert, train.pixels), expert_features(expert, held_out.pixels)
    return {task: linear_probe(x_train, train.labels[task], x_test, held_out.labels[task]) for task in train.labels}


# --------------------------------------------------------------------------------------------- the stage
def run_contrastive_stage(model: ZooModel, sources: list, contrastive: ContrastiveConfig, train: TrainConfig,
                          stage_dir: Path, skipped: SkipCounter, progress: bool = True, resume: bool = False,
                          seed: int = 0, callbacks: list | None = None) -> tuple[dict, list[float]]:
    """Pretrain the model's open_clip vision tower on the (image, caption) pairs of ``sources`` (see the module
    docstring), save it under ``stage_dir/open_clip`` and make it the model's vision expert. Returns the stage's
    report (pairs, held-out images, distinct captions, probe accuracies before and after) and the loss per step."""
    vision = model.config.vision
    if not isinstance(vision, VisionConfig):
        raise ConfigError("vision: a contrastive stage pretrains one vision expert; the model has several")
    torch.manual_seed(seed)
    clip, tokenizer, model_cfg, preprocess_cfg = create_clip(vision, contrastive.loss)
    _check_tower(model.vision, clip.visual, vision.name)
    data = caption_pairs(sources, model.vision, skipped)
    order = list(range(len(data.ids)))
    random.Random(seed).shuffle(order)
    hold_out = min(contrastive.hold_out, len(order) // 2)
    held_out, kept = data.subset(sorted(order[:hold_out])), data.subset(sorted(order[hold_out:]))
    report = {"pairs": len(kept.ids), "held_out": len(held_out.ids), "captions": len(set(kept.captions)),
              "loss": contrastive.loss, "probe_random_tower": probe_expert(model.vision, kept, held_out)}
    batches = CaptionBatches(kept, seed=seed)
    module = ContrastiveModule(clip, tokenizer(batches.names), LOSSES[contrastive.loss](), train)
    trained = fit(clip, batches, train, run_dir=stage_dir, progress=progress, resume=resume, module=module,
                  callbacks=callbacks)
    directory = save_open_clip(clip, model_cfg, preprocess_cfg, stage_dir / OPEN_CLIP_DIR)
    pretrained_expert(model, directory, contrastive.freeze)
    report.update(probe=probe_expert(model.vision, kept, held_out), checkpoint=str(directory))
    for task, accuracy in report["probe"].items():
        before = report["probe_random_tower"].get(task)
        log.info("linear probe (%s) on %d held-out images: %.1f%% (random tower %.1f%%)", task, hold_out,
                 100 * accuracy, 100 * before if before is not None else float("nan"))
    return report, [float(v) for v in trained.losses]


def _check_tower(expert, visual: torch.nn.Module, name: str) -> None:
    """The CLIP model's image tower must be the architecture of the zoo's expert (same parameter names and shapes,
    up to the layers the expert prunes)."""
    theirs = {k: tuple(v.shape) for k, v in visual.state_dict().items()}
    ours = expert.state_dict()
    prefix = "trunk." if hasattr(expert, "trunk") else ""
    for key, value in ours.items():
        mapped = key.replace("trunk.model.", "trunk.", 1) if prefix else key.removeprefix("model.")
        if theirs.get(mapped) != tuple(value.shape):
            raise ConfigError(f"vision: open_clip's {name!r} image tower does not match the zoo's expert at {key} "
                              f"({theirs.get(mapped)} vs {tuple(value.shape)})")


__all__ = ["CaptionBatches", "CaptionedPixels", "ContrastiveConfig", "ContrastiveModule", "LOSSES",
           "MultiPositiveClipLoss", "MultiPositiveSigLipLoss", "caption_pairs", "create_clip", "linear_probe",
           "pretrained_expert", "probe_expert", "run_contrastive_stage", "save_open_clip"]
