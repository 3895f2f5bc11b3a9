"""The main job (``make demo`` / ``zoo demo``): train the demo model on easy-vqa, evaluate, save, reload, check."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from zoo.eval import accuracy_table, count_by_type

import zoo

from .data import VQATrainingSet, load_easy_vqa
from .module import TrainConfig, fit

# The schedule the easy-vqa sweep settled on (see the README); 6,000 steps train in about 11-12 minutes on 2 cores.
# Above lr 5e-4 the tiny LM trained from scratch tends to stay in the language-prior minimum (colour accuracy
# near chance); 64 distinct images per batch learned shapes faster than image-grouped batches of the same size.
DEMO_TRAINING = TrainConfig(steps=6000, batch_size=64, lr=5e-4, weight_decay=0.01, warmup_ratio=0.03)


class Clock:
    """Wall time per named phase, printed as each phase ends."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        print(f"== {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - start
        print(f"== {name}: {self.phases[name]:.1f} s", flush=True)


def format_table(rows: dict[str, float], counts: dict[str, int]) -> str:
    """A Markdown table of accuracies (percent) with the number of questions per row."""
    lines = ["| split | questions | accuracy |", "|---|---:|---:|"]
    for name, value in rows.items():
        lines.append(f"| {name} | {counts.get(name, counts['overall'])} | {100 * value:.2f}% |")
    return "\n".join(lines)


def run_demo(model_name: str | zoo.ModelConfig = "tiny-llava", out_dir: str | Path = "runs/demo",
             training: TrainConfig = DEMO_TRAINING, eval_limit: int | None = None, eval_batch_size: int = 256,
             progress: bool = True) -> dict:
    """Train `model_name` on the easy-vqa train split, evaluate on the test split (all 9,673 questions unless
    `eval_limit`), save to `out_dir`, reload with ``zoo.load`` and check that two answers are identical.

    Returns the results (also written to ``out_dir/results.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    torch.manual_seed(training.seed)
    with clock.phase("build model + tokenizer"):
        model = zoo.build(model_name)
    with clock.phase("load easy-vqa"):
        train_split, test_split = load_easy_vqa("train"), load_easy_vqa("test")
        dataset = VQATrainingSet(model, train_split, augment=training.augment,
                                 turns_per_sample=training.turns_per_sample)
    print(f"model {model.config.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.num_image_tokens} tokens per image; {dataset.num_questions:,} training questions "
          f"({dataset.skipped.total} skipped) in {len(dataset):,} samples")
    with clock.phase("train"):
        fit(model, dataset, training, run_dir=out_dir / "logs", progress=progress)
    model.eval()
    samples = test_split.samples[:eval_limit] if eval_limit else test_split.samples
    with clock.phase("evaluate"):
        predictions = model.answer([test_split.images[s.image] for s in samples], [s.question for s in samples],
                                   max_new_tokens=4, batch_size=eval_batch_size, progress=progress)
    references = [s.answer for s in samples]
    table = accuracy_table(predictions, references, [s.answer for s in train_split.samples])
    counts = {"overall": len(references), "majority baseline": len(references), **count_by_type(references)}
    with clock.phase("save + reload"):
        model.save_pretrained(out_dir / "model")
        reloaded = zoo.load(out_dir / "model")
        probe = samples[:2]
        images, questions = [test_split.images[s.image] for s in probe], [s.question for s in probe]
        before, after = model.answer(images, questions), reloaded.answer(images, questions)
    if before != after:
        raise RuntimeError(f"reloaded model answers {after} but the trained model answered {before}")
    print()
    print(format_table(table, counts))
    for s, a in zip(probe, after):
        print(f"reload check: {s.question!r} -> {a!r} (reference {s.answer!r}); identical before and after reload")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.phases.items()))
    results = {"model": model.config.name, "accuracy": table, "questions": counts, "seconds": clock.phases,
               "training": asdict(training), "checkpoint": str(out_dir / "model")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
