"""Open-ended short-answer benchmarks: VQAv2, TextVQA, VizWiz (VQA accuracy over 10 human answers) and GQA
(exact match with one answer), each read from its released files."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from .benchmark import (
    BENCHMARKS,
    SHORT_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Sample,
    by_group,
    read_json,
    require,
)
from .metrics import ExactMatch, VQAAccuracy
from .parsing import parse_gqa
from .vqa import normalize_answer


def _human_answers(record: dict, path: Path, where: str) -> list[str]:
    answers = record["answers"]
    if not isinstance(answers, list) or not answers:
        raise BenchmarkDataError(f"{path}: {where}: 'answers' must be a non-empty list, got {answers!r}")
    texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(t, str) for t in texts):
        raise BenchmarkDataError(f"{path}: {where}: every answer must be a string (or an object with 'answer')")
    return texts


class _VQAAccuracyBenchmark(Benchmark):
    """Scored by VQA accuracy overall and per ``answer_type``. ``always_normalize=False`` is the official
    VQAv2 / VizWiz evaluator (the outputs were already normalised by the answer processor, as LLaVA does before
    its EvalAI submission); TextVQA uses LLaVA's m4c evaluator, which always normalises."""

    always_normalize = False
    metrics = ("accuracy",)

    def parse(self, output: str, sample: Sample) -> str:
        return normalize_answer(output)

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        def accuracy(rows: Sequence[Sample], texts: Sequence[str]) -> float:
            metric = VQAAccuracy(always_normalize=self.always_normalize)
            metric.update([self.parse(t, s) for s, t in zip(rows, texts)], [s.target for s in rows])
            return float(metric.compute())

        scores = {"accuracy": accuracy(samples, outputs)}
        scores.update({kind: accuracy(*rows) for kind, rows in by_group(samples, outputs, "answer_type").items()})
        return scores


@BENCHMARKS.register("vqav2")
class VQAv2(_VQAAccuracyBenchmark):
    """VQAv2 (``v2_OpenEnded_mscoco_<split>_questions.json``, ``v2_mscoco_<split>_annotations.json``,
    ``<split>/COCO_<split>_<image_id:012d>.jpg``). Every question needs an annotation and every annotation a
    question."""

    name = "vqav2"
    suffix = SHORT_ANSWER
    default_split = "val2014"

    def read(self) -> list[Sample]:
        q_path = self.path(f"v2_OpenEnded_mscoco_{self.split}_questions.json")
        a_path = self.path(f"v2_mscoco_{self.split}_annotations.json")
        self.files = [q_path, a_path]
        questions = {}
        for i, record in enumerate(_list_field(read_json(q_path), "questions", q_path)):
            require(record, ("question_id", "image_id", "question"), q_path, f"question {i}")
            questions[record["question_id"]] = record
        annotations = {}
        for i, record in enumerate(_list_field(read_json(a_path), "annotations", a_path)):
            where = f"annotation {i} (question_id {record.get('question_id')!r})"
            require(record, ("question_id", "answers"), a_path, where)
            if record["question_id"] not in questions:
                raise BenchmarkDataError(f"{a_path}: {where}: unknown question id (not in {q_path.name})")
            annotations[record["question_id"]] = (record, where)
        samples = []
        for qid, question in questions.items():
            if qid not in annotations:
                raise BenchmarkDataError(f"{q_path}: question_id {qid!r} has no annotation in {a_path.name}")
            record, where = annotations[qid]
            image = self.image_file(self.root / self.split / f"COCO_{self.split}_{int(question['image_id']):012d}.jpg",
                                    q_path, f"question_id {qid}")
            samples.append(Sample(str(qid), question["question"], image,
                                  _human_answers(record, a_path, where),
                                  {"answer_type": record.get("answer_type"), "image_id": question["image_id"]}))
        return samples


@BENCHMARKS.register("vizwiz")
class VizWiz(_VQAAccuracyBenchmark):
    """VizWiz-VQA (``Annotations/<split>.json``: a list of ``{image, question, answers, answer_type}``, images in
    ``<split>/``); "unanswerable" is scored as a regular answer. The question id is the image name."""

    name = "vizwiz"
    suffix = ("\nWhen the provided information is insufficient, respond with 'Unanswerable'."
              "\nAnswer the question using a single word or phrase.")
    default_split = "val"

    def read(self) -> list[Sample]:
        path = self.path("Annotations", f"{self.split}.json")
        self.files = [path]
        records = read_json(path)
        if not isinstance(records, list):
            raise BenchmarkDataError(f"{path}: expected a list of questions, got {type(records).__name__}")
        samples = []
        for i, record in enumerate(records):
            where = f"record {i} (image {record.get('image')!r})" if isinstance(record, dict) else f"record {i}"
            require(record, ("image", "question", "answers"), path, where)
            image = self.image_file(self.root / self.split / record["image"], path, where)
            samples.append(Sample(record["image"], record["question"], image, _human_answers(record, path, where),
                                  {"answer_type": record.get("answer_type")}))
        return samples


@BENCHMARKS.register("textvqa")
class TextVQA(_VQAAccuracyBenchmark):
    """TextVQA (``TextVQA_0.5.1_<split>.json``, images ``train_images/<image_id>.jpg``; the test split's in
    ``test_images/``). ``ocr=True`` (LLaVA-1.5's protocol, registered as ``textvqa-ocr``) adds
    ``"\\nReference OCR token: tok1, tok2, ..."`` from ``TextVQA_Rosetta_OCR_v0.2_<split>.json`` to each question.
    Scored with LLaVA's m4c evaluator (the VQA normalisation always applied)."""

    name = "textvqa"
    suffix = SHORT_ANSWER
    default_split = "val"
    always_normalize = True

    def __init__(self, root: str | Path | None = None, split: str | None = None, ocr: bool = False):
        super().__init__(root, split)
        self.ocr = ocr
        if ocr:
            self.name = "textvqa-ocr"

    folder = "textvqa"  # both protocols read the same release

    def options(self) -> dict:
        return {"ocr": self.ocr}

    def read(self) -> list[Sample]:
        path = self.path(f"TextVQA_0.5.1_{self.split}.json")
        self.files = [path]
        tokens = self._ocr_tokens() if self.ocr else {}
        images = "test_images" if self.split == "test" else "train_images"
        samples = []
        for i, record in enumerate(_list_field(read_json(path), "data", path)):
            where = f"data {i} (question_id {record.get('question_id')!r})" if isinstance(record, dict) else f"data {i}"
            require(record, ("question_id", "image_id", "question", "answers"), path, where)
            question = record["question"]
            if self.ocr:
                if record["image_id"] not in tokens:
                    raise BenchmarkDataError(f"{path}: {where}: image {record['image_id']!r} has no entry in "
                                             f"{self.files[-1].name}")
                if tokens[record["image_id"]]:
                    question += "\nReference OCR token: " + ", ".join(tokens[record["image_id"]])
            image = self.image_file(self.root / images / f"{record['image_id']}.jpg", path, where)
            samples.append(Sample(str(record["question_id"]), question, image, _human_answers(record, path, where)))
        return samples

    def _ocr_tokens(self) -> dict[str, list[str]]:
        path = self.path(f"TextVQA_Rosetta_OCR_v0.2_{self.split}.json")
        self.files.append(path)
        tokens = {}
        for i, record in enumerate(_list_field(read_json(path), "data", path)):
            require(record, ("image_id", "ocr_tokens"), path, f"data {i}")
            tokens[record["image_id"]] = list(record["ocr_tokens"])
        return tokens


BENCHMARKS.register("textvqa-ocr", partial(TextVQA, ocr=True))


@BENCHMARKS.register("gqa")
class GQA(Benchmark):
    """GQA balanced split (``<split>_balanced_questions.json``: ``{question_id: {imageId, question, answer}}``,
    images ``images/<imageId>.jpg``; default ``testdev``, 12,578 questions). The output is stripped, lower-cased
    and loses a final period, then must equal the answer; per structural type as well."""

    name = "gqa"
    suffix = SHORT_ANSWER
    default_split = "testdev"

    def read(self) -> list[Sample]:
        path = self.path(f"{self.split}_balanced_questions.json")
        self.files = [path]
        records = read_json(path)
        if not isinstance(records, dict):
            raise BenchmarkDataError(f"{path}: expected an object of question id -> question")
        samples = []
        for qid, record in records.items():
            where = f"question {qid!r}"
            require(record, ("imageId", "question", "answer"), path, where)
            image = self.image_file(self.root / "images" / f"{record['imageId']}.jpg", path, where)
            structural = (record.get("types") or {}).get("structural")
            samples.append(Sample(str(qid), record["question"], image, record["answer"], {"structural": structural}))
        return samples

    def parse(self, output: str, sample: Sample) -> str:
        return parse_gqa(output)

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        def accuracy(rows: Sequence[Sample], texts: Sequence[str]) -> float:
            metric = ExactMatch(normalize=parse_gqa)
            metric.update(texts, [s.target for s in rows])
            return float(metric.compute())

        scores = {"accuracy": accuracy(samples, outputs)}
        scores.update({kind: accuracy(*rows) for kind, rows in by_group(samples, outputs, "structural").items()})
        return scores


def _list_field(document, key: str, path: Path) -> list:
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise BenchmarkDataError(f"{path}: expected an object with a list {key!r}")
    return document[key]
