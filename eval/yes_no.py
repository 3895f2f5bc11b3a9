"""Yes/no benchmarks: POPE (object hallucination, three negative-sampling splits) and MME (14 subtasks, two
questions per image), each read from its released files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .benchmark import (
    BENCHMARKS,
    SHORT_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Sample,
    as_floats,
    by_group,
    read_jsonl,
    require,
)
from .metrics import MME_SUBTASKS, MMEScores, POPEScores
from .parsing import parse_mme, parse_pope

POPE_SPLITS = ("random", "popular", "adversarial")
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@BENCHMARKS.register("pope")
class POPE(Benchmark):
    """POPE on COCO val2014 (``coco/coco_pope_<split>.json``, JSON lines of ``{question_id, image, text, label}``
    for the splits random / popular / adversarial; images in ``val2014/``). Every split is evaluated; scores per
    split (accuracy, precision, recall, F1, yes ratio; positive class = yes) and ``f1`` = the mean F1 over the
    splits. Sample ids are ``<split>/<question_id>``."""

    name = "pope"
    suffix = SHORT_ANSWER
    default_split = "all"
    metrics = ("f1", "accuracy", "yes_ratio")

    def read(self) -> list[Sample]:
        splits = POPE_SPLITS if self.split == "all" else (self.split,)
        unknown = [s for s in splits if s not in POPE_SPLITS]
        if unknown:
            raise BenchmarkDataError(f"pope: unknown split(s) {unknown}; splits: {POPE_SPLITS} or 'all'")
        self.files = [self.path("coco", f"coco_pope_{split}.json") for split in splits]
        samples = []
        for split, path in zip(splits, self.files):
            for where, record in read_jsonl(path):
                require(record, ("question_id", "image", "text", "label"), path, where)
                if record["label"] not in ("yes", "no"):
                    raise BenchmarkDataError(f"{path}: {where}: label {record['label']!r} is not 'yes' or 'no'")
                image = self.image_file(self.root / "val2014" / record["image"], path, where)
                samples.append(Sample(f"{split}/{record['question_id']}", record["text"], image, record["label"],
                                      {"split": split}))
        return samples

    def parse(self, output: str, sample: Sample) -> str:
        return parse_pope(output)

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for split, (rows, texts) in by_group(samples, outputs, "split").items():
            metric = POPEScores()
            metric.update(texts, [s.target for s in rows])
            scores.update({f"{split}/{k}": v for k, v in as_floats(metric.compute()).items()})
        splits = sorted({s.meta["split"] for s in samples})
        for key in ("f1", "accuracy", "yes_ratio"):
            scores[key] = sum(scores[f"{split}/{key}"] for split in splits) / max(len(splits), 1)
        return scores


@BENCHMARKS.register("mme")
class MME(Benchmark):
    """MME (``MME_Benchmark_release_version``: one folder per subtask, either ``images/`` +
    ``questions_answers_YN/<stem>.txt`` or images and ``<stem>.txt`` side by side; each line ``question<TAB>Yes|No``,
    exactly one yes and one no question per image). The question already ends with "Please answer yes or no.".
    Scores per subtask (acc + acc+, max 200) and the perception / cognition totals. All 14 subtasks must be
    present. Sample ids are ``<subtask>/<image stem>/<0|1>``."""

    name = "mme"
    default_split = "all"
    metrics = ("perception", "cognition")

    def read(self) -> list[Sample]:
        if self.root is None:
            raise BenchmarkDataError("mme: no data directory given (--data DIR)")
        missing = [t for t in MME_SUBTASKS if not (self.root / t).is_dir()]
        if missing:
            raise BenchmarkDataError(f"mme: {self.root} lacks the subtask folder(s) {missing}")
        samples = []
        self.files = []
        for subtask in MME_SUBTASKS:
            folder = self.root / subtask
            split = (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir()
            texts = sorted((folder / "questions_answers_YN" if split else folder).glob("*.txt"))
            if not texts:
                raise BenchmarkDataError(f"mme: {folder} holds no question file (*.txt)")
            for text in texts:
                self.files.append(text)
                image = _mme_image(folder / "images" if split else folder, text)
                pairs = _mme_questions(text)
                for k, (question, answer) in enumerate(pairs):
                    samples.append(Sample(f"{subtask}/{text.stem}/{k}", question, image, answer,
                                          {"subtask": subtask, "image_key": text.stem}))
        return samples

    def parse(self, output: str, sample: Sample) -> str:
        return parse_mme(output)

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        metric = MMEScores()
        metric.update(outputs, [s.target for s in samples], [s.meta["subtask"] for s in samples],
                      [s.meta["image_key"] for s in samples])
        return as_floats(metric.compute())


def _mme_image(folder: Path, text: Path) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        if (folder / (text.stem + suffix)).is_file():
            return folder / (text.stem + suffix)
    raise BenchmarkDataError(f"{text}: no image {text.stem}.jpg/.png in {folder}")


def _mme_questions(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            raise BenchmarkDataError(f"{path}: line {number}: expected 'question<TAB>Yes|No', got {line!r}")
        pairs.append((fields[0], fields[1].strip().lower()))
    if sorted(answer for _, answer in pairs) != ["no", "yes"]:
        raise BenchmarkDataError(f"{path}: expected one yes and one no question for the image, got "
                                 f"{[answer for _, answer in pairs]}")
    return pairs
