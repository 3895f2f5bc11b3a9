"""A Lightning callback that evaluates the model being trained on a small held-out split every N steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from .benchmark import Benchmark
from .harness import evaluate_benchmark, get_benchmark


class EvalCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, answer the first ``limit`` questions of ``benchmark`` (a registered
    name read from ``data``, or a Benchmark) with the harness, log the benchmark's summary scores as
    ``eval/<benchmark>/<score>`` and append ``{"step", **scores}`` to ``history``.

    The held-out samples are read once. The module's ``model`` attribute (``ZooLightningModule``) or the module
    itself is evaluated; its train mode is restored afterwards. Under DDP each rank answers its shard and the
    scores are gathered, so every rank logs the same values. ``out_dir`` keeps each evaluation's predictions in
    ``out_dir/step-NNNNNNN/``.
    """

    def __init__(self, benchmark: str | Benchmark = "easy-vqa", every_n_steps: int = 500, limit: int | None = 200,
                 batch_size: int = 32, data: str | Path | None = None, max_new_tokens: int | None = None,
                 out_dir: str | Path | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1, got {every_n_steps}")
        self.benchmark = get_benchmark(benchmark, data) if isinstance(benchmark, str) else benchmark
        self.every_n_steps, self.limit, self.batch_size = every_n_steps, limit, batch_size
        self.max_new_tokens, self.out_dir = max_new_tokens, out_dir
        self.history: list[dict[str, Any]] = []
        self._samples = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps; several micro-batches share one under gradient accumulation
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if self._samples is None:
            self._samples = self.benchmark.load(self.limit)
        model = getattr(pl_module, "model", pl_module)
        out_dir = Path(self.out_dir) / f"step-{step:07d}" if self.out_dir is not None else None
        run = evaluate_benchmark(model, self.benchmark, out_dir, batch_size=self.batch_size,
                                 max_new_tokens=self.max_new_tokens, samples=self._samples)
        self.history.append({"step": step, **run.scores})
        summary = {f"eval/{self.benchmark.name}/{k}": v for k, v in run.scores.items() if k in self.benchmark.metrics}
        pl_module.log_dict(summary, on_step=True, on_epoch=False, batch_size=len(self._samples))
