"""The benchmark interface, the benchmark registry, and strict readers for released benchmark files.

A benchmark reads its released files from a local directory (never a download), turns them into
:class:`Sample` s, builds each prompt (question + the protocol's suffix), parses the model's output and scores the
outputs with its metrics. A malformed file is an error naming the file and the record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from zoo.errors import UserError
from zoo.images import ImageError, check_under_root, open_image
from zoo.registry import Registry

from .parsing import option_letters

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."

BENCHMARKS: Registry = Registry("benchmark")


class BenchmarkDataError(UserError, ValueError):
    """A benchmark file is missing, malformed, or inconsistent; the message names the file and the record."""


@dataclass
class Sample:
    """One question about one image.

    ``image`` is an image file, the encoded bytes of one (MMBench's base64 column) or a PIL image (easy-vqa);
    ``target`` is what scoring compares with (the human answers, the answer, an option letter, yes/no);
    ``meta`` holds the rest the prompt or the score needs (options, hint, category, split, subtask, image key).
    """

    id: str
    question: str
    image: Path | bytes | Image.Image
    target: Any
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """The image as RGB (files and bytes are read now, so a benchmark holds no decoded pixels). One the models
        cannot take (`zoo.images`: unreadable, empty, too small, a decompression bomb, 16-bit or float pixels) is a
        `BenchmarkDataError` naming this question and the file."""
        try:
            return open_image(self.image, "its encoded image" if isinstance(self.image, bytes) else None)
        except ImageError as error:
            raise BenchmarkDataError(f"sample {self.id}: {error}") from error


class Benchmark:
    """Base class: a benchmark in its released layout under ``root``.

    Subclasses set ``name``, ``suffix`` (appended to the question), ``max_new_tokens``, ``metrics`` (the score keys
    the summary table shows, main score first) and implement :meth:`read` (-> samples) and :meth:`score`.
    """

    name = ""
    version = "1"  # bumped whenever prompt, parsing or scoring change: results of different versions differ
    suffix = ""
    max_new_tokens = 128
    metrics: tuple[str, ...] = ("accuracy",)
    default_split = "test"
    allow_outside_root = False  # True: images a record names outside `root` (.., absolute, symlinks out) are read

    @property
    def folder(self) -> str:
        """The folder of ``--data DIR`` holding this benchmark's release (its name unless variants share one)."""
        return self.name

    def __init__(self, root: str | Path | None = None, split: str | None = None):
        self.root = Path(root) if root is not None else None
        self.split = split if split is not None else self.default_split
        self.files: list[Path] = []  # the annotation files read, hashed into the results

    # ---------------------------------------------------------------- reading
    def read(self) -> list[Sample]:
        raise NotImplementedError

    def read_head(self, limit: int | None) -> list[Sample]:
        """What `load` checks and cuts to ``limit``: all of `read`, unless a reader can stop after the first ``limit``
        questions (easy-vqa then opens only their images)."""
        return self.read()

    def load(self, limit: int | None = None) -> list[Sample]:
        """All samples (or the first ``limit`` questions; MMBench keeps all rotations of a question together)."""
        samples = self.read_head(limit)
        repeated = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
        if repeated:
            raise BenchmarkDataError(f"{self.name}: question id(s) {repeated[:5]} occur more than once in "
                                     f"{self._file_names()}")
        return samples[:limit] if limit is not None else samples

    def count_questions(self, samples: Sequence[Sample]) -> int:
        """Questions among ``samples`` (one sample per question, except where a question is asked several times)."""
        return len(samples)

    def path(self, *parts: str) -> Path:
        """A file of the release under ``root``; an error names it (and what the folder holds) if it is missing."""
        if self.root is None:
            raise BenchmarkDataError(f"{self.name}: no data directory given (--data DIR)")
        path = self.root.joinpath(*parts)
        if not path.exists():
            held = sorted(p.name for p in path.parent.iterdir())[:20] if path.parent.is_dir() else "missing folder"
            raise BenchmarkDataError(f"{self.name}: {path} not found (the {self.name} release layout expects it; "
                                     f"{path.parent} holds: {held})")
        return path

    def image_file(self, path: Path, source: Path, where: str) -> Path:
        """An image a record of ``source`` names; an error names the file and the record if it does not exist, or
        if it lies outside ``root`` (``..``, an absolute path, a symlink out) and ``allow_outside_root`` is off."""
        if not self.allow_outside_root and self.root is not None:
            try:
                check_under_root(path, self.root)
            except ImageError as error:
                raise BenchmarkDataError(f"{source}: {where}: {error}") from error
        if not path.is_file():
            raise BenchmarkDataError(f"{source}: {where}: image {path} not found")
        return path

    def _file_names(self) -> str:
        return ", ".join(str(f) for f in self.files) or str(self.root)

    # ---------------------------------------------------------------- prompting, parsing, scoring
    def prompt(self, sample: Sample) -> str:
        """The text after the image placeholder: the question and the protocol's suffix."""
        return sample.question + self.suffix

    def parse(self, output: str, sample: Sample) -> str:
        """What the score compares (recorded with each prediction); the identity unless the protocol parses."""
        return output

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Everything about the benchmark that changes a score: protocol version, split, prompt suffix, the
        annotation files' SHA-256."""
        return {"name": self.name, "version": self.version, "split": self.split, "suffix": self.suffix,
                "max_new_tokens": self.max_new_tokens, "options": self.options(),
                "files": {str(f.relative_to(self.root) if self.root else f): sha256(f) for f in self.files}}

    def options(self) -> dict[str, Any]:
        """Protocol options of this instance (e.g. TextVQA's OCR tokens)."""
        return {}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def as_floats(scores: dict[str, Any]) -> dict[str, float]:
    """Metric outputs (tensors) as plain floats."""
    return {k: float(v) for k, v in scores.items()}


# -------------------------------------------------------------------- strict readers
def read_json(path: Path) -> Any:
    """A JSON file; a syntax error names the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: "
                                 f"{error.msg})") from error


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` per non-empty line of a JSON-lines file (``where`` = "line N")."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkDataError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
            yield f"line {number}", record


def require(record: Any, fields: Sequence[str], path: Path, where: str) -> None:
    """Every one of ``fields`` is in ``record`` and not null; else an error naming the file, record and field."""
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{path}: {where}: expected an object, got {type(record).__name__}")
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        present = sorted(k for k, v in record.items() if v is not None)
        raise BenchmarkDataError(f"{path}: {where}: missing field(s) {missing} (has {present})")


def decode_image(text: str, source: Path, where: str) -> bytes:
    """A base64-encoded image (MMBench's TSV), checked now: undecodable base64 or an unreadable image is an error
    naming the file and the record."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BenchmarkDataError(f"{source}: {where}: image column is not valid base64 ({error})") from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as error:
        raise BenchmarkDataError(f"{source}: {where}: image column decodes to no readable image ({error})") from error
    return data


def lettered_options(options: Sequence[str]) -> str:
    """``"A. first\\nB. second"``: the options block of multiple-choice prompts."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))


def by_group(samples: Sequence[Sample], outputs: Sequence[str], key: str) -> dict[str, tuple[list[Sample], list[str]]]:
    """Samples and outputs split by ``sample.meta[key]`` (samples without the key are left out), sorted by group."""
    groups: dict[str, tuple[list[Sample], list[str]]] = {}
    for sample, output in zip(samples, outputs):
        if sample.meta.get(key) is not None:
            rows = groups.setdefault(str(sample.meta[key]), ([], []))
            rows[0].append(sample)
            rows[1].append(output)
    return dict(sorted(groups.items()))
