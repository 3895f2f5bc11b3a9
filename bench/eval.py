"""Evaluation throughput: the harness at batch size 32 vs batch size 1 on a tiny model, measured side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval.py [--model tiny-llava | --model runs/demo/model] [--questions 128]

Both runs answer the same easy-vqa test questions with the same greedy decoding (``--max-new-tokens``); the script
checks that the predictions are identical and prints samples/s of each and their ratio (target: >= 8x).
"""

from __future__ import annotations

import argparse
import time

import torch

import zoo
from zoo.eval import evaluate_benchmark
from zoo.eval.easy_vqa import EasyVQA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="catalogue name (fresh weights) or checkpoint dir")
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,32")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = zoo.build(args.model) if args.model in zoo.list_models() else zoo.load(args.model)
    model.eval()
    bench = EasyVQA()
    samples = bench.load(args.questions)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    evaluate_benchmark(model, bench, batch_size=max(sizes), max_new_tokens=args.max_new_tokens,
                       samples=samples[:max(sizes)])  # warm-up: first-call allocations and kernel selection
    rates, outputs = {}, {}
    for size in sizes:
        start = time.perf_counter()
        run = evaluate_benchmark(model, bench, batch_size=size, max_new_tokens=args.max_new_tokens, samples=samples)
        rates[size] = len(samples) / (time.perf_counter() - start)
        outputs[size] = run.outputs
    print(f"model {model.config.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(samples)} easy-vqa questions, greedy, max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else f"device {model.device}")
    print("| batch size | samples/s |\n|---:|---:|")
    for size in sizes:
        print(f"| {size} | {rates[size]:.1f} |")
    identical = all(outputs[s] == outputs[sizes[0]] for s in sizes)
    print(f"predictions identical across batch sizes: {identical}")
    print(f"throughput ratio batch {sizes[-1]} / batch {sizes[0]}: {rates[sizes[-1]] / rates[sizes[0]]:.1f}x "
          "(target >= 8x)")
    if not identical:
        raise SystemExit("predictions differ between batch sizes")


if __name__ == "__main__":
    main()
