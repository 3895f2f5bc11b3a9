"""MoE connectors: CuMo's MLP-MoE (``moe_mlp``) and MoCHA (``mocha``: a MoE connector per vision expert, then
Hierarchical Group Attention). Reference transcriptions of the released code (CuMo/MoCHA ``MLPMoE.forward``,
MoCHA ``hga.py``) are checked against the batched implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_connectors_mova import _fit
from test_fusion import CLIP, CONVNEXT, _experts

import zoo
from zoo.config import ConfigError, ConnectorConfig, FusionConfig, from_dict
from zoo.connectors import CONNECTORS, MLPProjector, PerExpertConnector, build_connector
from zoo.connectors.mocha import GroupAttention, MoCHAConnector, graph_hga, select_neighbours, upcycle_mocha
from zoo.connectors.moe_mlp import MoEMLPConnector, upcycle_connector
from zoo.moe import losses as L

COEFFICIENTS = {"balance": 0.1, "z_loss": 0.01}


def _config(kind, options=None, **fields):
    return from_dict(ConnectorConfig, {"kind": kind, "options": options or {}, **fields}, path="connector")


def _randomise_routers(connector, std=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in connector.modules():
            if isinstance(module, MoEMLPConnector):
                module.router.weight.copy_(torch.randn(module.router.weight.shape, generator=g) * std)


def _cumo_reference(connector, x):
    """CuMo / MoCHA ``MLPMoE.forward`` as released: per-sample, per-expert loop."""
    experts = connector.experts.to_modulelist()
    logits = x @ connector.router.weight.t()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    weights, selected = torch.topk(probs, connector.moe.top_k)
    density = F.one_hot(selected[..., 0], connector.moe.num_experts).float().mean(1)
    balance = (probs.mean(1) * density).mean() * connector.moe.num_experts ** 2
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(x.shape[0], x.shape[1], connector.out_dim)
    for b in range(x.shape[0]):
        for i, expert in enumerate(experts):
            token, nth = torch.where(selected[b] == i)
            out[b][token] += weights[b][token, nth, None] * expert(x[b][token])
    return out, balance, z_loss


def _released_hga(features, group_idx, k=10, cross_weight=0.7):
    """MoCHA ``build_innovative_graph_v3`` + ``innovative_graph_propagation_v3`` for one image (scatter_add as
    index_add)."""
    n = features.size(0)
    temp = 1 / torch.norm(features, dim=1).mean()
    normed = F.normalize(features, p=2, dim=1)
    sim = (normed @ normed.t() * torch.exp(temp)).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    intra_k = int(k * cross_weight)
    cross_k = k - intra_k
    rows, cols, vals = [], [], []
    for g in group_idx.unique():
        mask = group_idx == g
        size, idx = int(mask.sum()), mask.nonzero()[:, 0]
        intra = sim.masked_fill(~(mask[:, None] & mask[None, :]), float("-inf"))[idx]
        cross = sim.masked_fill(~(mask[:, None] & ~mask[None, :]), float("-inf"))[idx]
        iv, ii = intra.topk(min(intra_k, size - 1 if size > 1 else 0), dim=1)
        cv, ci = cross.topk(min(cross_k, n - size), dim=1)
        index, value = torch.cat([ii, ci], 1), torch.cat([iv, cv], 1)
        rows.append(idx[:, None].expand_as(index).reshape(-1))
        cols.append(index.reshape(-1))
        vals.append(value.reshape(-1))
    row, col, val = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    w = (val - val.min()) / (val.max() - val.min() + 1e-8)
    row, col, w = torch.cat([row, col]), torch.cat([col, row]), torch.cat([w, w])
    w_sum = torch.zeros(n).index_add(0, row, w) + 1e-8
    agg = torch.zeros_like(features).index_add(0, row, features[col] * (w / w_sum[row])[:, None])
    gate = torch.sigmoid(10 * ((features - agg).abs().mean(dim=1, keepdim=True) - 0.2))
    return F.layer_norm((1 - gate) * features + gate * agg, features.shape[1:])


# --- moe_mlp: routing, dispatch, losses -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["grouped", "loop", "padded"])
def test_moe_mlp_matches_the_released_per_sample_loop(backend):
    torch.manual_seed(0)
    connector = build_connector(_config("moe_mlp", moe={"backend": backend}), 24, 16)
    _randomise_routers(connector)
    x = torch.randn(3, 10, 24)
    out = connector(x)
    ref, balance, z_loss = _cumo_reference(connector, x)
    torch.testing.assert_close(out.tokens, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_losses["balance"], balance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_losses["z_loss"], z_loss, rtol=1e-6, atol=1e-6)
    stats = out.routing_stats["connector"]
    assert stats.kept.sum() == 3 * 10 * 2 and stats.kept.shape == (4,) and stats.tokens == 30
    assert int(stats.dropped) == 0 and torch.equal(stats.by_modality["image"].kept, stats.kept)
    assert stats.as_dict()["image"]["tokens_per_expert"] == stats.kept.tolist()


def test_batched_dispatch_equals_each_sample_alone():
    torch.manual_seed(0)
    connector = build_connector(_config("moe_mlp"), 24, 16)
    _randomise_routers(connector)
    x = torch.randn(5, 7, 24)
    batch = connector(x)
    alone = [connector(x[i:i + 1]) for i in range(5)]
    torch.testing.assert_close(batch.tokens, torch.cat([o.tokens for o in alone]), rtol=1e-6, atol=1e-6)
    for name in ("balance", "z_loss"):  # per-image losses averaged over the batch
        mean = torch.stack([o.aux_losses[name] for o in alone]).mean()
        torch.testing.assert_close(batch.aux_losses[name], mean, rtol=1e-6, atol=1e-6)


def test_aux_losses_at_a_zero_router_and_the_balance_formula():
    connector = build_connector(_config("moe_mlp"), 24, 16)
    with torch.no_grad():
        connector.router.weight.zero_()
    out = connector(torch.randn(2, 9, 24))
    assert out.aux_losses["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-6)  # 1.9218
    assert out.aux_losses["balance"].item() == pytest.approx(1.0, abs=1e-6)  # p = 1/4: E^2 * mean_e(1/4 * f_e) = 1
    # CuMo's per-image loss = zoo.moe's Switch loss of each image, averaged over the images
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 11, 4, generator=g).softmax(-1)
    first = probs.argmax(-1)
    expected = torch.stack([L.switch_balance(p, f) for p, f in zip(probs, first)]).mean()
    image = torch.arange(3).repeat_interleave(11)
    torch.testing.assert_close(L.sequence_switch_balance(probs.flatten(0, 1), first.flatten(), image), expected)
    cumo = 16 * (probs.mean(1) * F.one_hot(first, 4).float().mean(1)).mean()  # CuMo's density_1_proxy * density_1
    torch.testing.assert_close(L.sequence_switch_balance(probs.flatten(0, 1), first.flatten(), image), cumo)
    collapsed = F.one_hot(torch.zeros(10, dtype=torch.long), 4).float()
    assert L.sequence_switch_balance(collapsed, collapsed.argmax(-1), torch.arange(10) // 5).item() == 4.0  # E
    batch_wide = build_connector(_config("moe_mlp", moe={"balance_loss": "switch"}), 24, 16)
    x = torch.randn(2, 9, 24)
    out = batch_wide(x)
    routing = batch_wide.router(x.reshape(18, 24))
    torch.testing.assert_close(out.aux_losses["balance"], L.switch_balance(routing.probs, routing.top1()))
    assert MoEMLPConnector.default_coefficients == MoCHAConnector.default_coefficients == COEFFICIENTS


# --- co-upcycling -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_co_upcycled_moe_mlp_equals_the_source_mlp_for_any_routing(seed):
    torch.manual_seed(seed)
    mlp = MLPProjector(_config("mlp"), 24, 16)
    connector = upcycle_connector(mlp)
    assert connector.config.kind == "moe_mlp" and (connector.moe.num_experts, connector.moe.top_k) == (4, 2)
    _randomise_routers(connector, std=5.0, seed=seed)
    x = torch.randn(4, 9, 24)
    torch.testing.assert_close(connector(x).tokens, mlp(x).tokens, rtol=1e-5, atol=1e-6)
    raw = upcycle_connector(mlp, renormalize=False)  # raw gates: a uniform router gives 2 x 1/4 of the MLP
    with torch.no_grad():
        raw.router.weight.zero_()
    torch.testing.assert_close(raw(x).tokens, 0.5 * mlp(x).tokens, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hga", ["none", "graph", "attention"])
def test_co_upcycled_mocha_equals_the_source_mlps_for_any_routing(hga):
    torch.manual_seed(0)
    dense = build_connector(_config("mlp"), [24, 12, 20], 16)
    assert isinstance(dense, PerExpertConnector)
    connector = upcycle_mocha(dense, options={"hga": hga, "order": [2, 0, 1]})
    assert connector.config.kind == "mocha"
    _randomise_routers(connector, std=5.0)
    features = [torch.randn(2, length, width) for length, width in ((6, 24), (4, 12), (5, 20))]
    out = connector(features)
    concat = torch.cat([dense.connectors[i](features[i]).tokens for i in (2, 0, 1)], 1)
    assert out.expert_ids.tolist() == [2] * 5 + [0] * 6 + [1] * 4
    expected = graph_hga(concat, out.expert_ids)[0] if hga == "graph" else concat  # attention: fresh = identity
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)
    assert list(out.aux_losses) == [f"{name}.{i}" for i in (2, 0, 1) for name in ("balance", "z_loss")]
    assert ("hga_gate" in out.routing) is (hga != "none")


# --- hierarchical group attention --------------------------------------------------------------------------------

def test_hga_neighbour_counts_follow_the_released_k_and_70_percent_rule():
    assert int(10 * 0.7) == 7  # k = 10: 7 intra-group + 3 inter-group before clipping to the group sizes
    x = torch.randn(2, 20, 8)
    groups = torch.arange(4).repeat_interleave(5)  # [5, 5, 5, 5]: 4 intra (clipped to 5 - 1) + 3 inter
    index, similarity, valid = select_neighbours(x, groups)
    assert valid.all() and index.shape == (2, 20, 7)
    same = groups[index] == groups[None, :, None]
    assert same.sum(-1).eq(4).all() and (~same).sum(-1).eq(3).all()
    assert not (index == torch.arange(20)[None, :, None]).any()  # no self-loops
    groups = torch.tensor([0] * 10 + [1] * 3)  # [10, 3]: 7 + 3 for the large group, 2 + 3 for the small one
    index, _, valid = select_neighbours(torch.randn(1, 13, 8), groups)
    same = (groups[index] == groups[None, :, None]) & valid
    assert same.sum(-1)[0].tolist() == [7] * 10 + [2] * 3
    assert (valid & ~same).sum(-1)[0].tolist() == [3] * 13


def test_graph_hga_equals_the_released_code_per_image():
    torch.manual_seed(0)
    x = torch.randn(3, 15, 12) * 2
    groups = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    out, gate = graph_hga(x, groups)
    for b in range(3):
        torch.testing.assert_close(out[b], _released_hga(x[b], groups), rtol=1e-5, atol=1e-5)
    assert gate.shape == (3, 15)


def test_hga_gate_is_sigmoid_minus_2_when_neighbours_are_identical_and_rows_are_normalised():
    groups = torch.arange(4).repeat_interleave(5)
    x = F.one_hot(groups, 8).float()[None] * 3.0  # identical within a group, orthogonal across groups
    out, gate = graph_hga(x, groups)  # intra edges weigh 1, inter edges 0: a_i = x_i, delta = 0
    torch.testing.assert_close(gate, torch.full((1, 20), torch.sigmoid(torch.tensor(-2.0)).item()))
    assert gate[0, 0].item() == pytest.approx(0.1192, abs=1e-4)
    torch.testing.assert_close(out, F.layer_norm(x, (8,)))
    same = torch.full((1, 20, 8), 0.5)  # all equal: every edge weight is 0 after min-max, so a = 0 (as released)
    _, gate = graph_hga(same, groups)
    torch.testing.assert_close(gate, torch.sigmoid(torch.full((1, 20), 10 * (0.5 - 0.2))))
    torch.manual_seed(0)
    out, _ = graph_hga(torch.randn(2, 20, 64) * 3 + 1, groups)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 20), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 20), rtol=0, atol=1e-3)


def test_attention_hga_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    attention = GroupAttention(16, 2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    groups = torch.tensor([3] * 5 + [1] * 4)
    out, gate = attention(x, groups)
    assert torch.equal(out, x) and gate.shape == (2, 9)
    out.square().sum().backward()
    assert attention.intra.out_proj.weight.grad.abs().sum() > 0 and attention.inter.out_proj.weight.grad.abs().sum() > 0


# --- config errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, fields, match", [
    ("mocha", {"options": {"hga": "gat"}}, r"^connector\.options\.hga: expected one of 'graph', 'attention', 'none'"),
    ("mocha", {"options": {"order": [0, 0]}}, r"^connector\.options\.order: expected a permutation"),
    ("mocha", {"options": {"hga": "attention", "heads": 3}}, r"^connector\.options\.heads: 3 does not divide"),
    ("mocha", {"options": {"neighbors": 5}}, r"^connector\.options\.neighbors: unknown option"),
    ("mocha", {"options": {"intra_fraction": 1.5}}, r"^connector\.options\.intra_fraction: expected a fraction"),
    ("moe_mlp", {"options": {"hga": "graph"}}, r"^connector\.options\.hga: unknown option"),
    ("moe_mlp", {"moe": {"capacity_factor": 1.5}}, r"^connector\.moe\.capacity_factor: not a setting"),
    ("moe_mlp", {"moe": {"top_k": 5}}, r"^connector\.moe\.top_k: must be <= num_experts"),
    ("moe_mlp", {"moe": {"balance_loss": "mixtral"}}, r"^connector\.moe\.balance_loss: .* per-image Switch"),
    ("moe_mlp", {"moe": {"router": "expert_choice"}}, r"^connector\.moe\.router: expected a top-k router"),
    ("moe_mlp", {"projector": "linear"}, r"^connector\.projector: the moe_mlp connector's experts are mlp2x_gelu"),
])
def test_bad_settings_name_the_field(kind, fields, match):
    in_dims = [24, 12] if kind == "mocha" else 24
    with pytest.raises(ConfigError, match=match):
        build_connector(_config(kind, **fields), in_dims, 16)


def test_mocha_needs_several_vision_experts():
    with pytest.raises(ValueError, match=r"^connector\.kind: 'mocha' needs several vision experts"):
        build_connector(_config("mocha"), 24, 16)


# --- tiny end-to-end models --------------------------------------------------------------------------------------

def _fixed_batch(model, easy_vqa, size=16):
    """The first ``size`` training questions, collated (the batch `_fit` measures its losses on)."""
    from zoo.train import VQATrainingSet

    dataset = VQATrainingSet(model, easy_vqa["train"])
    return dataset.collate([dataset[i] for i in range(size)])


def _check_loss_closed_form(model, batch, names):
    with torch.no_grad():
        out = model(**batch)
    assert sorted(out.aux_losses) == sorted(f"connector.{name}" for name in names)
    expected = out.lm_loss + sum(COEFFICIENTS[name.split(".")[1]] * value for name, value in out.aux_losses.items())
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)
    assert out.loss > out.lm_loss


def test_tiny_moe_mlp_model_trains_and_adds_its_aux_losses(easy_vqa, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(name="tiny-cumo")
    config.connector = _config("moe_mlp", coefficients=COEFFICIENTS)
    model = zoo.build(config)
    assert isinstance(model.connector, MoEMLPConnector)
    before, after = _fit(model, easy_vqa, steps=4)
    assert after < before
    batch = _fixed_batch(model, easy_vqa)
    _check_loss_closed_form(model, batch, ["balance", "z_loss"])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.load(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_tiny_mocha_model_with_two_experts_trains(easy_vqa):
    torch.manual_seed(0)
    config = tiny_config(name="tiny-mocha")
    config.vision = _experts(CLIP, CONVNEXT)
    config.fusion = FusionConfig(mode="sequence", resample="none")
    config.connector = _config("mocha", {"order": [1, 0]}, coefficients=COEFFICIENTS)
    model = zoo.build(config)
    assert isinstance(model.connector, MoCHAConnector) and model.num_image_tokens == 4 + 16
    before, after = _fit(model, easy_vqa, steps=4)
    assert after < before
    names = [f"{name}.{i}" for i in (0, 1) for name in ("balance", "z_loss")]
    _check_loss_closed_form(model, _fixed_batch(model, easy_vqa), names)


def test_every_registered_moe_connector_runs_forward_and_backward():
    for kind in ("moe_mlp", "mocha"):
        cls = CONNECTORS.get(kind)
        in_dims = [24, 12] if getattr(cls, "requires_multi_expert", False) else 24
        connector = build_connector(_config(kind), in_dims, 16)
        features = [torch.randn(2, 9, d) for d in in_dims] if isinstance(in_dims, list) else torch.randn(2, 9, 24)
        out = connector(features)
        (out.tokens.sum() + sum(out.aux_losses.values())).backward()
        assert all(p.grad is not None for p in connector.parameters())
