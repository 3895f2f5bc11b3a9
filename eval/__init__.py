"""Evaluation (``zoo.eval``): benchmarks in their released formats, torchmetrics metrics with the official answer
normalisation, and a harness with batched deterministic generation and resumable runs.

>>> from zoo.eval import evaluate, vqa_score
>>> vqa_score("two", ["2"] * 3 + ["3"] * 7)
0.9
>>> results = evaluate("runs/demo/model", "easy-vqa", limit=500)   # or: zoo eval runs/demo/model --benchmark easy-vqa
"""

from . import easy_vqa, multiple_choice, open_ended, yes_no  # noqa: F401  (register the benchmarks)
from .benchmark import BENCHMARKS, Benchmark, BenchmarkDataError, Sample
from .harness import BenchmarkRun, evaluate, evaluate_benchmark, get_benchmark, results_table, shard
from .metrics import (
    CircularAccuracy,
    ExactMatch,
    MMEScores,
    MultipleChoiceAccuracy,
    POPEScores,
    VQAAccuracy,
)
from .parsing import FAILED, extract_choice, parse_gqa, parse_mme, parse_pope
from .vqa import accuracy_table, answer_type, count_by_type, exact_match, normalize_answer, vqa_score

__all__ = [
    "BENCHMARKS", "FAILED", "Benchmark", "BenchmarkDataError", "BenchmarkRun", "CircularAccuracy", "EvalCallback",
    "ExactMatch", "MMEScores", "MultipleChoiceAccuracy", "POPEScores", "Sample", "VQAAccuracy", "accuracy_table",
    "answer_type", "count_by_type", "evaluate", "evaluate_benchmark", "exact_match", "extract_choice",
    "get_benchmark", "normalize_answer", "parse_gqa", "parse_mme", "parse_pope", "results_table", "shard",
    "vqa_score",
]


def __getattr__(name: str):
    if name == "EvalCallback":  # imported on use: it pulls in Lightning, which scoring alone does not need
        from .callback import EvalCallback

        return EvalCallback
    raise AttributeError(f"module 'zoo.eval' has no attribute {name!r}")
