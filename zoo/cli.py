"""The ``zoo`` command: ``list``, ``card``, ``build``, ``params``, ``train``, ``convert``, ``chat``, ``analyze``,
``demo``, ``eval``, ``serve``.

A mistake in what the user gave (a config or recipe value, an unknown name, an unreadable checkpoint, missing data,
bad benchmark files, a bad argument) prints one line, ``zoo <command>: error: <the sentence>``, and exits 2; a
failed write (no space, no permission) does the same with exit status 1, and a training run stopped by a signal says
how to resume and exits 128 + the signal's number. ``--debug`` (or ``ZOO_DEBUG=1``) shows the traceback instead.
Any other exception is a bug and keeps its traceback. `run_command` does this around whichever subcommand runs, so
a subcommand added to the parser gets it too: the one mechanism is `zoo.errors.UserError` and its ``exit_code``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from zoo.errors import UsageError, user_error_message

USER_ERROR = 2  # the exit status of a user error, as argparse uses for bad arguments


class ZooArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose every (sub)command takes ``--debug`` and whose errors are one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser leaves --debug given before the subcommand as it was
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error (also ZOO_DEBUG=1)")

    def error(self, message: str):
        """One line (``zoo <command>: error: ...``) and exit status 2, the usage behind ``--help``."""
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _cmd_list(args: argparse.Namespace) -> int:
    import zoo
    from zoo.cards import catalogue_markdown, catalogue_rows, catalogue_text

    names = zoo.list_models(family=args.family, tiny=False if args.no_tiny else None)
    print(catalogue_markdown(names) if args.markdown else catalogue_text(catalogue_rows(names, progress=True)), end="")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from zoo.cards import render_card, write_cards

    if args.all:
        for path in write_cards(args.out):
            print(f"wrote {path}")
        return 0
    if not args.model:
        raise UsageError("give a catalogue name, or --all --out DIR")
    print(render_card(args.model), end="")
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
        if args.gpus:
            from zoo.plan import plan_entry

            print(plan_entry(name, args.gpus, args.gpu_memory, args.strategy, args.expert_parallel, args.trainable,
                             precision=args.precision, micro_batch=args.micro_batch, seq_len=args.seq_len,
                             gradient_checkpointing=args.gradient_checkpointing))
    return 0


class _StderrHandler(logging.StreamHandler):
    """A logging handler that writes to whatever ``sys.stderr`` is when a record comes (a caller may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_progress() -> None:
    """Show the zoo's own INFO messages (stage starts and ends, skips, caches, probes) on stderr."""
    logger = logging.getLogger("zoo")
    if not any(getattr(h, "zoo_progress", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.zoo_progress = True
        handler.setFormatter(logging.Formatter("zoo: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # printed once, whatever handlers a dependency put on the root logger


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoo.train.recipe import load_recipe, run_recipe

    _log_progress()
    recipe = load_recipe(args.recipe, args.set)
    run_dir = args.run_dir or str(Path("runs") / recipe.name)
    command = shlex.join(["zoo", "train", args.recipe, "--run-dir", run_dir, *[a for item in args.set
                                                                             for a in ("--set", item)], "--resume"])
    run_recipe(recipe, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
               command=command)
    print(f"done: {run_dir} (per-stage exports in {run_dir}/NN-stage/model, run.json, recipe.yaml)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.what != "llava-to-wds":  # a checkpoint: SRC DST
        from zoo.catalogue import convert_checkpoint

        if args.source is None:
            raise UsageError("give the source checkpoint directory and the destination: zoo convert SRC DST")
        print(f"wrote {convert_checkpoint(args.what, args.source, vision_tower=args.vision_tower)}")
        return 0
    from zoo.train.conversations import read_llava_json, write_webdataset
    from zoo.train.data import SkipCounter

    if args.source is None or args.out is None:
        raise UsageError("llava-to-wds: give the LLaVA JSON file and --out SHARD_PATTERN")
    skipped = SkipCounter()
    samples = read_llava_json(args.source, image_root=args.image_root, skipped=skipped,
                              allow_outside_root=args.allow_outside_image_root)
    n = write_webdataset(samples, args.out, maxcount=args.maxcount, skipped=skipped)
    print(f"wrote {n} samples to {args.out} ({skipped.total} skipped"
          + "".join(f"; {reason}: {len(ids)}" for reason, ids in skipped.by_reason.items()) + ")")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    import zoo
    from zoo.chat import ChatSession, interactive, open_image

    session = ChatSession(zoo.load(args.model, device=args.device), open_image(args.image), args.max_new_tokens)
    if args.question:  # one-shot (several: one conversation), one answer per line
        for question in args.question:
            print(session.ask(question))
        return 0
    interactive(session)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import zoo
    from zoo.analyze import analyze_routing
    from zoo.routing_report import format_routing_table

    model = zoo.load(args.model, device=args.device)
    out = args.out or f"runs/analysis/{model.config.name}"
    results = analyze_routing(model, args.benchmark.split(","), data=args.data, limit=args.limit or None,
                              batch_size=args.batch_size, out_dir=out, progress=not args.no_progress)
    for name, rows in results.items():
        print(f"{name}:\n{format_routing_table(rows)}\n")
    print(f"wrote {out}/routing.md, routing.json, routing-by-benchmark.png and routing-<benchmark>.png")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from zoo.train.demo import run_demo

    _log_progress()
    command = shlex.join(["zoo", "demo", "--out", args.out, *(["--recipe", args.recipe] if args.recipe else []),
                          *[a for item in args.set for a in ("--set", item)], "--resume"])
    run_demo(out_dir=args.out, recipe=args.recipe, overrides=args.set, eval_limit=args.limit,
             progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite, command=command)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from zoo.eval.harness import evaluate_command

    evaluate_command(args.model, args.benchmark, data=args.data, out_dir=args.out, batch_size=args.batch_size,
                     limit=args.limit, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                     device=args.device, allow_outside_root=args.allow_outside_image_root)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from zoo.serve import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
          api_key=args.api_key, allowed_root=args.allowed_root, max_image_bytes=args.max_image_bytes,
          device=args.device)
    return 0


def build_parser() -> ZooArgumentParser:
    """The ``zoo`` parser with every subcommand (each runs ``args.func(args)``)."""
    parser = ZooArgumentParser(prog="zoo", description="Assemble, train and evaluate vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the catalogue: parts and total/active parameters (counted on the meta device, "
                       "cached)")
    p.add_argument("--family", default=None, help="e.g. moe-llava, cumo, mova, mocha, moiie, deepseek-moe, bigmac")
    p.add_argument("--no-tiny", action="store_true", help="leave out the -tiny twins")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("card", help="print the recipe card of a catalogue entry (or write them all: --all --out DIR)")
    p.add_argument("model", nargs="?")
    p.add_argument("--all", action="store_true", help="write every card and the index to --out")
    p.add_argument("--out", default="docs/cards")
    p.set_defaults(func=_cmd_card)
    p = sub.add_parser("build", help="build a model from a catalogue name or YAML and print its size")
    p.add_argument("model")
    p.add_argument("--out", default=None, help="save the fresh model to this directory")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("params", help="total and active parameters by part, counted on the meta device (no weights)")
    p.add_argument("models", nargs="+")
    p.add_argument("--gpus", type=int, default=0, help="plan a training run on this many GPUs: bytes per rank of "
                   "parameters, gradients, AdamW states, activations (estimate), all-to-all, and whether it fits")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--strategy", default="fsdp", help="ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3")
    p.add_argument("--expert-parallel", type=int, default=1, help="ranks each MoE layer's experts are split over")
    p.add_argument("--trainable", nargs="+", default=None, help="parts or parameter globs that train (default: all "
                   "but the frozen vision experts)")
    p.add_argument("--precision", default="bf16-mixed", help="32-true | bf16-mixed | bf16-true | ...")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per GPU and step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (image tokens included)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.set_defaults(func=_cmd_params)
    p = sub.add_parser("train", help="run a staged training recipe (configs/recipes/*.yaml)")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stages.0.train.steps=10 (repeatable)")
    p.add_argument("--run-dir", default=None, help="default: runs/<recipe name>")
    p.add_argument("--resume", action="store_true",
                   help="load finished stages' exports and continue an unfinished stage from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run the run directory holds (its files are "
                   "listed as they are removed)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("convert", help="convert a checkpoint (SRC DST: llava-hf, original LLaVA, MoE-LLaVA or CuMo "
                       "layout -> a zoo checkpoint) or data (llava-to-wds: LLaVA JSON -> webdataset shards)")
    p.add_argument("what", help="'llava-to-wds', or the source checkpoint directory")
    p.add_argument("source", nargs="?", help="the LLaVA JSON file (llava-to-wds), or the destination directory")
    p.add_argument("--vision-tower", default=None, help="checkpoints: the vision tower's transformers dir or hub id "
                   "when the checkpoint does not hold it (default: the name in its config.json)")
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to (default: "
                   "the JSON file's folder)")
    p.add_argument("--allow-outside-image-root", action="store_true",
                   help="read image paths that leave the image root (.., absolute paths, symlinks out)")
    p.add_argument("--out", default=None, help="llava-to-wds: shard pattern, e.g. shards/train-%%05d.tar")
    p.add_argument("--maxcount", type=positive_int, default=1000, help="samples per shard")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("chat", help="ask a model about an image: interactive, or one-shot with --question")
    p.add_argument("model", help="checkpoint directory, hub id or catalogue name with released weights")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", action="append", default=[], help="answer this and exit (repeat: one conversation)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("analyze", help="analyses of a trained model: routing (per-layer expert load by modality "
                       "and benchmark, tables and PNG heatmaps)")
    p.add_argument("what", choices=["routing"])
    p.add_argument("model", help="checkpoint directory, hub id or catalogue name with released weights")
    p.add_argument("--benchmark", default="easy-vqa", help="NAME[,NAME...] of zoo.eval benchmarks (default easy-vqa)")
    p.add_argument("--data", default=None, help="folder with the benchmarks' released files (DIR/<benchmark>/)")
    p.add_argument("--limit", type=non_negative_int, default=256, help="questions per benchmark (0: all)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", default=None, help="default: runs/analysis/<model name>")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_analyze)
    p = sub.add_parser("demo", help="the easy-vqa recipe (open_clip vision pretraining, align, instruct, MoE-tune), "
                       "then the dense and the sparse model on the whole test split")
    p.add_argument("--out", default="runs/demo", help="the run directory (stages, exports, results.json)")
    p.add_argument("--recipe", default=None, help="default: configs/recipes/easy-vqa.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stages.2.train.steps=3000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="load the stages a previous run finished")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N test questions only")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("eval", help="evaluate a model on benchmarks in their released formats (zoo.eval)")
    p.add_argument("model", help="checkpoint directory, hub id or catalogue name")
    p.add_argument("--benchmark", required=True, help="NAME[,NAME...] of registered benchmarks (an unknown name "
                   "lists them); launch with torchrun to shard the questions over processes")
    p.add_argument("--data", default=None, help="folder with the released files (DIR/<benchmark>/ or DIR itself)")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N questions of each benchmark only")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: each benchmark's own")
    p.add_argument("--out", default=None, help="results and resumable predictions (default: runs/eval/<model>)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the model loads)")
    p.add_argument("--allow-outside-image-root", action="store_true",
                   help="read images the benchmark files name outside their folder (.., absolute paths, symlinks)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("serve", help="a web page (chat, experts view) and an OpenAI-compatible API for a model")
    p.add_argument("model", nargs="?", default=None, help="checkpoint dir, hub id or catalogue name (default: "
                   "runs/demo/model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests answered together at most (dynamic batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to join")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and KEY as the page's "
                   "password (default: $ZOO_API_KEY; none: open)")
    p.add_argument("--allowed-root", default=None, help="image_url may name local files under this folder")
    p.add_argument("--max-image-bytes", type=positive_int, default=10 * 2**20)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zoo`` command line: parses the arguments and runs the subcommand (`run_command`)."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand. An error in what the user gave (`zoo.errors.user_error_message`) ends it with one
    line, ``zoo <command>: error: <message>``, and the error's ``exit_code``: 2 for a bad config, name, checkpoint,
    data or argument, 1 for a failed write (`zoo.checkpoint.WriteError`), 128 + the signal's number for a run
    stopped by a signal (`zoo.train.preemption.Interrupted`, printed without ``error:``, saying how to resume).
    ``--debug`` / ``ZOO_DEBUG=1`` re-raise it with its traceback; other exceptions (bugs) propagate untouched."""
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, writes fail with EFBIG (reported) instead of a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return args.func(args)
    except Exception as error:
        message = user_error_message(error)
        if message is None or getattr(args, "debug", False) or os.environ.get("ZOO_DEBUG", "") not in ("", "0"):
            raise
        label = "error: " if getattr(error, "is_error", True) else ""
        print(f"zoo {args.command}: {label}{message}", file=sys.stderr)
        return getattr(error, "exit_code", USER_ERROR)


if __name__ == "__main__":
    sys.exit(main())
