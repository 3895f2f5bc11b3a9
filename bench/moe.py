"""Benchmark: one MoE FFN layer, forward + backward, zoo.moe against transformers and a dense FFN.

Run from the repository root::

    .venv/bin/python bench/moe.py                      # both shapes, 5 timed repeats, torch's default threads
    .venv/bin/python bench/moe.py --shape fine --repeats 10 --threads 2
    .venv/bin/python bench/moe.py --shape fine --threads 2 --profile "zoo grouped,hf grouped_mm"   # where time goes

Setup: T = 4096 tokens (x of shape [1, T, d]), d = 512, fp32, two shapes: ``small`` (E=8, k=2, f=1024) and
``fine`` (fine-grained, E=64, k=6, f=256). Every candidate gets the same x (requires_grad) and the same upstream
gradient g (fixed random), i.e. one step is ``y = layer(x); y.backward(g)``:

- ``zoo <backend>``: `zoo.moe.MoELayer` with each dispatch backend (loop, grouped, padded), balance and z losses
  off (``balance_loss=None, z_loss=False``) so that only router + FFN + dispatch are timed; ``zoo grouped`` uses
  the kernel `zoo.moe.kernels` picks (``GROUPED_MM = "auto"``: `ExpertSegments` on the CPU), ``zoo grouped/native``
  torch's grouped_mm kernel on the same layer (``GROUPED_MM = "native"``);
- ``hf <impl>``: transformers' ``MixtralSparseMoeBlock`` with the same weights (`zoo.moe.to_transformers`), experts
  implementation ``grouped_mm`` or ``eager``;
- ``dense``: a SwiGLU FFN of width k*f, i.e. the same active expert parameters per token (no router).

Before timing, the outputs and input gradients of every MoE candidate are compared with ``zoo grouped``.

Columns: median ms per forward + backward over ``--repeats`` runs after 2 warmup runs, taken round-robin over the
candidates (grads reset to None before each run); ratios to ``hf grouped_mm`` and to ``dense`` (targets for
``zoo grouped`` marked PASS/MISS); ``peak MB``: the highest memory allocated during one step above the level
before it, parameter gradients included (CPU: running sum of the allocations and frees recorded by
``torch.profiler(profile_memory=True)``; CUDA: ``torch.cuda.max_memory_allocated``); ``saved MB``: the activations
kept for backward (unique storages passed through ``saved_tensors_hooks``, parameters and x excluded).

Results depend on the machine, threads and torch build.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from zoo.moe import ExpertMLP, MoEConfig, MoELayer, kernels, to_transformers

TOKENS, HIDDEN = 4096, 512
SHAPES = {"small": dict(num_experts=8, top_k=2, expert_size=1024), "fine": dict(num_experts=64, top_k=6, expert_size=256)}
TARGET_VS_HF = {"small": 1.0, "fine": 0.67}  # zoo grouped / hf grouped_mm
TARGET_VS_DENSE = 1.2  # zoo grouped / dense
WARMUP = 2


@dataclass
class Candidate:
    """A layer to time: ``fn(x) -> y`` over ``module``'s parameters, run with ``kernels.GROUPED_MM = grouped_mm``."""

    name: str
    module: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]
    grouped_mm: str = "auto"
    moe: bool = True

    @contextlib.contextmanager
    def kernel(self):
        """Set ``kernels.GROUPED_MM`` to this candidate's choice, restoring the previous value after."""
        previous, kernels.GROUPED_MM = kernels.GROUPED_MM, self.grouped_mm
        try:
            yield
        finally:
            kernels.GROUPED_MM = previous

    def step(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One forward + backward of ``y`` against the upstream gradient ``g``; returns y (detached)."""
        with self.kernel():
            y = self.fn(x)
            y.backward(g)
        return y.detach()

    def reset(self, x: torch.Tensor) -> None:
        """Drop the gradients of the parameters and of x (each step then allocates them afresh)."""
        self.module.zero_grad(set_to_none=True)
        x.grad = None


def build(shape: str, device: torch.device, seed: int) -> tuple[list[Candidate], MoELayer]:
    """The candidates of one shape, all MoE ones on the weights of one seeded zoo layer."""
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=HIDDEN, **SHAPES[shape], backend="grouped", balance_loss=None, z_loss=False)
    base = MoELayer(cfg).to(device)  # router init N(0, 0.02): logits std ~0.45 on unit-variance tokens
    out: list[Candidate] = []
    for backend in ("loop", "grouped", "padded"):
        layer = copy.deepcopy(base)
        layer.set_backend(backend)
        out.append(Candidate(f"zoo {backend}", layer, lambda x, m=layer: m(x).output))
    out.append(Candidate("zoo grouped/native", out[1].module, out[1].fn, grouped_mm="native"))
    for impl in ("grouped_mm", "eager"):
        block = to_transformers(base, kind="mixtral", experts_implementation=impl).to(device)
        out.append(Candidate(f"hf {impl}", block, block))
    dense = ExpertMLP(HIDDEN, cfg.top_k * cfg.expert_size, "swiglu", "silu").to(device)
    out.append(Candidate(f"dense f={cfg.top_k * cfg.expert_size}", dense, dense, moe=False))
    return out, base


def inputs(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens x [1, T, d] (requiring grad) and the upstream gradient g every candidate gets."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(1, TOKENS, HIDDEN, generator=gen).to(device).requires_grad_(True)
    return x, torch.randn(1, TOKENS, HIDDEN, generator=gen).to(device)


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA) so that wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(cands: list[Candidate], x: torch.Tensor, g: torch.Tensor, repeats: int) -> list[float]:
    """Median wall-clock ms of one forward + backward per candidate. After the warmup, the repeats go round-robin
    over the candidates, so a slow spell of a shared machine hits all of them rather than one."""
    times: list[list[float]] = [[] for _ in cands]
    for i in range(WARMUP + repeats):
        for cand, out in zip(cands, times):
            cand.reset(x)
            sync(x.device)
            start = time.perf_counter()
            cand.step(x, g)
            sync(x.device)
            if i >= WARMUP:
                out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null (the CPU profiler logs its start and stop there)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_mb(cand: Candidate, x: torch.Tensor, g: torch.Tensor) -> float:
    """Peak memory allocated during one forward + backward above the level before it, in MiB."""
    cand.reset(x)
    if x.device.type == "cuda":
        sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        cand.step(x, g)
        sync(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        cand.step(x, g)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak / 2**20


def saved_mb(cand: Candidate, x: torch.Tensor) -> float:
    """MiB of the tensors autograd keeps for the backward of one forward (unique storages; params and x excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in cand.module.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with cand.kernel(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = cand.fn(x)
    del y
    return sum(seen.values()) / 2**20


def check(cands: list[Candidate], base: MoELayer, x: torch.Tensor, g: torch.Tensor) -> None:
    """Print the routing balance and every MoE candidate's max |diff| in y and dL/dx against ``zoo grouped``."""
    with torch.no_grad():
        stats = base(x).stats
    loads = stats.kept
    print(f"routing: tokens per expert min {int(loads.min())} / mean {float(loads.float().mean()):.0f} / max "
          f"{int(loads.max())} (max/mean {stats.load_imbalance:.2f}), entropy {float(stats.entropy):.3f} nats")
    if int(loads.min()) == 0:
        raise SystemExit("degenerate routing: an expert received no tokens")
    results = {}
    for cand in cands:
        if cand.moe:
            cand.reset(x)
            results[cand.name] = (cand.step(x, g), x.grad.clone())
    ref_y, ref_dx = results["zoo grouped"]
    for name, (y, dx) in results.items():
        print(f"  {name:<20} max|y - y_zoo| {float((y - ref_y).abs().max()):.2e}   "
              f"max|dx - dx_zoo| {float((dx - ref_dx).abs().max()):.2e}")


def mark(ratio: float, target: float) -> str:
    """``ratio`` with PASS/MISS against ``target`` (ratio <= target passes)."""
    return f"{ratio:.3f}x {'PASS' if ratio <= target else 'MISS'} (<={target:.2f})"


def run_shape(shape: str, device: torch.device, repeats: int, seed: int, only: list[str] | None = None) -> None:
    """Check, time and print the table of one shape (``only``: names to keep besides hf grouped_mm and dense)."""
    s = SHAPES[shape]
    print(f"\n== {shape}: T={TOKENS} d={HIDDEN} E={s['num_experts']} k={s['top_k']} f={s['expert_size']} ==")
    cands, base = build(shape, device, seed)
    if only:
        cands = [c for c in cands if c.name in only or c.name == "hf grouped_mm" or not c.moe]
    x, g = inputs(device, seed)
    check(cands, base, x, g)
    rows = list(zip(cands, time_ms(cands, x, g, repeats), [peak_mb(c, x, g) for c in cands],
                    [saved_mb(c, x) for c in cands]))
    hf_ms = next(ms for c, ms, _, _ in rows if c.name == "hf grouped_mm")
    dense_ms = next(ms for c, ms, _, _ in rows if not c.moe)
    print(f"{'name':<20} {'ms fwd+bwd':>10}  {'vs hf grouped_mm':<21} {'vs dense':<21} {'peak MB':>8} {'saved MB':>9}")
    for cand, ms, peak, saved in rows:
        vs_hf, vs_dense = ms / hf_ms, ms / dense_ms
        if cand.name == "zoo grouped":
            hf_col, dense_col = mark(vs_hf, TARGET_VS_HF[shape]), mark(vs_dense, TARGET_VS_DENSE)
        else:
            hf_col, dense_col = f"{vs_hf:.3f}x", f"{vs_dense:.3f}x"
        print(f"{cand.name:<20} {ms:10.1f}  {hf_col:<21} {dense_col:<21} {peak:8.1f} {saved:9.1f}")


MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul_out"}


def profile_shape(shape: str, device: torch.device, seed: int, names: list[str], repeats: int) -> None:
    """Where one forward + backward spends its time: per candidate, self CPU time by operator over ``repeats``
    profiled steps (after the warmup), and the share taken by matrix products."""
    cands, _ = build(shape, device, seed)
    x, g = inputs(device, seed)
    for cand in cands:
        if cand.name not in names and cand.moe:
            continue
        for _ in range(WARMUP):
            cand.reset(x)
            cand.step(x, g)
        with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                cand.reset(x)
                cand.step(x, g)
        averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in averages)
        matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS)
        print(f"\n-- {shape} / {cand.name}: {total / 1e3 / repeats:.1f} ms self CPU per step, matrix products "
              f"{100 * matmul / total:.0f}%")
        print(f"{'operator':<36} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
        for e in averages[:12]:
            ms, share = e.self_cpu_time_total / 1e3 / repeats, 100 * e.self_cpu_time_total / total
            print(f"{e.key:<36} {ms:8.1f} {share:5.1f}% {e.count / repeats:10.0f}")


def main() -> None:
    """Parse the arguments and run the requested shapes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (after 2 warmup runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None,
                        help="comma-separated candidates to time besides the references, e.g. 'zoo grouped'")
    parser.add_argument("--profile", default=None, metavar="NAMES",
                        help="instead of timing: self CPU time by operator of these candidates (comma-separated, "
                             "e.g. 'zoo grouped,hf grouped_mm') and the dense FFN, over --repeats steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, fp32, repeats {args.repeats} (median, after {WARMUP} warmup)")
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        if args.profile:
            profile_shape(shape, device, args.seed, args.profile.split(","), args.repeats)
            continue
        run_shape(shape, device, args.repeats, args.seed, args.only.split(",") if args.only else None)
    assert kernels.GROUPED_MM == "auto", "GROUPED_MM was not restored"


if __name__ == "__main__":
    main()
