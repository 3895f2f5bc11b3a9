"""Benchmark metrics as ``torchmetrics.Metric`` subclasses: their states sum (or concatenate) across processes, so
a metric updated on each rank's shard computes the score of the whole set.

Every metric takes the model's raw outputs and applies its benchmark's parser (parsers are idempotent: a parsed
answer parses to itself). Scores are percentages, as papers report them (MME: points, 0-200 per subtask).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torchmetrics import Metric

from .parsing import FAILED, extract_choice, parse_mme, parse_pope
from .vqa import normalize_answer, vqa_score

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION


def _check_lengths(**columns: Sequence) -> int:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"update(): columns of different lengths {lengths}")
    return next(iter(lengths.values()))


def stable_id(text: str) -> int:
    """A process-independent int64 for a string key (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


class _Percentage(Metric):
    """100 x the sum of per-question scores / the number of questions."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: Sequence[float]) -> None:
        self.score += float(sum(scores))
        self.total += len(scores)

    def compute(self) -> torch.Tensor:
        return 100 * self.score / self.total.clamp(min=1)


class VQAAccuracy(_Percentage):
    """VQA accuracy (VQAv2, TextVQA, VizWiz): the mean :func:`~zoo.eval.vqa_score` over questions, in percent.
    ``update(outputs, answers)`` with the human answers of each question (10 each)."""

    def __init__(self, always_normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.always_normalize = always_normalize

    def update(self, outputs: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        _check_lengths(outputs=outputs, answers=answers)
        self._add([vqa_score(o, a, self.always_normalize) for o, a in zip(outputs, answers)])


class ExactMatch(_Percentage):
    """Percentage of outputs equal to their single reference after ``normalize`` (default: the VQA
    normalisation; GQA passes its own parser)."""

    def __init__(self, normalize: Callable[[str], str] = normalize_answer, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize

    def update(self, outputs: Sequence[str], references: Sequence[str]) -> None:
        _check_lengths(outputs=outputs, references=references)
        self._add([self.normalize(o) == self.normalize(r) for o, r in zip(outputs, references)])


class MultipleChoiceAccuracy(Metric):
    """Multiple-choice accuracy with letter extraction (:func:`~zoo.eval.parsing.extract_choice`).

    ``update(outputs, targets, options)``: ``targets`` are letters, ``options`` each question's option texts.
    ``compute()`` -> ``{"accuracy": %, "failed": % of outputs that name no option}``.
    """

    full_state_update = False

    def __init__(self, match_text: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.match_text = match_text
        for name in ("correct", "failed", "total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Sequence[str], targets: Sequence[str], options: Sequence[Sequence[str]]) -> None:
        _check_lengths(outputs=outputs, targets=targets, options=options)
        choices = [extract_choice(o, opts, self.match_text) for o, opts in zip(outputs, options)]
        self.correct += sum(c == t for c, t in zip(choices, targets))
        self.failed += sum(c == FAILED for c in choices)
        self.total += len(choices)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1)
        return {"accuracy": 100 * self.correct / total, "failed": 100 * self.failed / total}


class CircularAccuracy(Metric):
    """MMBench circular evaluation: a question asked once per rotation of its options counts only if every pass is
    right. ``update(outputs, targets, options, question_ids)``, one row per pass (``targets`` are the rotated
    answer letters). ``compute()`` -> ``{"circular": %, "single_pass": % of the first passes (rotation 0)}``."""

    full_state_update = False

    def __init__(self, match_text: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.match_text = match_text
        self.add_state("question_ids", [], dist_reduce_fx="cat")
        self.add_state("correct", [], dist_reduce_fx="cat")
        self.add_state("first_pass", [], dist_reduce_fx="cat")

    def update(self, outputs: Sequence[str], targets: Sequence[str], options: Sequence[Sequence[str]],
               question_ids: Sequence[int], rotations: Sequence[int]) -> None:
        n = _check_lengths(outputs=outputs, targets=targets, options=options, question_ids=question_ids,
                           rotations=rotations)
        if n == 0:
            return
        hits = [extract_choice(o, opts, self.match_text) == t for o, t, opts in zip(outputs, targets, options)]
        self.question_ids.append(torch.tensor(list(question_ids), dtype=torch.long, device=self.device))
        self.correct.append(torch.tensor(hits, dtype=torch.bool, device=self.device))
        self.first_pass.append(torch.tensor([r == 0 for r in rotations], dtype=torch.bool, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        ids, correct, first = (_cat(s) for s in (self.question_ids, self.correct, self.first_pass))
        questions, group = torch.unique(ids, return_inverse=True)
        all_right = torch.ones(len(questions), dtype=torch.bool, device=ids.device)
        all_right = all_right.scatter_reduce(0, group, correct, reduce="amin")
        n = max(len(questions), 1)
        return {"circular": 100 * all_right.sum() / n,
                "single_pass": 100 * (correct & first).sum() / max(int(first.sum()), 1)}


def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list state as one tensor (after a sync torchmetrics has already concatenated it)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)


class POPEScores(Metric):
    """POPE: ``update(outputs, labels)`` with "yes"/"no" labels; outputs parsed by
    :func:`~zoo.eval.parsing.parse_pope`. Positive class = yes. ``compute()`` -> accuracy, precision, recall, F1 and
    yes ratio, in percent (a precision or recall with an empty denominator is 0)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Sequence[str], labels: Sequence[str]) -> None:
        _check_lengths(outputs=outputs, labels=labels)
        bad = sorted({label for label in labels if label not in ("yes", "no")})
        if bad:
            raise ValueError(f"POPE labels: expected 'yes' or 'no', got {bad}")
        pairs = [(parse_pope(o) == "yes", label == "yes") for o, label in zip(outputs, labels)]
        self.tp += sum(said and is_yes for said, is_yes in pairs)
        self.fp += sum(said and not is_yes for said, is_yes in pairs)
        self.tn += sum(not said and not is_yes for said, is_yes in pairs)
        self.fn += sum(not said and is_yes for said, is_yes in pairs)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, tn, fn = (getattr(self, n).double() for n in ("tp", "fp", "tn", "fn"))
        total = (tp + fp + tn + fn).clamp(min=1)
        precision = tp / (tp + fp) if tp + fp > 0 else tp * 0
        recall = tp / (tp + fn) if tp + fn > 0 else tp * 0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else tp * 0
        return {"accuracy": 100 * (tp + tn) / total, "precision": 100 * precision, "recall": 100 * recall,
                "f1": 100 * f1, "yes_ratio": 100 * (tp + fp) / total}


class MMEScores(Metric):
    """MME: ``update(outputs, labels, subtasks, images)``; outputs parsed by :func:`~zoo.eval.parsing.parse_mme`.

    Per subtask: ``acc`` = 100 x correct questions / questions, ``acc+`` = 100 x images with both questions right /
    images, score = acc + acc+ (max 200). ``compute()`` -> ``{subtask: score, "subtask/acc": ..., "subtask/acc+": ...,
    "perception": sum over the 10 perception subtasks, "cognition": sum over the 4 cognition subtasks}`` (subtasks
    with no question are left out of the sums and of the dict).
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("subtask", "image", "correct"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, outputs: Sequence[str], labels: Sequence[str], subtasks: Sequence[str],
               images: Sequence[str]) -> None:
        n = _check_lengths(outputs=outputs, labels=labels, subtasks=subtasks, images=images)
        if n == 0:
            return
        unknown = sorted(set(subtasks) - set(MME_SUBTASKS))
        if unknown:
            raise ValueError(f"MME subtask(s) {unknown}: expected one of {list(MME_SUBTASKS)}")
        device = self.device
        self.subtask.append(torch.tensor([MME_SUBTASKS.index(s) for s in subtasks], dtype=torch.long, device=device))
        self.image.append(torch.tensor([stable_id(f"{s}/{i}") for s, i in zip(subtasks, images)], dtype=torch.long,
                                       device=device))
        self.correct.append(torch.tensor([parse_mme(o) == label.lower() for o, label in zip(outputs, labels)],
                                         dtype=torch.bool, device=device))

    def compute(self) -> dict[str, torch.Tensor]:
        subtask, image, correct = (_cat(s) for s in (self.subtask, self.image, self.correct))
        scores: dict[str, torch.Tensor] = {}
        totals = {"perception": torch.tensor(0.0, dtype=torch.float64),
                  "cognition": torch.tensor(0.0, dtype=torch.float64)}
        for index, name in enumerate(MME_SUBTASKS):
            rows = subtask == index
            if not bool(rows.any()):
                continue
            acc = 100 * correct[rows].double().mean()
            images, group = torch.unique(image[rows], return_inverse=True)
            both = torch.ones(len(images), dtype=torch.bool, device=image.device)
            both = both.scatter_reduce(0, group, correct[rows], reduce="amin")
            acc_plus = 100 * both.double().mean()
            scores[name], scores[f"{name}/acc"], scores[f"{name}/acc+"] = acc + acc_plus, acc, acc_plus
            totals["perception" if name in MME_PERCEPTION else "cognition"] += (acc + acc_plus).cpu()
        return {**totals, **scores}
