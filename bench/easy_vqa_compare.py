"""Sparse designs on easy-vqa over the same pretrained, frozen vision tower: the demo's stage 0 once, then for every
design the demo's own schedule (align, instruct, stage 3), evaluated on the same test questions.

    .venv/bin/python bench/easy_vqa_compare.py                       # every design, the demo's budget, all 9,673 q
    .venv/bin/python bench/easy_vqa_compare.py --steps 300 --limit 2000 --only dense,cumo

Stage 0 (`configs/recipes/easy-vqa.yaml`'s ``vision`` stage: open_clip pretraining of `tiny-clip-llava`'s tower) runs
once, or is reused with ``--vision DIR`` (an open_clip ``local-dir`` checkpoint, e.g. ``runs/demo/00-vision/open_clip``).
Every design then starts from `tiny-clip-llava` with that tower, frozen (features from each run's cache), and runs the
recipe's three later stages with their settings (by default their step counts too): ``align`` (the connector alone on
the captions, LLaVA's stage 1), ``instruct`` (``--steps`` steps of connector + LM on the train questions) and ``moe``
(``--moe-steps`` steps tuning only the LM's FFNs, MoE-LLaVA's stage III). A design's sparse parts are created at the
start of instruct, except MoE-LLaVA's, which are created at the start of stage 3 as in the demo:

* ``dense``: no experts; its stage 3 tunes the dense FFNs for the same steps (the control for MoE-LLaVA's stage III);
* ``moe-llava``: the demo itself: dense instruction tuning, then the even layers' FFNs upcycled into 4 experts (top-2);
* ``moe-llava-upcycled``: the same upcycling at the start of instruct, trained with everything else;
* ``deepseek-moe``: DeepSeekMoE's fine-grained experts in layer 1 (16 routed slices of a quarter FFN, top-6, 2
  shared);
* ``moiie``: MoIIE's modality experts in layer 1 (image-only, 2 shared, text-only; a router per modality);
* ``bigmac``: BigMac's low-dimension experts in every layer (16 experts, top-4, random init);
* ``cumo``: CuMo's co-upcycled MoE-MLP connector (4 copies of the aligned MLP, top-2);
* ``mocha``: MoCHA's connector over two views of the tower (its stride-32 and stride-16 stages as two sequence-fused
  experts, an MLP each through alignment, co-upcycled into MoE connectors with graph HGA).

It prints a table and writes ``bench/results/easy_vqa.csv`` (overall / colour / shape / yes-no accuracy, total and
active parameters, seconds per instruct step and per stage-3 step, all measured in this one run).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
from pathlib import Path

import yaml

import zoo
from zoo.config import configs_dir, to_dict
from zoo.eval import evaluate_benchmark
from zoo.eval.easy_vqa import EasyVQA
from zoo.train.recipe import load_recipe, run_recipe

RECIPE = configs_dir() / "recipes" / "easy-vqa.yaml"
RESULTS = Path(__file__).parent / "results" / "easy_vqa.csv"
SPARSIFY = {  # LM policies created at the start of instruction tuning
    "moe-llava-upcycled": {"preset": "moe-llava"},
    "deepseek-moe": {"preset": "deepseek-moe"},
    "moiie": {"preset": "moiie"},
    "bigmac": {"preset": "bigmac"},
}
DESIGNS = ["dense", "moe-llava", *SPARSIFY, "cumo", "mocha"]


def vision_stage(out: Path, progress: bool) -> Path:
    """Stage 0 of the demo recipe alone; returns its open_clip checkpoint directory."""
    recipe = load_recipe(RECIPE, [])
    recipe.stages = recipe.stages[:1]
    run_recipe(recipe, out, resume=True, progress=progress)
    return out / "00-vision" / "open_clip"


def model_file(vision: Path, out: Path, two_views: bool) -> Path:
    """`tiny-clip-llava` with the pretrained tower, frozen (two views of it, sequence-fused, for MoCHA)."""
    config = zoo.get_config("tiny-clip-llava").to_dict()
    tower = {"kind": "open_clip", "name": f"local-dir:{vision.resolve()}", "pretrained": True, "frozen": True,
             "feature_layer": -1}
    config["vision"] = [tower, {**tower, "feature_layer": -2}] if two_views else tower
    if two_views:
        config["fusion"] = {"mode": "sequence"}
    path = out / ("model-two-views.yaml" if two_views else "model.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def design_recipe(design: str, model: Path, align_steps: int, steps: int, moe_steps: int) -> list[str]:
    """Overrides of the demo recipe for one design: its align, instruct and stage-3 stages with these step counts."""
    base = load_recipe(RECIPE, [])
    stages = {s.name: s for s in base.stages}
    align, instruct, moe = (copy.deepcopy(to_dict(stages[n])) for n in ("align", "instruct", "moe"))
    align["train"]["steps"], instruct["train"]["steps"], moe["train"]["steps"] = align_steps, steps, moe_steps
    if design in SPARSIFY:
        instruct["before"] = [{"action": "sparsify", "policy": SPARSIFY[design]}]
    elif design in ("cumo", "mocha"):
        instruct["before"] = [{"action": "co_upcycle"}]
    if design != "moe-llava":  # the demo's stage III upcycles; every other design only tunes its FFNs there
        moe["before"] = []
    return [f"model={model}", f"stages={json.dumps([align, instruct, moe])}", "name=" + f"easy-vqa-{design}"]


def run(design: str, vision: Path, out: Path, args: argparse.Namespace, test_samples) -> dict:
    model_path = model_file(vision, out, two_views=design == "mocha")
    recipe = load_recipe(RECIPE, design_recipe(design, model_path, args.align_steps, args.steps, args.moe_steps))
    model = run_recipe(recipe, out / design, resume=True, progress=not args.no_progress)
    info = json.loads((out / design / "run.json").read_text())["stages"]
    per_step = {name: round(info[name]["seconds"] / info[name]["steps"], 4) for name in ("instruct", "moe")}
    counts = zoo.param_counts(model)
    scores = evaluate_benchmark(model.eval(), EasyVQA(), samples=test_samples, batch_size=256,
                                progress=not args.no_progress).scores
    return {"design": design, "total_params": counts.total, "active_params": counts.active,
            "seconds_per_instruct_step": per_step["instruct"], "seconds_per_stage3_step": per_step["moe"],
            **{k: round(v, 2) for k, v in scores.items()}}


def table(rows: list[dict], steps: int, moe_steps: int, questions: int) -> str:
    lines = [f"| design ({steps} + {moe_steps} LM steps, {questions} test q) | total | active | accuracy | colour "
             "| shape | yes/no | s / instruct step | s / stage-3 step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['design']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['accuracy']:.2f}% | {r['colour']:.2f}% | {r['shape']:.2f}% | {r['yes/no']:.2f}% | "
                     f"{r['seconds_per_instruct_step']:.3f} | {r['seconds_per_stage3_step']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    demo = {s.name: s.train.steps for s in load_recipe(RECIPE, []).stages}
    parser.add_argument("--steps", type=int, default=demo["instruct"], help="instruct steps (default: the demo's)")
    parser.add_argument("--moe-steps", type=int, default=demo["moe"], help="stage-3 steps (default: the demo's)")
    parser.add_argument("--align-steps", type=int, default=demo["align"], help="align steps (default: the demo's)")
    parser.add_argument("--limit", type=int, default=None, help="test questions (default: all 9,673)")
    parser.add_argument("--only", default=",".join(DESIGNS), help=f"comma-separated subset of {', '.join(DESIGNS)}")
    parser.add_argument("--vision", default=None, help="an open_clip local-dir checkpoint to reuse (skips stage 0)")
    parser.add_argument("--out", default="runs/bench/easy-vqa-compare")
    parser.add_argument("--csv", default=str(RESULTS))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in DESIGNS]
    if unknown:
        parser.error(f"--only: unknown design(s) {unknown}; known: {', '.join(DESIGNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vision = Path(args.vision) if args.vision else vision_stage(out / "vision", not args.no_progress)
    test_samples = EasyVQA().load(args.limit)
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run(name, vision, out, args, test_samples))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows, args.steps, args.moe_steps, len(test_samples)))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
