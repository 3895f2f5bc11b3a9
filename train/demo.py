"""The main job (``make demo`` / ``zoo demo``): the easy-vqa recipe (``configs/recipes/easy-vqa.yaml``: stage 0
open_clip pretraining of the vision tower, 1 align, 2 instruct, 3 MoE-tune) through the recipe runner `zoo train`
uses, then both models on the whole test split (the dense one after stage 2, the sparse one after stage 3), the
expert load by modality, save and ``zoo.load`` round trip.

The test split is read only here, after training: the recipe's data are the train split's questions and the
captions derived from their answers.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import zoo
from zoo.config import configs_dir
from zoo.eval import count_by_type, evaluate_benchmark
from zoo.eval.easy_vqa import EasyVQA

from .conversations import Conversation, ConversationStream
from .recipe import load_recipe, run_recipe

DEMO_RECIPE = "easy-vqa"
# stage name -> what its export is, in the printed tables (stages the recipe does not have are left out)
EVALUATED = {"instruct": "dense (after stage 2, instruct)", "moe": "sparse (after stage 3, MoE-tune)"}


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


@torch.no_grad()
def expert_load(model: zoo.ZooModel, samples: list[Conversation], batch_size: int = 64) -> dict:
    """Tokens routed to each expert of every routed layer, split by image and text tokens, over ``samples``
    (teacher forcing, eval mode): ``{layer: {"image": [...], "text": [...]}}``."""
    model.eval()
    stream = ConversationStream(model, [samples], template="zoo")
    items = list(stream)
    load: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        batch = stream.collate(items[start:start + batch_size])
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


def _evaluate(model: zoo.ZooModel, limit: int | None, batch_size: int, progress: bool) -> tuple[dict, dict, object]:
    """Accuracy per answer type on the easy-vqa test split through the harness of ``zoo eval``."""
    run = evaluate_benchmark(model.eval(), EasyVQA(split="test"), batch_size=batch_size, limit=limit or None,
                             progress=progress)
    table = {"overall" if name == "accuracy" else name: run.scores[name] / 100 for name in EasyVQA.metrics}
    references = [s.target for s in run.samples]
    counts = {"overall": len(references), "majority baseline": len(references), **count_by_type(references)}
    return table, counts, run


def _test_conversations(limit: int) -> list[Conversation]:
    from .data import load_easy_vqa

    split = load_easy_vqa("test")
    return [Conversation(s.id, [("user", s.question), ("assistant", s.answer)], [split.images[s.image]])
            for s in split.samples[:limit]]


def run_demo(out_dir: str | Path = "runs/demo", recipe: str | Path | None = None, overrides: list[str] | None = None,
             eval_limit: int | None = None, eval_batch_size: int = 256, progress: bool = True,
             resume: bool = False, overwrite: bool = False, command: str | None = None) -> dict:
    """Run the demo recipe (default ``configs/recipes/easy-vqa.yaml``; ``overrides`` as ``zoo train --set``) in
    ``out_dir`` (``resume`` / ``overwrite`` an earlier run there, as `zoo.train.recipe.run_recipe` does; ``command``: the
    command line that resumes, for the message of a run stopped by a signal), evaluate the dense and the sparse model on the easy-vqa test split (all 9,673 questions unless
    ``eval_limit``), report the expert load per routed layer split by image and text tokens, save the final model to
    ``out_dir/model``, reload it with ``zoo.load`` and check that it answers two test questions identically.

    Returns the results (also written to ``out_dir/results.json``).
    """
    out_dir = Path(out_dir)
    recipe_path = Path(recipe) if recipe is not None else configs_dir() / "recipes" / f"{DEMO_RECIPE}.yaml"
    config = load_recipe(recipe_path, overrides)
    clock = Clock()
    with clock.phase(f"recipe {config.name}: {len(config.stages)} stages"):
        model = run_recipe(config, out_dir, resume=resume, overwrite=overwrite, progress=progress, command=command)
    info = json.loads((out_dir / "run.json").read_text())
    for name, stage in info["stages"].items():
        clock.phases[f"stage {name}"] = stage["seconds"]
    vision = next((s["contrastive"] for s in info["stages"].values() if "contrastive" in s), None)
    results: dict = {"recipe": config.name, "model": model.config.name, "stages": info["stages"], "accuracy": {},
                     "questions": {}}
    tables = {}
    for i, stage in enumerate(config.stages):
        if stage.name not in EVALUATED:
            continue
        with clock.phase(f"evaluate {EVALUATED[stage.name]}"):
            trained = model if i == len(config.stages) - 1 else zoo.load(out_dir / f"{i:02d}-{stage.name}" / "model")
            table, counts, run = _evaluate(trained, eval_limit, eval_batch_size, progress)
        tables[EVALUATED[stage.name]] = (table, counts)
        results["accuracy"][stage.name], results["questions"][stage.name] = table, counts
    with clock.phase("expert load"):
        load = expert_load(model, _test_conversations(512))
    with clock.phase("save + reload"):
        model.save_pretrained(out_dir / "model")
        reloaded = zoo.load(out_dir / "model")
        probe = EasyVQA(split="test").load(2)
        images, questions = [s.load_image() for s in probe], [s.question for s in probe]
        before, after = model.answer(images, questions), reloaded.answer(images, questions)
    if before != after:
        raise RuntimeError(f"reloaded model answers {after} but the trained model answered {before}")
    print()
    if vision and vision.get("probe"):
        print(f"stage 0 ({vision['loss']} loss, {vision['pairs']:,} images, {vision['captions']} captions): linear "
              f"probe of the frozen tower's features on {vision['held_out']} held-out train images")
        for task, accuracy in vision["probe"].items():
            before_training = vision["probe_random_tower"].get(task)
            print(f"  {task}: {100 * accuracy:.1f}% (random tower: {100 * before_training:.1f}%)")
    for title, (table, counts) in tables.items():
        print(f"\n{title}:\n{format_table(table, counts)}")
    if load:
        print("\nexpert load on 512 test samples (share of each layer's image / text tokens per expert, top-2):")
        print(format_load(load))
    for s, a in zip(probe, after):
        print(f"reload check: {s.question!r} -> {a!r} (reference {s.target!r}); identical before and after reload")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.phases.items()))
    results.update(seconds=clock.phases, expert_load=load, vision=vision, checkpoint=str(out_dir / "model"))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
