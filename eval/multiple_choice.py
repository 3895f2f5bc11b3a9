"""Multiple-choice benchmarks answered with an option letter: ScienceQA-IMG, MMBench (circular evaluation) and
SEED-Bench (image dimensions), each read from its released files."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from .benchmark import (
    BENCHMARKS,
    LETTER_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Sample,
    as_floats,
    by_group,
    decode_image,
    lettered_options,
    read_json,
    require,
)
from .metrics import CircularAccuracy, MultipleChoiceAccuracy
from .parsing import LETTERS, extract_choice, option_letters


class _ChoiceBenchmark(Benchmark):
    """Prompt: [``Context: <hint>``] question, ``A. ...`` options, the letter suffix. Output -> letter or FAILED."""

    suffix = LETTER_ANSWER
    match_text = False  # MMBench also accepts an output equal to one option's text
    group_by: str | None = None  # a meta key scored separately as well
    metrics = ("accuracy",)

    def prompt(self, sample: Sample) -> str:
        context = f"Context: {sample.meta['context']}\n" if sample.meta.get("context") else ""
        return f"{context}{sample.question}\n{lettered_options(sample.meta['options'])}{self.suffix}"

    def parse(self, output: str, sample: Sample) -> str:
        return extract_choice(output, sample.meta["options"], self.match_text)

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        def accuracy(rows: Sequence[Sample], texts: Sequence[str]) -> dict[str, float]:
            metric = MultipleChoiceAccuracy(match_text=self.match_text)
            metric.update(texts, [s.target for s in rows], [s.meta["options"] for s in rows])
            return as_floats(metric.compute())

        scores = accuracy(samples, outputs)
        if self.group_by:
            scores.update({group: accuracy(*rows)["accuracy"]
                           for group, rows in by_group(samples, outputs, self.group_by).items()})
        return scores


@BENCHMARKS.register("scienceqa-img")
class ScienceQA(_ChoiceBenchmark):
    """ScienceQA, the questions with an image (``problems.json``, ``pid_splits.json``, images
    ``<split>/<pid>/<image>``; test: 2,017). The hint is the context. The output must be an option letter or
    start with ``"X."``; anything else is FAILED (wrong). Per subject as well."""

    name = "scienceqa-img"
    group_by = "subject"

    def read(self) -> list[Sample]:
        problems_path, splits_path = self.path("problems.json"), self.path("pid_splits.json")
        self.files = [problems_path, splits_path]
        problems, splits = read_json(problems_path), read_json(splits_path)
        if self.split not in splits:
            raise BenchmarkDataError(f"{splits_path}: no split {self.split!r} (has {sorted(splits)})")
        samples = []
        for pid in splits[self.split]:
            where = f"problem {pid!r}"
            if pid not in problems:
                raise BenchmarkDataError(f"{splits_path}: {where} of split {self.split!r} is not in "
                                         f"{problems_path.name}")
            record = problems[pid]
            require(record, ("question", "choices", "answer"), problems_path, where)
            if not record.get("image"):
                continue  # the IMG subset: questions with an image (text-only ones have "image": null)
            choices = record["choices"]
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                raise BenchmarkDataError(f"{problems_path}: {where}: 'choices' must be a list of 2+ options")
            if not isinstance(record["answer"], int) or not 0 <= record["answer"] < len(choices):
                raise BenchmarkDataError(f"{problems_path}: {where}: 'answer' {record['answer']!r} is not an "
                                         f"index into its {len(choices)} choices")
            image = self.image_file(self.root / self.split / str(pid) / record["image"], problems_path, where)
            samples.append(Sample(str(pid), record["question"], image, LETTERS[record["answer"]],
                                  {"options": choices, "context": record.get("hint") or "",
                                   "subject": record.get("subject")}))
        return samples


@BENCHMARKS.register("seed-bench")
class SEEDBench(_ChoiceBenchmark):
    """SEED-Bench(-1), image dimensions 1-9 (``SEED-Bench.json``, images ``SEED-Bench-image/<data_id>``): four
    options ``choice_a..d``, answer letter; accuracy overall and per dimension. Video questions are left out."""

    name = "seed-bench"
    group_by = "dimension"
    image_dimensions = range(1, 10)

    def read(self) -> list[Sample]:
        path = self.path("SEED-Bench.json")
        self.files = [path]
        document = read_json(path)
        require(document, ("questions",), path, "top level")
        names = {v: k for k, v in (document.get("question_type") or {}).items()}
        samples = []
        for i, record in enumerate(document["questions"]):
            where = f"questions[{i}] (question_id {record.get('question_id')!r})" if isinstance(record, dict) \
                else f"questions[{i}]"
            require(record, ("question_id", "question", "answer", "data_id", "question_type_id", "choice_a",
                             "choice_b", "choice_c", "choice_d"), path, where)
            if record["question_type_id"] not in self.image_dimensions:
                continue
            if record["answer"] not in "ABCD" or len(record["answer"]) != 1:
                raise BenchmarkDataError(f"{path}: {where}: answer {record['answer']!r} is not one of A-D")
            image = self.image_file(self.root / "SEED-Bench-image" / record["data_id"], path, where)
            options = [record[f"choice_{c}"] for c in "abcd"]
            dimension = names.get(record["question_type_id"], str(record["question_type_id"]))
            samples.append(Sample(str(record["question_id"]), record["question"], image, record["answer"],
                                  {"options": options, "dimension": dimension}))
        return samples


@BENCHMARKS.register("mmbench")
class MMBench(_ChoiceBenchmark):
    """MMBench (a TSV: ``index, question, hint, A..D, answer, category, l2-category, split, image`` with base64
    images; an image cell holding another row's index reuses that row's image, as VLMEvalKit writes them).

    Circular evaluation: a question with k options is asked k times with the options rotated (A,B,C,D ->
    B,C,D,A -> ...), the answer letter remapped; it counts only if all k passes are right. Sample ids are
    ``<index>/<rotation>``. Letter extraction also accepts the exact text of one option. ``file`` names the TSV
    (default: LLaVA's ``mmbench_dev_20230712.tsv``); the test split has no answers and cannot be scored here.
    """

    name = "mmbench"
    match_text = True
    default_split = "dev"
    metrics = ("circular", "single_pass")

    def __init__(self, root: str | Path | None = None, split: str | None = None,
                 file: str = "mmbench_dev_20230712.tsv"):
        super().__init__(root, split)
        self.file = file

    def options(self) -> dict:
        return {"file": self.file}

    def prompt(self, sample: Sample) -> str:
        hint = f"{sample.meta['hint']}\n" if sample.meta.get("hint") else ""
        return f"{hint}{sample.question}\n{lettered_options(sample.meta['options'])}{self.suffix}"

    def read(self) -> list[Sample]:
        path = self.path(self.file)
        self.files = [path]
        csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default cell limit
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        images = {row.get("index"): row.get("image") for row in rows}
        samples = []
        for number, row in enumerate(rows, 2):  # line 1 is the header
            where = f"line {number} (index {row.get('index')!r})"
            require(row, ("index", "question", "A", "B", "answer", "image"), path, where)
            if not row["index"].strip().lstrip("-").isdigit():
                raise BenchmarkDataError(f"{path}: {where}: index must be an integer")
            options = [row[c] for c in "ABCD" if _present(row.get(c))]
            letters = option_letters(len(options))
            if row["answer"] not in letters or len(row["answer"]) != 1:
                raise BenchmarkDataError(f"{path}: {where}: answer {row['answer']!r} is not one of {letters}")
            cell = row["image"]
            if len(cell) <= 64 and cell in images:  # a reference to another row's image
                cell = images[cell]
            image = decode_image(cell, path, where)
            answer = letters.index(row["answer"])
            for rotation in range(len(options)):
                rotated = options[rotation:] + options[:rotation]
                samples.append(Sample(f"{row['index']}/{rotation}", row["question"], image,
                                      letters[(answer - rotation) % len(options)],
                                      {"options": rotated, "hint": row["hint"] if _present(row.get("hint")) else "",
                                       "index": int(row["index"]), "rotation": rotation,
                                       "category": row.get("category")}))
        return samples

    def load(self, limit: int | None = None) -> list[Sample]:
        """``limit`` counts questions: all rotations of a kept question are kept."""
        samples = super().load()
        if limit is None:
            return samples
        kept = set(list(dict.fromkeys(s.meta["index"] for s in samples))[:limit])
        return [s for s in samples if s.meta["index"] in kept]

    def count_questions(self, samples: Sequence[Sample]) -> int:
        return len({s.meta["index"] for s in samples})

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        def circular(rows: Sequence[Sample], texts: Sequence[str]) -> dict[str, float]:
            metric = CircularAccuracy(match_text=self.match_text)
            metric.update(texts, [s.target for s in rows], [s.meta["options"] for s in rows],
                          [s.meta["index"] for s in rows], [s.meta["rotation"] for s in rows])
            return as_floats(metric.compute())

        scores = circular(samples, outputs)
        scores.update({category: circular(*rows)["circular"]
                       for category, rows in by_group(samples, outputs, "category").items()})
        return scores


def _present(cell: str | None) -> bool:
    """A TSV cell with a value (pandas writes missing options and hints as "nan")."""
    return cell is not None and cell.strip() != "" and cell.strip().lower() != "nan"
