"""MoE vs dense on easy-vqa: the demo's dense tiny model against MoE-LLaVA-, DeepSeekMoE- and MoIIE-style sparse LMs
with the same active parameters, trained from scratch with the same budget, evaluated on the same test questions.

    .venv/bin/python bench/easy_vqa_compare.py                      # 1,500 steps each, the whole test split
    .venv/bin/python bench/easy_vqa_compare.py --steps 300 --limit 2000 --only dense,moiie

Every model is `tiny-llava` (ConvNeXt front end, mlp2x_gelu, 2-layer Llama of width 128 whose dense FFN is 256 wide)
with its LM made sparse by a zoo policy, sized so that a token runs the dense FFN's width:

* ``moe-llava``: layer 0 (even layers), 4 experts of width 128, top-2, capacity 1.5 / 2.0, Switch balance x 0.01;
* ``deepseek-moe``: layer 1 (all but the first), 2 shared + 16 routed fine-grained experts of width 32, top-6 with
  raw softmax gates (8 x 32 = 256 active), expert balance x 0.001;
* ``moiie``: layer 1 (odd layers), 4 experts of width 128 (1 image-only, 2 shared, 1 text-only), a router per
  modality, top-2, balance per modality x 0.001.

All start from random weights (seed 0) and train with the demo's optimiser settings (AdamW, lr 5e-4, warm-up +
cosine, batch 64) for the same number of steps; wall times are measured in this one run, side by side, and printed
as ratios to the dense model (the machine is shared: absolute seconds vary, ratios less so).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import zoo
from zoo.config import SparsityConfig, from_dict
from zoo.eval import evaluate_benchmark
from zoo.eval.easy_vqa import EasyVQA
from zoo.train import TrainConfig, VQATrainingSet, fit, load_easy_vqa
from zoo.train.demo import DEMO_TRAINING

BASE = "tiny-llava"
DENSE_FFN = 256  # tiny-llava's lm.config.intermediate_size: every variant's active FFN width
VARIANTS: dict[str, dict | None] = {
    "dense": None,
    "moe-llava": {"preset": "moe-llava", "init": "random", "moe": {"expert_size": DENSE_FFN // 2}},
    "deepseek-moe": {"preset": "deepseek-moe", "init": "random",
                     "moe": {"num_experts": 16, "top_k": 6, "num_shared": 2, "expert_size": DENSE_FFN // 8}},
    "moiie": {"preset": "moiie", "init": "random", "moe": {"expert_size": DENSE_FFN // 2}},
}


def variant_config(name: str) -> zoo.ModelConfig:
    """tiny-llava with the variant's sparsity policy (named ``tiny-<variant>``)."""
    config = copy.deepcopy(zoo.get_config(BASE))
    config.name = f"tiny-{name}" if name != "dense" else BASE
    policy = VARIANTS[name]
    config.lm.sparsity = from_dict(SparsityConfig, policy, path="lm.sparsity") if policy else None
    return config


def run(name: str, train, test_samples, training: TrainConfig, out_dir: Path, progress: bool) -> dict:
    torch.manual_seed(0)
    model = zoo.build(variant_config(name))
    counts = zoo.param_counts(model)
    dataset = VQATrainingSet(model, train)
    start = time.perf_counter()
    fit(model, dataset, training, run_dir=out_dir / name, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate_benchmark(model.eval(), EasyVQA(), samples=test_samples, batch_size=256).scores
    eval_seconds = time.perf_counter() - start
    model.save_pretrained(out_dir / name / "model")
    return {"model": name, "lm_total": counts.parts["lm"][0], "lm_active": counts.parts["lm"][1],
            "total": counts.total, "active": counts.active, "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_seconds, 1), "scores": {k: round(v, 2) for k, v in scores.items()}}


def table(results: list[dict], steps: int, questions: int) -> str:
    dense = next((r for r in results if r["model"] == "dense"), results[0])
    lines = [f"| model ({steps} steps, {questions} test questions) | LM total | LM active | accuracy | colour | shape "
             f"| yes/no | train time | vs {dense['model']} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["scores"]
        lines.append(f"| {r['model']} | {r['lm_total'] / 1e3:.0f}K | {r['lm_active'] / 1e3:.0f}K | "
                     f"{s['accuracy']:.2f}% | {s['colour']:.2f}% | {s['shape']:.2f}% | {s['yes/no']:.2f}% | "
                     f"{r['train_seconds']:.0f} s | {r['train_seconds'] / dense['train_seconds']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per model (same for all)")
    parser.add_argument("--limit", type=int, default=None, help="test questions (default: all 9,673)")
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="runs/bench/easy-vqa-compare")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    training = dataclasses.replace(DEMO_TRAINING, steps=args.steps)
    train = load_easy_vqa("train")
    test_samples = EasyVQA().load(args.limit)
    out_dir = Path(args.out)
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        results.append(run(name, train, test_samples, training, out_dir, not args.no_progress))
        print(json.dumps(results[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"steps": args.steps, "training": dataclasses.asdict(training),
                                                      "questions": len(test_samples), "results": results}, indent=1))
    text = table(results, args.steps, len(test_samples))
    (out_dir / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
