"""The gating rules of the released MoE-LLaVA and CuMo code (not on PyPI: read from their repositories, see the
`zoo.released` docstring), checked on worked examples computed by hand from those rules.

One set of router probabilities serves every example: four tokens, four experts, each row summing to 1, so the
router logits ``ln p`` give ``softmax = p`` (a per-token shift ``c`` changes nothing but the z-loss)::

    token   p(e0)  p(e1)  p(e2)  p(e3)   1st  2nd
      t0    0.50   0.30   0.10   0.10    e0   e1
      t1    0.60   0.10   0.20   0.10    e0   e2
      t2    0.10   0.20   0.30   0.40    e3   e2
      t3    0.20   0.50   0.25   0.05    e1   e2

Tokens are the unit vectors of a 4-wide space, so a router weight ``W[e, t] = ln p[t, e] + c_t`` gives exactly
those logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from zoo.config import ConnectorConfig, SparsityConfig, from_dict
from zoo.moe import MoEConfig, MoELayer

P = torch.tensor([[0.50, 0.30, 0.10, 0.10],
                  [0.60, 0.10, 0.20, 0.10],
                  [0.10, 0.20, 0.30, 0.40],
                  [0.20, 0.50, 0.25, 0.05]], dtype=torch.float64)
SHIFT = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)  # logsumexp of each token's logits
TOKENS = torch.eye(4).unsqueeze(0)  # [1, T=4, d=4]

# --- MoE-LLaVA (DeepSpeed 0.9.5 top2gating): capacity = max(min_capacity, ceil(T / E * 2 * cf)); an expert's buffer
# takes every first choice in token order, then the second choices; gates renormalised over the slots kept.
# capacity_factor 1.0 -> ceil(1 * 2) = 2 slots per expert:
#   e0: t0 1st, t1 1st            e1: t3 1st, t0 2nd            e2: t1 2nd, t2 2nd, t3 2nd (dropped: 3rd in line)
#   e3: t2 1st
#   t0: 0.5/(0.5+0.3) = 0.625 on e0, 0.375 on e1     t1: 0.6/0.8 = 0.75 on e0, 0.25 on e2
#   t2: 0.4/0.7 = 4/7 on e3, 3/7 on e2               t3: e2 dropped, so 0.5/0.5 = 1 on e1
TRAIN_CF1 = [[0.625, 0.375, 0, 0], [0.75, 0, 0.25, 0], [0, 0, 3 / 7, 4 / 7], [0, 1, 0, 0]]
# capacity_factor 0.5 -> ceil(1 * 1) = 1 slot: e0 keeps t0 (t1's first choice is dropped, its second on e2 stays
# and weighs 0.2/0.2 = 1); e1 keeps t3's first choice, so t0's second is dropped; e2 keeps t1's second only.
TRAIN_CF05 = [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]]
# eval_capacity_factor 2.0 -> ceil(1 * 4) = 4 slots: nothing dropped; t3: 0.5/0.75 = 2/3 on e1, 1/3 on e2
EVAL_CF2 = [[0.625, 0.375, 0, 0], [0.75, 0, 0.25, 0], [0, 0, 3 / 7, 4 / 7], [0, 2 / 3, 1 / 3, 0]]
# Switch loss on first choices, before dropping: E * sum_e mean_t(p[t, e]) * share of first choices on e
#   = 4 * (0.35 * 2/4 + 0.275 * 1/4 + 0.2125 * 0 + 0.1625 * 1/4) = 1.1375
MOE_LLAVA_BALANCE = 1.1375


def _moe_llava_layer(**moe) -> MoELayer:
    """A layer of the zoo's ``moe-llava`` policy (what `zoo.released` reads a MoE-LLaVA config into), d = 4."""
    policy = from_dict(SparsityConfig, {"preset": "moe-llava", "moe": moe})
    layer = MoELayer(MoEConfig(hidden_size=4, expert_size=8, **policy.moe))
    with torch.no_grad():
        layer.router.weight.copy_((P.log() + SHIFT[:, None]).T)
    return layer


def _expected_output(layer: MoELayer, gates) -> torch.Tensor:
    """sum_e gate[t, e] * expert_e(x_t), each expert run on its own."""
    experts = layer.experts.to_modulelist()
    gates = torch.tensor(gates, dtype=torch.float32)
    rows = [sum(gates[t, e] * experts[e](TOKENS[0, t]) for e in range(4)) for t in range(4)]
    return torch.stack(rows).unsqueeze(0)


@pytest.mark.parametrize("training, moe, gates, dropped", [
    (True, {"capacity_factor": 1.0}, TRAIN_CF1, 1),
    (True, {"capacity_factor": 0.5}, TRAIN_CF05, 4),
    (True, {"capacity_factor": 0.5, "min_capacity": 2}, TRAIN_CF1, 1),  # min_capacity lifts 1 slot to 2
    (False, {"capacity_factor": 0.5, "eval_capacity_factor": 2.0}, EVAL_CF2, 0),  # eval uses its own factor
])
def test_moe_llava_top2_capacity_dropping_and_renormalisation(training, moe, gates, dropped):
    layer = _moe_llava_layer(**moe).train(training)
    with torch.no_grad():
        out = layer(TOKENS)
    torch.testing.assert_close(out.output, _expected_output(layer, gates), rtol=0, atol=1e-6)
    assert int(out.stats.dropped) == dropped
    assert out.aux_losses["balance"].item() == pytest.approx(MOE_LLAVA_BALANCE, abs=1e-6)
    assert out.routing.indices(2).tolist() == [[0, 1], [0, 2], [3, 2], [1, 2]]


def test_moe_llava_capacity_formula():
    """DeepSpeed's ``_capacity``: ceil(T / E * cf * 2) for top-2, at least ``min_capacity``; eval factor in eval."""
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0)
    assert config.capacity(10, training=True) == math.ceil(10 / 4 * 1.5 * 2) == 8
    assert config.capacity(10, training=False) == math.ceil(10 / 4 * 2.0 * 2) == 10
    assert MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=4).capacity(2, training=True) == 4


# --- CuMo (cumo/model/multimodal_projector/builder.py MLPMoE, clip_smoe.py): top-2 of softmax, gates renormalised
# over the two, no capacity (dropless); balance per image: E^2 * mean_{b,e} P_be * F_be with P the image's mean
# probabilities and F the share of its tokens whose first choice is e; z-loss mean_t logsumexp(logits_t)^2.
# Two images of two tokens (t0, t1 | t2, t3):
#   weights  t0: 0.625 e0, 0.375 e1   t1: 0.75 e0, 0.25 e2   t2: 4/7 e3, 3/7 e2   t3: 2/3 e1, 1/3 e2
#   image 0: P = [0.55, 0.2, 0.15, 0.1], F = [1, 0, 0, 0] -> sum_e P F = 0.55
#   image 1: P = [0.15, 0.35, 0.275, 0.225], F = [0, 0.5, 0, 0.5] -> 0.175 + 0.1125 = 0.2875
#   balance = 16 * (0.55 + 0.2875) / 8 = 1.675;  z-loss = mean(1, 4, 0, 1) = 1.5
CUMO_GATES = [[0.625, 0.375, 0, 0], [0.75, 0, 0.25, 0], [0, 0, 3 / 7, 4 / 7], [0, 2 / 3, 1 / 3, 0]]


def test_cumo_mlp_moe_top2_renormalised_dropless_per_image_balance_and_z_loss():
    from zoo.connectors.moe_mlp import MoEMLPConnector

    config = ConnectorConfig(kind="moe_mlp", moe={"num_experts": 4, "top_k": 2})  # what a CuMo config reads into
    connector = MoEMLPConnector(config, in_dim=4, out_dim=6).eval()
    with torch.no_grad():
        connector.router.weight.copy_((P.log() + SHIFT[:, None]).T)
        out = connector(TOKENS.view(2, 2, 4))  # two images of two tokens
    experts = connector.experts.to_modulelist()
    expected = torch.stack([sum(CUMO_GATES[t][e] * experts[e](TOKENS[0, t]) for e in range(4)) for t in range(4)])
    torch.testing.assert_close(out.tokens.view(4, 6), expected, rtol=0, atol=1e-6)
    assert out.aux_losses["balance"].item() == pytest.approx(1.675, abs=1e-6)
    assert out.aux_losses["z_loss"].item() == pytest.approx(1.5, abs=1e-5)
    assert connector.training is False and out.routing_stats["connector"].dropped == 0  # no capacity, even in eval
