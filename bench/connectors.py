"""Benchmark: forward + backward time per image of every registered connector, relative to ``mlp``.

Run from the repository root::

    .venv/bin/python bench/connectors.py                  # 5 timed repeats after 2 warmup runs
    .venv/bin/python bench/connectors.py --repeats 10 --threads 2

Setup (random weights, fp32, CPU-sized): a batch of 8 images of 144 vision tokens (a 12x12 grid) of width 256,
mapped to an LM width of 512. Connectors of several vision experts (``multi_expert``) get 2 experts, each
``[8, 144, 256]``; the others one. One step is ``out = connector(x)``, then the backward of
``sum(out.tokens * g) + sum(out.aux_losses)`` with a fixed random ``g``.

Candidates come from the `zoo.connectors.CONNECTORS` registry, so kinds added later appear by themselves: a kind is
built with ``ConnectorConfig(kind=name)`` defaults, or with the configs its class lists in an optional classmethod
``bench_configs() -> {label: ConnectorConfig fields}`` (variants such as MoCHA's HGA modes). A kind that cannot
be built or run at this shape is listed as skipped with the error.

Columns: median ms per image over the repeats, taken round-robin over the candidates; the ratio to ``mlp``;
tokens out per image; parameters. Results depend on the machine, threads and torch build.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from zoo.config import ConnectorConfig, from_dict
from zoo.connectors import CONNECTORS, build_connector

BATCH, TOKENS, IN_DIM, OUT_DIM, EXPERTS = 8, 144, 256, 512, 2
WARMUP = 2


def candidate_configs() -> dict[str, tuple[type, dict]]:
    """Label -> (connector class, ConnectorConfig fields) for every registered kind (see the module docstring)."""
    out = {}
    for name in CONNECTORS.names():
        cls = CONNECTORS.get(name)
        configs = cls.bench_configs() if hasattr(cls, "bench_configs") else {name: {"kind": name}}
        out.update({label: (cls, fields) for label, fields in configs.items()})
    return out


def make_step(cls: type, fields: dict) -> tuple[Callable[[], None], torch.nn.Module, int]:
    """Build one candidate; returns its step function, the module and its tokens out per image."""
    multi = getattr(cls, "multi_expert", False)
    config = from_dict(ConnectorConfig, dict(fields), path="connector")
    module = build_connector(config, [IN_DIM] * EXPERTS if multi else IN_DIM, OUT_DIM).train()
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(BATCH, TOKENS, IN_DIM, generator=g) for _ in range(EXPERTS if multi else 1)]
    x = features if multi else features[0]
    out = module(x)
    upstream = torch.randn(out.tokens.shape, generator=g)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        loss = (out.tokens * upstream).sum() + sum(out.aux_losses.values())
        loss.backward()

    return step, module, out.tokens.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    steps, rows, skipped = {}, {}, {}
    for label, (cls, fields) in candidate_configs().items():
        try:
            step, module, tokens_out = make_step(cls, fields)
            step()
        except Exception as e:  # a kind that needs more than the defaults at this shape: reported, not fatal
            skipped[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        experts = EXPERTS if getattr(cls, "multi_expert", False) else 1
        steps[label] = step
        rows[label] = (experts, tokens_out, sum(p.numel() for p in module.parameters()))

    times: dict[str, list[float]] = {label: [] for label in steps}
    for i in range(WARMUP + args.repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= WARMUP:
                times[label].append((time.perf_counter() - start) * 1e3 / BATCH)
    median = {label: statistics.median(t) for label, t in times.items()}
    base = median.get("mlp")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH} images x {TOKENS} tokens x "
          f"{IN_DIM} -> {OUT_DIM} (multi-expert kinds: {EXPERTS} experts of that shape); forward + backward, median "
          f"of {args.repeats} round-robin repeats after {WARMUP} warmup runs\n")
    print("| connector | experts | tokens out | params | ms / image | vs mlp |\n|---|---:|---:|---:|---:|---:|")
    for label, ms in median.items():
        experts, tokens_out, params = rows[label]
        ratio = f"{ms / base:.2f}x" if base else "-"
        print(f"| {label} | {experts} | {tokens_out} | {params / 1e6:.2f}M | {ms:.3f} | {ratio} |")
    for label, reason in skipped.items():
        print(f"| {label} | skipped: {reason} | | | | |")


if __name__ == "__main__":
    main()
