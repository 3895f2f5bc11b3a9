"""Answer parsers: from a model's generated text to what a benchmark scores (LLaVA's evaluation rules)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase
FAILED = "FAILED"  # a multiple-choice output that names no option: scored as wrong
_LETTER_DOT = re.compile(r"([A-Z])\.")


def option_letters(count: int) -> str:
    """The letters of ``count`` options: ``option_letters(3) == "ABC"``."""
    if not 1 <= count <= len(LETTERS):
        raise ValueError(f"option count: expected 1..{len(LETTERS)}, got {count}")
    return LETTERS[:count]


def _option_text(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def extract_choice(output: str, options: Sequence[str], match_text: bool = False) -> str:
    """The option letter an output names, or :data:`FAILED`.

    Taken: the output is exactly one of the option letters (``"B"``), or starts with a letter and a period
    (``"B."``, ``"B. blue"``); with ``match_text`` (MMBench), the output equals exactly one option's text
    (case, surrounding space and a final period ignored). A letter past the last option (``"E"`` of three options)
    and anything else (``"The answer is B"``) is FAILED.
    """
    letters = option_letters(len(options))
    text = output.strip()
    if len(text) == 1 and text in letters:
        return text
    start = _LETTER_DOT.match(text)
    if start and start.group(1) in letters:
        return start.group(1)
    if match_text:
        hits = [letter for letter, option in zip(letters, options) if _option_text(option) == _option_text(text)]
        if len(hits) == 1:
            return hits[0]
    return FAILED


def parse_pope(output: str) -> str:
    """POPE (LLaVA's eval_pope): the first sentence, commas dropped; "no" if its words hold ``No``, ``not`` or
    ``no``, else "yes"."""
    first = output.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_mme(output: str) -> str:
    """MME: the lower-cased output starting with "yes" -> "yes", with "no" -> "no", else "other" (wrong)."""
    text = output.strip().lower()
    if text.startswith("yes"):
        return "yes"
    if text.startswith("no"):
        return "no"
    return "other"


def parse_gqa(output: str) -> str:
    """GQA: stripped, lower-cased, a final period dropped; then exact match with the single answer."""
    text = output.strip().lower()
    return text[:-1] if text.endswith(".") else text
