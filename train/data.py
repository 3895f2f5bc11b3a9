"""VQA data for training: the easy-vqa set, encoding to token ids with answer-only labels, and batching."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from zoo.config import ConfigError
from zoo.encoders import FeatureCache, map_pixels, num_images
from zoo.images import ImageError, open_image
from zoo.model import IGNORE_INDEX, ZooModel, pad_token_ids

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass
class VQASample:
    """One question about one image; ``image`` indexes the split's image list."""

    image: int
    question: str
    answer: str
    id: str


@dataclass
class VQASplit:
    """A VQA split: images (PIL, loaded once) and the questions about them; ``skipped`` holds the questions left
    out because their image cannot be used (by reason, naming the file)."""

    images: list[Image.Image]
    samples: list[VQASample]
    skipped: SkipCounter = field(default_factory=lambda: SkipCounter())


def load_easy_vqa(split: str = "train", limit: int | None = None) -> VQASplit:
    """The easy-vqa data shipped inside the ``easy-vqa`` package (no download): 64x64 shape images. ``limit``: the
    first N questions only, and only their images are opened (a short run does not decode all 4,000)."""
    import easy_vqa

    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: must be >= 1 (or null for all questions), got {limit}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    triples = list(zip(questions, answers, image_ids))[:limit]
    if limit is not None:
        needed = {image_id for _q, _a, image_id in triples}
        paths = {image_id: path for image_id, path in paths.items() if image_id in needed}
    return read_vqa_split(triples, paths, f"easy-vqa/{split}")


def read_vqa_split(questions: Sequence[tuple[str, str, int]], image_paths: Mapping[int, str | Path],
                   prefix: str) -> VQASplit:
    """A split in easy-vqa's layout: ``(question, answer, image id)`` triples and the image file of each id.
    Question ``n`` gets the id ``<prefix>/<n>``; images are ordered by id. An image the models cannot take
    (`zoo.images`: unreadable, empty, too small, a decompression bomb, 16-bit pixels) is left out, and every question
    about it is a counted, logged skip (``skipped``) whose reason names the file."""
    images, position, unusable = [], {}, {}
    for image_id in sorted(image_paths):
        try:
            images.append(open_image(image_paths[image_id]))
            position[image_id] = len(images) - 1
        except ImageError as e:
            unusable[image_id] = str(e)
    split = VQASplit(images, [])
    for n, (question, answer, image_id) in enumerate(questions):
        if image_id in unusable:
            split.skipped.skip(unusable[image_id], f"{prefix}/{n}")
        else:
            split.samples.append(VQASample(position[image_id], question, answer, f"{prefix}/{n}"))
    return split


class SkipCounter:
    """Counts skipped samples by reason and remembers their ids (logged, never silent). A sample skipped again for
    the same reason (a later epoch, or a replay after resuming) is counted once."""

    def __init__(self):
        self.by_reason: dict[str, list[str]] = {}
        self._seen: set[tuple[str, str]] = set()

    def skip(self, reason: str, sample_id: str, log_each: bool = True) -> None:
        """Count ``sample_id`` under ``reason``; logged as a warning unless ``log_each`` is false (the caller then
        logs a summary, for skips that are expected by the hundred)."""
        if self._add(reason, sample_id) and log_each:
            log.warning("skipping sample %s: %s", sample_id, reason)

    def extend(self, other: SkipCounter) -> None:
        """Count ``other``'s skips here too (they were logged when ``other`` counted them)."""
        for reason, ids in other.by_reason.items():
            for sample_id in ids:
                self._add(reason, sample_id)

    def _add(self, reason: str, sample_id: str) -> bool:
        if (reason, sample_id) in self._seen:
            return False
        self._seen.add((reason, sample_id))
        self.by_reason.setdefault(reason, []).append(sample_id)
        return True

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def state_dict(self) -> dict[str, list[str]]:
        return {reason: list(ids) for reason, ids in self.by_reason.items()}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.by_reason, self._seen = {}, set()
        for reason, ids in state.items():
            for sample_id in ids:
                self._add(reason, sample_id)


Item = tuple[int, list[int], list[tuple[int, int]]]  # (image, token ids, supervised [start, end) spans)


class VQATrainingSet(Dataset):
    """Encodes VQA samples as token ids with labels on the answers (+ EOS) only.

    ``turns_per_sample=1``: one item per question, ``prompt + answer``. ``turns_per_sample=K > 1``: one item per
    image, holding up to K of its questions as a multi-turn conversation (the first turn in the prompt template,
    later turns as ``question answer</s>`` after it), drawn in a fresh random order at every access: the way
    LLaVA-1.5 packs the VQAv2 questions of an image, so the image is encoded once for all of them.

    The images of the split are preprocessed once by the model's vision expert, or, with ``features`` (a
    `zoo.encoders.FeatureCache` of the frozen tower), encoded once into the cache and read from it in every batch
    (``image_features`` instead of ``pixel_values``: the align stage never runs the experts). ``augment="dihedral"``
    applies a random flip/rotation to each image of each batch. A sample that would be longer than
    ``model.config.max_length`` after image expansion is truncated (whole later turns are dropped); if no answer
    token survives it is skipped and counted in ``skipped`` (with its id), never trained on with an all-masked
    label row.
    """

    def __init__(self, model: ZooModel, split: VQASplit, augment: str | None = None, turns_per_sample: int = 1,
                 features: FeatureCache | None = None):
        if augment not in (None, "dihedral"):
            raise ValueError(f"augment: expected None or 'dihedral', got {augment!r}")
        if turns_per_sample < 1:
            raise ValueError(f"turns_per_sample: expected >= 1, got {turns_per_sample}")
        if features is not None and augment is not None:
            raise ValueError("augment: cached features are of the unaugmented images; use augment=None with features")
        self.augment, self.turns = augment, turns_per_sample
        if features is not None:  # frozen vision: read its outputs from the cache, never run it
            features.add(split.images)
            self.pixels, self.features = None, features.get(split.images)
        else:
            self.pixels, self.features = model.vision.preprocess(split.images), None
        self.skipped = SkipCounter()
        self.skipped.extend(split.skipped)  # questions about images that cannot be used
        self.budget = model.config.max_length - (model.num_image_tokens - 1)
        self.pad_id = model.tokenizer.pad_token_id
        tokenizer = model.tokenizer
        # Per sample: (image, first-turn prompt ids, follow-up question ids, answer ids + EOS)
        self.encoded: list[tuple[int, list[int], list[int], list[int]]] = []
        for sample in split.samples:
            prompt = model.encode_prompt(sample.question)
            answer = model.encode_answer(sample.answer)
            if len(prompt) >= self.budget:
                self.skipped.skip(f"no answer token left after truncation to max_length "
                                  f"{model.config.max_length}", sample.id)
                continue
            follow_up = tokenizer(sample.question, add_special_tokens=False).input_ids if self.turns > 1 else []
            self.encoded.append((sample.image, prompt, follow_up, answer))
        if self.turns == 1:
            self.groups = [[i] for i in range(len(self.encoded))]
        else:
            by_image: dict[int, list[int]] = {}
            for i, (image, *_rest) in enumerate(self.encoded):
                by_image.setdefault(image, []).append(i)
            self.groups = list(by_image.values())

    @property
    def num_questions(self) -> int:
        """Questions kept (after skips)."""
        return len(self.encoded)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Item:
        group = self.groups[index]
        if len(group) > 1:
            group = [group[i] for i in torch.randperm(len(group)).tolist()[: self.turns]]
        ids: list[int] = []
        spans = []
        for turn, sample in enumerate(group):
            image, prompt, follow_up, answer = self.encoded[sample]
            question = prompt if turn == 0 else follow_up
            if turn and len(ids) + len(question) + len(answer) > self.budget:
                break  # whole later turns are dropped; they come back in other draws
            ids += question
            spans.append((len(ids), min(len(ids) + len(answer), self.budget)))
            ids = (ids + answer)[: self.budget]
        return self.encoded[group[0]][0], ids, spans

    def collate(self, batch: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[B, T]``, the batch's distinct images as
        ``pixel_values`` and ``image_index`` mapping each sample to its image."""
        input_ids, mask = pad_token_ids([ids for _, ids, _ in batch], self.pad_id, "right")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (_, _, spans) in enumerate(batch):
            for start, end in spans:
                labels[row, start:end] = input_ids[row, start:end]
        # Each distinct image of the batch is encoded once; image_index maps the samples to them.
        images, image_index = torch.tensor([image for image, _, _ in batch]).unique(return_inverse=True)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "image_index": image_index}
        if self.features is not None:
            feats = self.features
            batch["image_features"] = [f[images] for f in feats] if isinstance(feats, list) else feats[images]
            return batch
        pixels = map_pixels(self.pixels, lambda t: t[images])
        if self.augment == "dihedral":
            pixels = dihedral(pixels)
        batch["pixel_values"] = pixels
        return batch

    def image_of(self, index: int) -> int:
        """The image (index into the split's images) that item `index` asks about."""
        return self.encoded[self.groups[index][0]][0]


def dihedral(pixels: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Each image ``[N, 3, S, S]`` under a random one of the 8 flips/rotations of the square (for data whose
    answers do not depend on orientation, such as easy-vqa's colours and shapes); several experts' pixels of the
    same image get the same transform."""
    n = num_images(pixels)
    turns = torch.randint(0, 4, (n,)).tolist()
    flips = torch.randint(0, 2, (n,)).tolist()

    def apply(batch: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(batch)
        for i, (k, flip) in enumerate(zip(turns, flips)):
            image = torch.rot90(batch[i], k, dims=(1, 2))
            out[i] = image.flip(2) if flip else image
        return out

    return map_pixels(pixels, apply)


class ImageGroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``images_per_batch`` images x up to ``questions_per_image`` questions about each.

    With several questions per image in a batch, the vision expert runs once per image for all of them (the
    collate step passes ``image_index``), which is where most of a small model's step time goes. Every item is
    seen once per epoch; the order is reshuffled each epoch from ``seed`` + epoch.
    """

    def __init__(self, image_of: Sequence[int], images_per_batch: int, questions_per_image: int, seed: int = 0):
        if images_per_batch < 1 or questions_per_image < 1:
            raise ValueError(f"images_per_batch and questions_per_image must be >= 1, got {images_per_batch} "
                             f"and {questions_per_image}")
        self.by_image: dict[int, list[int]] = {}
        for item, image in enumerate(image_of):
            self.by_image.setdefault(image, []).append(item)
        self.images_per_batch, self.questions_per_image, self.seed = images_per_batch, questions_per_image, seed
        self.epoch = 0

    def _chunks(self, generator: torch.Generator) -> list[list[int]]:
        chunks = []
        for items in self.by_image.values():
            order = torch.randperm(len(items), generator=generator).tolist()
            shuffled = [items[i] for i in order]
            chunks += [shuffled[i:i + self.questions_per_image] for i in range(0, len(shuffled), self.questions_per_image)]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        chunks = self._chunks(generator)
        for start in range(0, len(chunks) - self.images_per_batch + 1, self.images_per_batch):
            yield [item for chunk in chunks[start:start + self.images_per_batch] for item in chunk]

    def __len__(self) -> int:
        n_chunks = sum(-(-len(v) // self.questions_per_image) for v in self.by_image.values())
        return n_chunks // self.images_per_batch
