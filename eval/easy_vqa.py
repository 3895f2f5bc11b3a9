"""easy-vqa: the data set shipped inside the ``easy-vqa`` package (no data directory), scored by exact match
after the VQA normalisation, per answer type, beside the majority-answer baseline (the demo's table)."""

from __future__ import annotations

from collections.abc import Sequence

from .benchmark import BENCHMARKS, Benchmark, BenchmarkDataError, Sample
from .vqa import accuracy_table


@BENCHMARKS.register("easy-vqa")
class EasyVQA(Benchmark):
    """easy-vqa test (or train) split: 64x64 shape images, one-word answers. The prompt is the bare question (the
    demo trains that way); 4 new tokens cover every answer. Scores: ``accuracy`` (overall), ``colour``, ``shape``,
    ``yes/no`` and ``majority baseline`` (the most frequent train answer), in percent."""

    name = "easy-vqa"
    max_new_tokens = 4
    metrics = ("accuracy", "colour", "shape", "yes/no", "majority baseline")

    def read(self) -> list[Sample]:
        return self.read_head(None)

    def read_head(self, limit: int | None) -> list[Sample]:
        """The first ``limit`` questions (all for None), opening only their images."""
        from zoo.train.data import load_easy_vqa  # the one easy-vqa reader (zoo.train owns the training data)

        split = load_easy_vqa(self.split, limit)
        for reason, ids in split.skipped.by_reason.items():  # evaluation never leaves a question out silently
            raise BenchmarkDataError(f"easy-vqa: question {ids[0]}: {reason} ({split.skipped.total} question(s) ask "
                                     "about images that cannot be used)")
        return [Sample(s.id, s.question, split.images[s.image], s.answer) for s in split.samples]

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, float]:
        import easy_vqa

        _questions, train_answers, _images = easy_vqa.get_train_questions()
        table = accuracy_table(outputs, [s.target for s in samples], train_answers)
        return {("accuracy" if name == "overall" else name): 100 * value for name, value in table.items()}

    def describe(self) -> dict:
        from importlib import metadata

        return {**super().describe(), "package": f"easy-vqa=={metadata.version('easy-vqa')}"}
