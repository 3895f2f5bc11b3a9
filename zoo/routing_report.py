"""Routing report (a library): expert load, drop rate and router entropy per layer and modality, as table rows and
heatmaps.

Used by the training routing callback (`zoo.train.routing.RoutingMonitor`) and by the ``zoo analyze routing`` command
(`zoo.analyze`, which runs benchmarks through a model and writes the report):

>>> totals = RoutingTotals()
>>> totals.add("lm.layers.0", out.routing_stats["lm.layers.0"])   # a ZooOutput's per-layer RoutingStats
>>> rows = routing_load_table(totals.stats())                      # one row per layer x modality
>>> print(format_routing_table(rows))
>>> routing_heatmap({f"{r['layer']} {r['modality']}": r["load"] for r in rows}, "routing.png", "expert load")

``ZooOutput.routing_stats`` holds every routed part of a model in this one form: sparse LM layers, routed LoRA layers,
sparse vision blocks and MoE connectors (``connector``, ``connector.<i>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from zoo.moe.layer import RoutingStats

MODALITIES = ("image", "text")


class RoutingTotals:
    """Routing statistics summed over calls, per layer: slot counts add up, the entropy is token-weighted."""

    def __init__(self):
        self._sums: dict[str, dict[str, list]] = {}  # layer -> modality ("all", "image", "text") -> sums

    def add(self, layer: str, stats: RoutingStats) -> None:
        """Add one call's statistics of ``layer`` (and of its ``by_modality`` parts)."""
        parts = {"all": stats, **stats.by_modality}
        for modality, part in parts.items():
            sums = self._sums.setdefault(layer, {}).setdefault(modality, [None, None, 0, 0, 0, 0.0])
            assigned, kept = part.assigned.detach().cpu().long(), part.kept.detach().cpu().long()
            sums[0] = assigned if sums[0] is None else sums[0] + assigned
            sums[1] = kept if sums[1] is None else sums[1] + kept
            sums[2] += int(part.dropped)
            sums[3] += int(part.null)
            sums[4] += part.tokens
            entropy = float(part.entropy)
            if part.tokens and entropy == entropy:  # NaN: no token of this modality in the call
                sums[5] += entropy * part.tokens

    def stats(self) -> dict[str, RoutingStats]:
        """The totals as one `RoutingStats` per layer (``by_modality`` filled when the calls had modalities)."""
        out = {}
        for layer, by in self._sums.items():
            made = {m: RoutingStats(assigned=a, kept=k, dropped=torch.tensor(d), null=torch.tensor(n), tokens=t,
                                    entropy=torch.tensor(e / t if t else float("nan")))
                    for m, (a, k, d, n, t, e) in by.items()}
            total = made.pop("all")
            total.by_modality = made
            out[layer] = total
        return out

    def __bool__(self) -> bool:
        return bool(self._sums)

    def state_dict(self) -> dict:
        """The sums (tensors and numbers), e.g. for a training checkpoint."""
        return {layer: {m: list(sums) for m, sums in by.items()} for layer, by in self._sums.items()}

    def load_state_dict(self, state: dict) -> None:
        self._sums = {layer: {m: list(sums) for m, sums in by.items()} for layer, by in state.items()}


def routing_load_table(stats_by_layer: Mapping[str, RoutingStats]) -> list[dict]:
    """One row per layer and modality (``all``, then ``image`` / ``text`` where known): ``layer``, ``modality``,
    ``tokens``, ``load`` (the fraction of kept slots per expert, summing to 1), ``drop_rate`` (dropped / assigned
    slots), ``entropy`` (mean router entropy, nats) and ``imbalance`` (max / mean kept load; 1.0 is balanced)."""
    rows = []
    for layer, stats in stats_by_layer.items():
        for modality, part in [("all", stats), *((m, stats.by_modality[m]) for m in MODALITIES
                                                 if m in stats.by_modality)]:
            if modality == "all" and list(stats.by_modality) == ["image"]:
                continue  # image-only routing (connectors): the "image" row says it all
            kept = part.kept.double()
            total = float(kept.sum())
            rows.append({"layer": layer, "modality": modality, "tokens": int(part.tokens),
                         "load": (kept / total).tolist() if total else [0.0] * kept.numel(),
                         "drop_rate": part.drop_rate, "entropy": float(part.entropy),
                         "imbalance": part.load_imbalance})
    return rows


def format_routing_table(rows: Sequence[Mapping]) -> str:
    """`routing_load_table` rows as a Markdown table (loads in percent)."""
    lines = ["| layer | modality | tokens | load per expert (%) | drop rate | entropy | max/mean |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        load = " ".join(f"{100 * v:.1f}" for v in r["load"])
        lines.append(f"| {r['layer']} | {r['modality']} | {r['tokens']} | {load} | {r['drop_rate']:.3f} | "
                     f"{r['entropy']:.3f} | {r['imbalance']:.2f} |")
    return "\n".join(lines)


def routing_heatmap(loads: Mapping[str, Sequence[float]], path: str | Path, title: str = "expert load") -> Path:
    """A PNG heatmap: one row per key of ``loads`` (e.g. ``"lm.layers.0 image"``), one column per expert, colour =
    the share of the row's slots the expert took (rows of different expert counts are padded blank)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    if not loads:
        raise ValueError("routing_heatmap: no routing statistics to draw")
    width = max(len(v) for v in loads.values())
    grid = np.full((len(loads), width), np.nan)
    for i, values in enumerate(loads.values()):
        grid[i, : len(values)] = values
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * width, 1.0 + 0.35 * len(loads)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(width), [str(e) for e in range(width)])
    ax.set_yticks(range(len(loads)), list(loads))
    ax.set_xlabel("expert")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(grid):
        if value == value:
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, label="share of slots")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["MODALITIES", "RoutingTotals", "format_routing_table", "routing_heatmap",
           "routing_load_table"]
