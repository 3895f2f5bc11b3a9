"""VQA data for training: the easy-vqa set, encoding to token ids with answer-only labels, and batching."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from zoo.model import IGNORE_INDEX, ZooModel

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
    """A VQA split: images (PIL, loaded once) and the questions about them."""

    images: list[Image.Image]
    samples: list[VQASample]


def load_easy_vqa(split: str = "train") -> VQASplit:
    """The easy-vqa data shipped inside the ``easy-vqa`` package (no download): 64x64 shape images."""
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    order = sorted(paths)
    position = {image_id: i for i, image_id in enumerate(order)}
    images = []
    for image_id in order:
        with Image.open(paths[image_id]) as im:
            images.append(im.convert("RGB"))
    samples = [VQASample(position[i], q, a, f"easy-vqa/{split}/{n}")
               for n, (q, a, i) in enumerate(zip(questions, answers, image_ids))]
    return VQASplit(images, samples)


class SkipCounter:
    """Counts skipped samples by reason and remembers their ids (logged, never silent)."""

    def __init__(self):
        self.by_reason: dict[str, list[str]] = {}

    def skip(self, reason: str, sample_id: str) -> None:
        self.by_reason.setdefault(reason, []).append(sample_id)
        log.warning("skipping sample %s: %s", sample_id, reason)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_reason.values())


class VQATrainingSet(Dataset):
    """Encodes each sample as prompt + answer token ids with labels on the answer (+ EOS) only.

    The images of the split are preprocessed once by the model's vision expert; ``augment="dihedral"`` applies a
    random flip/rotation to each image of each batch. A sample that would be longer
    than ``model.config.max_length`` after image expansion is truncated; if no answer token survives it is
    skipped and counted in ``skipped`` (with its id), never trained on with an all-masked label row.
    """

    def __init__(self, model: ZooModel, split: VQASplit, augment: str | None = None):
        if augment not in (None, "dihedral"):
            raise ValueError(f"augment: expected None or 'dihedral', got {augment!r}")
        self.augment = augment
        self.pixels = model.vision.preprocess(split.images)
        self.skipped = SkipCounter()
        budget = model.config.max_length - (model.num_image_tokens - 1)
        self.items: list[tuple[int, list[int], int]] = []  # (image, ids, number of prompt tokens)
        for sample in split.samples:
            prompt = model.encode_prompt(sample.question)
            ids = (prompt + model.encode_answer(sample.answer))[:budget]
            if len(ids) <= len(prompt):
                self.skipped.skip(f"no answer token left after truncation to max_length "
                                  f"{model.config.max_length}", sample.id)
                continue
            self.items.append((sample.image, ids, len(prompt)))
        self.pad_id = model.tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, list[int], int]:
        return self.items[index]

    def collate(self, batch: Sequence[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` and ``pixel_values``."""
        width = max(len(ids) for _, ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, ids, n_prompt) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
            labels[row, n_prompt:len(ids)] = input_ids[row, n_prompt:len(ids)]
        # Each distinct image of the batch is encoded once; image_index maps the samples to them.
        images, image_index = torch.tensor([image for image, _, _ in batch]).unique(return_inverse=True)
        pixels = self.pixels[images]
        if self.augment == "dihedral":
            pixels = dihedral(pixels)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "pixel_values": pixels, "image_index": image_index}

    def image_of(self, index: int) -> int:
        """The image (index into the split's images) that item `index` asks about."""
        return self.items[index][0]


def dihedral(pixels: torch.Tensor) -> torch.Tensor:
    """Each image ``[N, 3, S, S]`` under a random one of the 8 flips/rotations of the square (for data whose
    answers do not depend on orientation, such as easy-vqa's colours and shapes)."""
    out = torch.empty_like(pixels)
    turns = torch.randint(0, 4, (len(pixels),)).tolist()
    flips = torch.randint(0, 2, (len(pixels),)).tolist()
    for i, (k, flip) in enumerate(zip(turns, flips)):
        image = torch.rot90(pixels[i], k, dims=(1, 2))
        out[i] = image.flip(2) if flip else image
    return out


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
