"""``zoo analyze routing``: where a trained model sends its tokens, per sparse layer, by modality and by benchmark.

The analysis MoE-LLaVA draws offline: the model reads each benchmark's questions (image + prompt, teacher-forced,
no generation) and every routed layer's statistics (`ZooOutput.routing_stats`: sparse LM layers, split into image
and text tokens; sparse vision blocks; MoE connectors) are summed per benchmark with
`zoo.routing_report.RoutingTotals`. Written to ``out_dir``:

* ``routing.md``: one table per benchmark (`zoo.routing_report.format_routing_table`: load per expert, drop rate,
  entropy, max/mean load per layer and modality) and a table of each layer's image and text load across benchmarks;
* ``routing-<benchmark>.png``: the load heatmap of one benchmark (rows: layer x modality, columns: experts);
* ``routing-by-benchmark.png``: rows benchmark x layer x modality, the same colour scale;
* ``routing.json``: the rows, for plotting elsewhere.

Benchmarks are `zoo.eval`'s (``easy-vqa`` needs no data; the others read their released files under ``data``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from zoo.routing_report import RoutingTotals, format_routing_table, routing_heatmap, routing_load_table


@torch.no_grad()
def route_samples(model, benchmark, samples, batch_size: int = 16, progress: bool = False) -> RoutingTotals:
    """Routing statistics of `model` over `samples` of a `zoo.eval.Benchmark` (its prompts, one image each); a zoo
    model or a transformers-native one (`zoo.families`, through its processor and chat template)."""
    totals = RoutingTotals()
    starts = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"routing {benchmark.name}", unit="batch")
    model.eval()
    for start in starts:
        batch = samples[start:start + batch_size]
        inputs = model.prompt_inputs([s.load_image() for s in batch], [benchmark.prompt(s) for s in batch],
                                     padding_side="right")
        out = model(**inputs)
        for layer, layer_stats in out.routing_stats.items():
            totals.add(layer, layer_stats)
    return totals


def analyze_routing(model, benchmarks: Sequence[str] = ("easy-vqa",), data: str | Path | None = None,
                    limit: int | None = 256, batch_size: int = 16, out_dir: str | Path = "runs/analysis",
                    progress: bool = False) -> dict[str, list[dict]]:
    """Route the first `limit` questions of each benchmark through `model` and write the tables and heatmaps of the
    module docstring into `out_dir`. Returns ``{benchmark: rows}`` (`zoo.routing_report.routing_load_table` rows).
    A model without routed layers is an error (there is nothing to analyse)."""
    from zoo.eval import get_benchmark

    out_dir = Path(out_dir)
    results: dict[str, list[dict]] = {}
    for name in benchmarks:
        benchmark = get_benchmark(name, data)
        totals = route_samples(model, benchmark, benchmark.load(limit), batch_size, progress)
        if not totals:
            raise ValueError(f"{model.config.name}: no routed layer (sparse LM layers or a MoE connector); a dense "
                             "model has no routing to analyse")
        results[name] = routing_load_table(totals.stats())
    lines = [f"# Routing of `{model.config.name}`", ""]
    for name, rows in results.items():
        questions = limit if limit is not None else "all"
        lines += [f"## {name} ({questions} questions)", "", format_routing_table(rows), ""]
        routing_heatmap({f"{r['layer']} {r['modality']}": r["load"] for r in rows}, out_dir / f"routing-{name}.png",
                        f"{model.config.name}: expert load on {name}")
    lines += ["## By benchmark", "", _by_benchmark_table(results), ""]
    routing_heatmap({f"{b} {r['layer']} {r['modality']}": r["load"] for b, rows in results.items() for r in rows},
                    out_dir / "routing-by-benchmark.png", f"{model.config.name}: expert load by benchmark")
    (out_dir / "routing.md").write_text("\n".join(lines))
    (out_dir / "routing.json").write_text(json.dumps({"model": model.config.name, "limit": limit,
                                                      "benchmarks": results}, indent=1) + "\n")
    return results


def _by_benchmark_table(results: dict[str, list[dict]]) -> str:
    """Each layer and modality's load per expert side by side for every benchmark (percent)."""
    lines = ["| layer | modality | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    keys = dict.fromkeys((r["layer"], r["modality"]) for rows in results.values() for r in rows)
    for layer, modality in keys:
        cells = []
        for rows in results.values():
            row = next((r for r in rows if (r["layer"], r["modality"]) == (layer, modality)), None)
            cells.append(" ".join(f"{100 * v:.0f}" for v in row["load"]) if row else "-")
        lines.append(f"| {layer} | {modality} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
