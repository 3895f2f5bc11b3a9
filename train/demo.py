"""The main job (``make demo`` / ``zoo demo``): train the demo model on easy-vqa, evaluate, save, reload, check."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

import zoo
from zoo.eval import count_by_type, evaluate_benchmark
from zoo.eval.easy_vqa import EasyVQA

from .data import VQATrainingSet, load_easy_vqa
from .module import TrainConfig, fit

# The schedule the easy-vqa sweep settled on (see the README). Above lr 5e-4 the tiny LM trained from scratch tends
# to stay in the language-prior minimum (colour accuracy near chance); 64 distinct images per batch learned shapes
# faster than image-grouped batches of the same size.
# Steps: `make demo` on a fresh clone (install included) must finish within 15 minutes on 2 CPU cores; measured
# 2026-12-02 at ~0.26 s per dense step and ~0.13 s per MoE step (vision frozen): 2,000 + 800 steps took 12 min 41 s.
DEMO_TRAINING = TrainConfig(steps=2000, batch_size=64, lr=5e-4, weight_decay=0.01, warmup_ratio=0.03)
# MoE-LLaVA's recipe at demo scale: the dense stage above trains everything (stages I and II folded together: the
# tiny model starts from scratch), then the FFNs of the even layers are upcycled into 4 experts with top-2 routing
# (capacity factor 1.5 in training, 2.0 at eval, Switch balance loss x 0.01) and stage III (MoE-tuning) trains the
# FFNs and routers only.
DEMO_MOE_POLICY = {"preset": "moe-llava"}
DEMO_MOE_TRAINING = TrainConfig(steps=800, batch_size=64, lr=2e-4, weight_decay=0.0, warmup_ratio=0.03)


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


def moe_tune(model: zoo.ZooModel) -> int:
    """MoE-LLaVA stage III freezing: only the LM's FFNs (experts, and the dense FFNs of the other layers, as in the
    released code) and the routers train. Returns the number of trainable parameters."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("lm.") and ".mlp." in name
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def expert_load(model: zoo.ZooModel, dataset: VQATrainingSet, samples: int = 512, batch_size: int = 64) -> dict:
    """Tokens routed to each expert of every sparse LM layer, split by image and text tokens, over ``samples``
    supervised samples (teacher forcing, eval mode): ``{layer: {"image": [...], "text": [...]}}``."""
    model.eval()
    load: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, min(samples, len(dataset)), batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, samples, len(dataset)))])
        for layer, stats in model(**batch).routing_stats.items():
            for modality, sub in stats.by_modality.items():
                entry = load.setdefault(layer, {}).setdefault(modality, torch.zeros_like(sub.kept))
                entry += sub.kept
    return {layer: {m: v.tolist() for m, v in mods.items()} for layer, mods in load.items()}


def format_load(load: dict) -> str:
    """A Markdown table of each expert's share of a layer's image and text tokens."""
    if not load:
        return ""
    experts = len(next(iter(next(iter(load.values())).values())))
    head = "| layer | tokens | routed slots | " + " | ".join(f"expert {e}" for e in range(experts)) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * experts]
    for layer, mods in load.items():
        for modality, counts in mods.items():
            total = sum(counts)
            shares = " | ".join(f"{100 * c / total:.1f}%" if total else "-" for c in counts)
            lines.append(f"| {layer} | {modality} | {total:,} | {shares} |")
    return "\n".join(lines)


def run_demo(model_name: str | zoo.ModelConfig = "tiny-llava", out_dir: str | Path = "runs/demo",
             training: TrainConfig = DEMO_TRAINING, eval_limit: int | None = None, eval_batch_size: int = 256,
             progress: bool = True, moe_policy: dict | None = DEMO_MOE_POLICY,
             moe_training: TrainConfig = DEMO_MOE_TRAINING) -> dict:
    """Train `model_name` on the easy-vqa train split the MoE-LLaVA way (dense stage; then, unless `moe_policy` is
    None, upcycle by `moe_policy` and MoE-tune), evaluate on the test split (all 9,673 questions unless
    `eval_limit`), report the expert load per MoE layer split by image and text tokens, save to `out_dir`, reload
    with ``zoo.load`` and check that two answers are identical.

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
    with clock.phase("train (dense stage)"):
        fit(model, dataset, training, run_dir=out_dir / "logs", progress=progress)
    if moe_policy is not None:
        with clock.phase("upcycle + MoE-tune"):
            layers = model.sparsify(moe_policy)
            trainable = moe_tune(model)
            print(f"upcycled LM layers {layers}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{trainable:,} trainable (FFNs and routers)")
            fit(model, dataset, moe_training, run_dir=out_dir / "logs_moe", progress=progress)
    model.eval()
    with clock.phase("evaluate"):
        # the harness and scores of `zoo eval MODEL --benchmark easy-vqa`, so both print the same numbers
        run = evaluate_benchmark(model, EasyVQA(split="test"), batch_size=eval_batch_size, limit=eval_limit or None,
                                 progress=progress)
    references = [s.target for s in run.samples]
    table = {"overall" if name == "accuracy" else name: run.scores[name] / 100 for name in EasyVQA.metrics}
    counts = {"overall": len(references), "majority baseline": len(references), **count_by_type(references)}
    load = expert_load(model, VQATrainingSet(model, test_split)) if moe_policy is not None else {}
    with clock.phase("save + reload"):
        model.save_pretrained(out_dir / "model")
        reloaded = zoo.load(out_dir / "model")
        probe = run.samples[:2]
        images, questions = [s.load_image() for s in probe], [s.question for s in probe]
        before, after = model.answer(images, questions), reloaded.answer(images, questions)
    if before != after:
        raise RuntimeError(f"reloaded model answers {after} but the trained model answered {before}")
    print()
    print(format_table(table, counts))
    if load:
        print("\nexpert load on 512 test samples (share of each layer's image / text tokens per expert, top-2):")
        print(format_load(load))
    for s, a in zip(probe, after):
        print(f"reload check: {s.question!r} -> {a!r} (reference {s.target!r}); identical before and after reload")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.phases.items()))
    results = {"model": model.config.name, "accuracy": table, "questions": counts, "seconds": clock.phases,
               "training": asdict(training), "moe_policy": moe_policy,
               "moe_training": asdict(moe_training) if moe_policy is not None else None, "expert_load": load,
               "evaluation": run.record,
               "checkpoint": str(out_dir / "model")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
