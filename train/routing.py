"""The routing callback: per-layer expert load, drop rate and router entropy by modality while training.

`RoutingMonitor` reads each training step's ``ZooOutput.routing_stats`` (sparse LM layers, split into image and
text tokens; sparse vision blocks; MoE connectors: image tokens), logs ``routing/<layer>/<modality>/
{drop_rate,entropy,imbalance}`` every ``log_every`` steps, and at the end of training writes ``routing.csv`` (one
row per layer x modality over the whole stage) and ``routing.png`` (the load heatmap). Models that do not route
write nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

from zoo.routing_report import RoutingTotals, routing_heatmap, routing_load_table


class RoutingMonitor(L.Callback):
    """Routing statistics of a training stage (module docstring); ``directory`` gets ``routing.csv`` and
    ``routing.png``; ``title`` heads the heatmap."""

    def __init__(self, directory: str | Path, title: str = "expert load", log_every: int = 25):
        self.directory, self.title, self.log_every = Path(directory), title, log_every
        self.totals = RoutingTotals()
        self._window = RoutingTotals()

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        last = getattr(module, "last_routing", None)
        if last is None:
            return
        for layer, layer_stats in last.items():
            self.totals.add(layer, layer_stats)
            self._window.add(layer, layer_stats)
        if self._window and (batch_idx + 1) % self.log_every == 0:
            for row in routing_load_table(self._window.stats()):
                key = f"routing/{row['layer']}/{row['modality']}"
                module.log_dict({f"{key}/drop_rate": row["drop_rate"], f"{key}/entropy": row["entropy"],
                                 f"{key}/imbalance": row["imbalance"]}, batch_size=batch["input_ids"].shape[0])
            self._window = RoutingTotals()

    def state_dict(self) -> dict:
        """The stage's totals so far: saved in training checkpoints, so a resumed stage reports all its steps."""
        return {"totals": self.totals.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.totals.load_state_dict(state["totals"])

    def rows(self) -> list[dict]:
        """`zoo.routing_report.routing_load_table` rows over everything seen so far."""
        return routing_load_table(self.totals.stats())

    def summary(self) -> dict[str, dict]:
        """``{"<layer> <modality>": {load, drop_rate, entropy}}`` for run.json (empty when nothing routed)."""
        return {f"{r['layer']} {r['modality']}": {"load": [round(v, 4) for v in r["load"]],
                                                  "drop_rate": round(r["drop_rate"], 4),
                                                  "entropy": round(r["entropy"], 4)} for r in self.rows()}

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        rows = self.rows()
        if not rows or not trainer.is_global_zero:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "routing.csv", "w", newline="") as f:
            width = max(len(r["load"]) for r in rows)
            writer = csv.writer(f)
            writer.writerow(["layer", "modality", "tokens", "drop_rate", "entropy", "imbalance"]
                            + [f"load_{e}" for e in range(width)])
            for r in rows:
                writer.writerow([r["layer"], r["modality"], r["tokens"], r["drop_rate"], r["entropy"],
                                 r["imbalance"], *r["load"]])
        routing_heatmap({f"{r['layer']} {r['modality']}": r["load"] for r in rows}, self.directory / "routing.png",
                        self.title)


__all__ = ["RoutingMonitor"]
