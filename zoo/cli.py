"""The ``zoo`` command: ``list``, ``build``, ``params``, ``train``, ``convert``, ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    import zoo

    rows = []
    for name in zoo.list_models(family=args.family):
        cfg = zoo.get_config(name)
        lm = cfg.lm.name or cfg.lm.config.get("model_type", "?")
        vision = " + ".join(f"{v.kind}:{v.name or v.kwargs.get('model_type', '?')}" for v in cfg.vision_experts)
        rows.append((name, cfg.family, vision, cfg.connector.projector, lm))
    header = ("name", "family", "vision", "connector", "lm")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    import zoo

    model = zoo.build(args.model)
    total = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("vision", "connector", "lm")}
    print(f"{model.config.name}: {total:,} parameters ("
          + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + f"); {model.num_image_tokens} tokens per image")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from zoo.params import param_counts

    for name in args.models:
        print(f"{name}:\n{param_counts(name)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoo.train.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    run_dir = args.run_dir or str(Path("runs") / recipe.name)
    run_recipe(recipe, run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"done: {run_dir} (per-stage exports in {run_dir}/NN-stage/model, run.json, recipe.yaml)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from zoo.train.conversations import read_llava_json, write_webdataset
    from zoo.train.data import SkipCounter

    skipped = SkipCounter()
    samples = read_llava_json(args.source, image_root=args.image_root, skipped=skipped)
    n = write_webdataset(samples, args.out, maxcount=args.maxcount, skipped=skipped)
    print(f"wrote {n} samples to {args.out} ({skipped.total} skipped"
          + "".join(f"; {reason}: {len(ids)}" for reason, ids in skipped.by_reason.items()) + ")")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from zoo.train.demo import DEMO_MOE_POLICY, DEMO_MOE_TRAINING, DEMO_TRAINING, run_demo

    training = DEMO_TRAINING if args.steps is None else dataclasses.replace(DEMO_TRAINING, steps=args.steps)
    moe_steps = args.moe_steps if args.moe_steps is not None else (
        DEMO_MOE_TRAINING.steps if args.steps is None else max(1, args.steps // 3))
    moe_training = dataclasses.replace(DEMO_MOE_TRAINING, steps=moe_steps)
    run_demo(args.model, out_dir=args.out, training=training, eval_limit=args.limit,
             moe_policy=None if args.dense else DEMO_MOE_POLICY, moe_training=moe_training)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zoo`` command line."""
    parser = argparse.ArgumentParser(prog="zoo", description="Assemble, train and evaluate vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the catalogue")
    p.add_argument("--family", default=None)
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("build", help="build a model from a catalogue name or YAML and print its size")
    p.add_argument("model")
    p.add_argument("--out", default=None, help="save the fresh model to this directory")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("params", help="total and active parameters by part, counted on the meta device (no weights)")
    p.add_argument("models", nargs="+")
    p.set_defaults(func=_cmd_params)
    p = sub.add_parser("train", help="run a staged training recipe (configs/recipes/*.yaml)")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stages.0.train.steps=10 (repeatable)")
    p.add_argument("--run-dir", default=None, help="default: runs/<recipe name>")
    p.add_argument("--resume", action="store_true", help="load finished stages' exports instead of retraining")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("convert", help="convert data: llava-to-wds (LLaVA JSON + image dir -> webdataset shards)")
    p.add_argument("what", choices=["llava-to-wds"])
    p.add_argument("source", help="LLaVA JSON or JSON-lines file")
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="shard pattern, e.g. shards/train-%%05d.tar")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("demo", help="train and evaluate the demo model on easy-vqa")
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="dense-stage optimizer steps (default: the demo schedule)")
    p.add_argument("--moe-steps", type=int, default=None,
                   help="MoE-tuning steps after upcycling (default: the demo schedule, or --steps // 3)")
    p.add_argument("--dense", action="store_true", help="skip upcycling and MoE-tuning (a dense model)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test questions only")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
