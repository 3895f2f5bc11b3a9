"""Exact-match VQA evaluation after the standard VQA answer normalisation."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """Lower-case; strip punctuation (keeping decimal points), articles and surrounding space; number words
    become digits (the VQA evaluation's normalisation, minus its contraction table)."""
    text = _PERIOD.sub("", _PUNCT.sub("", answer.lower().replace("\n", " ").replace("\t", " ")))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-question exact match after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


EASY_VQA_TYPES = {
    "colour": {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"},
    "shape": {"circle", "rectangle", "triangle"},
    "yes/no": {"yes", "no"},
}


def answer_type(answer: str) -> str:
    """easy-vqa answer type of a reference answer: colour, shape or yes/no."""
    for name, answers in EASY_VQA_TYPES.items():
        if answer in answers:
            return name
    raise ValueError(f"answer {answer!r} is not an easy-vqa answer")


def count_by_type(references: Sequence[str]) -> dict[str, int]:
    """Number of reference answers of each easy-vqa answer type."""
    counts = Counter(answer_type(r) for r in references)
    return {name: counts[name] for name in EASY_VQA_TYPES}


def accuracy_table(predictions: Sequence[str], references: Sequence[str],
                   train_answers: Sequence[str]) -> dict[str, float]:
    """Overall and per-answer-type accuracy, plus the majority-answer baseline (most frequent train answer)."""
    hits = exact_match(predictions, references)
    table = {"overall": sum(hits) / len(hits)}
    for name in EASY_VQA_TYPES:
        rows = [h for h, r in zip(hits, references) if answer_type(r) == name]
        table[name] = sum(rows) / len(rows) if rows else float("nan")
    majority = Counter(train_answers).most_common(1)[0][0]
    table["majority baseline"] = sum(r == majority for r in references) / len(references)
    return table
