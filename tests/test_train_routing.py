"""The routing callback (zoo.train.routing) and the routing tables and heatmaps of zoo.routing_report: closed-form counts
of routed image tokens, totals over calls, the per-stage CSV and PNG."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from PIL import Image

import zoo
from zoo.moe.layer import RoutingStats
from zoo.routing_report import RoutingTotals, format_routing_table, routing_heatmap, routing_load_table
from zoo.train import TrainConfig, fit, load_easy_vqa
from zoo.train.conversations import Conversation, ConversationStream
from zoo.train.routing import RoutingMonitor


def _stats(kept, assigned, tokens, entropy, **by_modality):
    return RoutingStats(assigned=torch.tensor(assigned), kept=torch.tensor(kept),
                        dropped=torch.tensor(sum(assigned) - sum(kept)), null=torch.tensor(0), tokens=tokens,
                        entropy=torch.tensor(entropy), by_modality=by_modality)


def test_totals_and_table_rows_in_closed_form(tmp_path):
    totals = RoutingTotals()
    image = _stats([3, 1], [4, 1], 5, 0.5)
    text = _stats([2, 2], [2, 2], 2, 1.0)
    totals.add("lm.layers.0", _stats([5, 3], [6, 3], 7, 0.5, image=image, text=text))
    totals.add("lm.layers.0", _stats([1, 1], [1, 1], 1, 1.3))  # a call without modalities
    rows = {r["modality"]: r for r in routing_load_table(totals.stats())}
    assert rows["all"]["tokens"] == 8 and rows["all"]["load"] == [0.6, 0.4]  # kept (5+1, 3+1) / 10
    assert rows["all"]["drop_rate"] == pytest.approx(1 / 11)  # (9 - 8) + 0 dropped of 9 + 2 assigned
    assert rows["all"]["entropy"] == pytest.approx((0.5 * 7 + 1.3 * 1) / 8)  # token-weighted
    assert rows["image"]["load"] == [0.75, 0.25] and rows["image"]["drop_rate"] == pytest.approx(0.2)
    assert rows["text"]["imbalance"] == 1.0 and rows["image"]["imbalance"] == pytest.approx(1.5)
    assert "| lm.layers.0 | image | 5 | 75.0 25.0 | 0.200 |" in format_routing_table(list(rows.values()))
    path = routing_heatmap({f"{r['layer']} {m}": r["load"] for m, r in rows.items()}, tmp_path / "h.png", "t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ValueError, match="no routing statistics"):
        routing_heatmap({}, tmp_path / "empty.png")


def test_routing_monitor_counts_every_routed_image_token_and_writes_the_stage_files(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("tiny-moe-llava")
    split = load_easy_vqa("train")
    steps, batch = 3, 8
    samples = [Conversation(s.id, [("user", s.question), ("assistant", s.answer)], [split.images[s.image]])
               for s in split.samples[: steps * batch]]
    stream = ConversationStream(model, [samples], template="zoo")
    monitor = RoutingMonitor(tmp_path, title="test", log_every=1)
    fit(model, stream, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, log_every=1), run_dir=tmp_path,
        progress=False, callbacks=[monitor])
    with open(tmp_path / "routing.csv") as f:
        rows = {(r["layer"], r["modality"]): r for r in csv.DictReader(f)}
    sparse = sorted({layer for layer, _ in rows})
    assert sparse == ["lm.layers.0"]  # MoE-LLaVA upcycles the even layers of the 2-layer LM
    image = rows[("lm.layers.0", "image")]
    assert int(image["tokens"]) == steps * batch * model.num_image_tokens  # 16 image tokens per sample
    assert int(rows[("lm.layers.0", "all")]["tokens"]) > int(image["tokens"])  # + the text tokens
    for row in rows.values():
        loads = [float(row[f"load_{e}"]) for e in range(4)]
        assert math.isclose(sum(loads), 1.0, rel_tol=1e-9) and 0.0 <= float(row["drop_rate"]) < 1.0
        assert 0.0 < float(row["entropy"]) <= math.log(4) + 1e-6
    assert (tmp_path / "routing.png").stat().st_size > 0
    with open(tmp_path / "metrics.csv") as f:
        logged = next(csv.DictReader(f)).keys()
    assert {"routing/lm.layers.0/image/drop_rate", "routing/lm.layers.0/text/entropy"} <= set(logged)
