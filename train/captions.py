"""Captions from VQA answers: what the questions about an easy-vqa image reveal of its colour and shape, as
``"a {colour} {shape}"`` captions for contrastive pretraining (stage 0) and LLaVA-style alignment (stage 1).

Only the answers of the split itself are read (the recipe uses the train split; the test split is never looked at
before evaluation). An easy-vqa image holds one shape of one colour; its questions reveal them directly ("what
shape is present?" -> circle), through the question ("what color is the triangle?" names the shape, "what is the
gray shape?" the colour) or through yes/no answers ("is there not a red shape?" -> no: it is red; -> yes: it is
not, and a shape ruled out twice leaves the third). An image whose questions leave its colour or its shape open, or
contradict each other, gets no caption and is counted as skipped with the reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .data import SkipCounter, VQASplit

log = logging.getLogger(__name__)

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_NEGATIONS = {"not", "no"}


@dataclass
class CaptionedImage:
    """One image of a split (``image`` indexes ``VQASplit.images``) with the facts its questions reveal."""

    image: int
    colour: str
    shape: str
    id: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


class _Facts:
    """What is known of one image: the attribute values present, and those ruled out."""

    def __init__(self):
        self.present: dict[str, set[str]] = {"colour": set(), "shape": set()}
        self.absent: dict[str, set[str]] = {"colour": set(), "shape": set()}

    def value(self, attribute: str, choices: tuple[str, ...]) -> str | None:
        present = self.present[attribute]
        if len(present) == 1:
            return next(iter(present))
        if not present:
            left = [c for c in choices if c not in self.absent[attribute]]
            return left[0] if len(left) == 1 else None
        return None  # contradictory: two values said to be present

    def contradictory(self) -> bool:
        return any(len(v) > 1 or v & self.absent[a] for a, v in self.present.items())


def _mentions(words: set[str]) -> dict[str, set[str]]:
    return {"colour": words & set(COLOURS), "shape": words & set(SHAPES)}


def image_facts(split: VQASplit) -> dict[int, _Facts]:
    """Per image index, the colours and shapes its questions' answers say are present or absent."""
    facts: dict[int, _Facts] = {}
    for sample in split.samples:
        known = facts.setdefault(sample.image, _Facts())
        words = set(re.findall(r"[a-z]+", sample.question.lower()))
        mentioned = _mentions(words)
        answer = sample.answer.strip().lower()
        if answer in COLOURS or answer in SHAPES:
            known.present["colour" if answer in COLOURS else "shape"].add(answer)
            for attribute, values in mentioned.items():  # "what color is the triangle?": the question names one
                known.present[attribute] |= values
        elif answer in ("yes", "no"):
            present = (answer == "yes") != bool(words & _NEGATIONS)
            for attribute, values in mentioned.items():
                (known.present if present else known.absent)[attribute] |= values
    return facts


def caption_images(split: VQASplit, split_name: str = "train", skipped: SkipCounter | None = None
                   ) -> list[CaptionedImage]:
    """Every image of ``split`` whose colour and shape its answers reveal, in image order; the others are counted in
    ``skipped`` (id ``easy-vqa/<split>/image-<index>``) with the reason, and logged as one summary line."""
    skipped = skipped if skipped is not None else SkipCounter()
    out: list[CaptionedImage] = []
    reasons: dict[str, int] = {}

    def skip(reason: str, image_id: str) -> None:
        reasons[reason] = reasons.get(reason, 0) + 1
        skipped.skip(reason, image_id, log_each=False)

    for image, known in sorted(image_facts(split).items()):
        image_id = f"easy-vqa/{split_name}/image-{image}"
        if known.contradictory():
            skip("caption: its questions' answers contradict each other", image_id)
            continue
        colour, shape = known.value("colour", COLOURS), known.value("shape", SHAPES)
        if colour is None or shape is None:
            missing = " and ".join(n for n, v in (("colour", colour), ("shape", shape)) if v is None)
            skip(f"caption: its questions do not reveal its {missing}", image_id)
            continue
        out.append(CaptionedImage(image, colour, shape, image_id))
    if reasons:
        log.info("easy-vqa %s: %d of %d images captioned; no caption for %s", split_name, len(out),
                 len(out) + sum(reasons.values()), ", ".join(f"{n} ({r.removeprefix('caption: ')})"
                                                              for r, n in reasons.items()))
    return out


__all__ = ["COLOURS", "SHAPES", "CaptionedImage", "caption_images", "image_facts"]
