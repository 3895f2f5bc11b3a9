"""zoo.moe: closed-form losses, capacity arithmetic, backend equivalence, upcycling identity, router behaviour and
parity with transformers' Mixtral / Qwen2-MoE / DeepSeek-V3 blocks on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zoo.config import ConfigError, from_dict
from zoo.moe import (
    DISPATCHERS,
    ExpertMLP,
    MoEConfig,
    MoELayer,
    StackedExperts,
    activation_name,
    from_transformers,
    read_ffn,
    to_transformers,
    upcycle,
    update_router_biases,
)
from zoo.moe import losses as L
from zoo.moe.routing import capacity_keep
from zoo.registry import UnknownPartError


def layer_for(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    base = dict(hidden_size=12, expert_size=20, num_experts=4, top_k=2, router_init_std=0.5)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad, field", [
    ({"top_k": 5}, "top_k"), ({"top_k": 0}, "top_k"), ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"eval_capacity_factor": 0.0}, "eval_capacity_factor"), ({"num_groups": 3}, "num_groups"),
    ({"activation": "swishy"}, "activation"), ({"min_capacity": -2}, "min_capacity"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=rf"^moe\.{field}: "):
        from_dict(MoEConfig, bad, path="moe")


@pytest.mark.parametrize("field, value", [("router", "softmax_top"), ("backend", "groupd")])
def test_unknown_router_or_backend_lists_the_names(field, value):
    with pytest.raises(UnknownPartError) as err:
        MoEConfig(**{field: value})
    assert str(err.value).startswith(f"{field}: unknown")
    assert "did you mean" in str(err.value)
    if field == "backend":
        assert all(name in str(err.value) for name in ("grouped", "loop", "padded"))


# ---------------------------------------------------------------------------------------------------- losses
def test_switch_loss_is_one_at_uniform_routing_and_E_when_collapsed():
    layer = layer_for(balance_loss="switch")
    nn.init.zeros_(layer.router.weight)  # p = 1/E everywhere; ties send every first choice to expert 0
    out = layer(torch.randn(16, 12))
    assert out.aux_losses["balance"].item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(16, 4)
    collapsed[:, 2] = 1.0
    assert L.switch_balance(collapsed, collapsed.argmax(-1)).item() == pytest.approx(4.0)


def test_switch_loss_hand_case():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    top1 = torch.tensor([0, 0, 1, 2])
    expected = 4 * (0.5 * 0.35 + 0.25 * 0.3 + 0.25 * 0.25 + 0.0 * 0.1)
    assert L.switch_balance(probs, top1).item() == pytest.approx(expected, rel=1e-6)


def test_per_sequence_switch_loss_averages_each_sequences_switch_loss():
    """CuMo / MoCHA: balance per image, averaged; padding tokens neither route nor count."""
    layer = layer_for(balance_loss="switch_per_sequence")
    x = torch.randn(3, 7, 12)
    pad = torch.ones(3, 7, dtype=torch.bool)
    pad[1, 4:] = False
    out = layer(x, padding_mask=pad)
    per_sequence = []
    for b in range(3):
        routing = layer.router(x[b][pad[b]])
        per_sequence.append(L.switch_balance(routing.probs, routing.top1()))
    torch.testing.assert_close(out.aux_losses["balance"], torch.stack(per_sequence).mean())
    flat = layer_for(balance_loss="switch")(x, padding_mask=pad).aux_losses["balance"]
    assert not torch.allclose(out.aux_losses["balance"], flat)  # not the batch-wide loss
    assert layer(x[0]).aux_losses["balance"].item() == pytest.approx(per_sequence[0].item(), rel=1e-6)  # one sequence


def test_mixtral_variant_is_k_at_uniform_and_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = layer_for(balance_loss="mixtral", top_k=2)
    nn.init.zeros_(layer.router.weight)
    assert layer(torch.randn(10, 12)).aux_losses["balance"].item() == pytest.approx(2.0, abs=1e-6)
    layer = layer_for(balance_loss="mixtral", num_experts=6, top_k=3)
    x = torch.randn(30, 12)
    out = layer(x)
    ref = load_balancing_loss_func((out.routing.logits,), num_experts=6, top_k=3)
    assert out.aux_losses["balance"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_deepseek_expert_and_device_losses():
    t, n, k = 8, 4, 2
    uniform = torch.full((t, n), 1 / n)
    round_robin = torch.arange(t * k) % n  # every expert gets t*k/n slots
    assert L.expert_balance(uniform, round_robin, k).item() == pytest.approx(1.0)
    assert L.device_balance(uniform, round_robin, k, groups=2).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(t, n)
    collapsed_probs[:, :k] = 1 / k
    collapsed = torch.arange(t * k) % k  # all slots on experts 0..k-1
    assert L.expert_balance(collapsed_probs, collapsed, k).item() == pytest.approx(n / k)
    # f_i = N'/(K'T) * count_i on a hand-specified selection
    sel = torch.tensor([0, 1, 0, 2, 0, 3, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0])
    counts = torch.bincount(sel, minlength=n).float()
    p = torch.softmax(torch.randn(t, n), -1)
    expected = ((n / (k * t)) * counts * p.mean(0)).sum()
    assert L.expert_balance(p, sel, k).item() == pytest.approx(expected.item(), rel=1e-6)


def test_z_loss_value_and_gradient():
    e, t = 6, 5
    logits = torch.zeros(t, e, requires_grad=True)
    z = L.z_loss(logits)
    assert z.item() == pytest.approx(math.log(e) ** 2, rel=1e-6)
    logits = torch.randn(t, e, requires_grad=True)
    L.z_loss(logits).backward()
    lse = torch.logsumexp(logits.detach(), -1, keepdim=True)
    expected = 2 * lse * torch.softmax(logits.detach(), -1) / t
    torch.testing.assert_close(logits.grad, expected)


# ---------------------------------------------------------------------------------------------------- capacity
def _first_choice_on_expert0(t: int, d: int = 12) -> torch.Tensor:
    x = torch.randn(t, d) * 0.1
    x[:, 0] = 5.0
    return x


def test_capacity_arithmetic_and_dropped_slots():
    layer = layer_for(capacity_factor=1.5, num_experts=4, top_k=2)
    assert layer.config.capacity(10, training=True) == 8
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    x = _first_choice_on_expert0(10)
    out = layer(x)
    first = out.routing.indices(2)[:, 0]
    assert torch.all(first == 0)
    assert out.stats.kept[0].item() == 8 and out.stats.dropped.item() == 2
    # position policy: the last two tokens lose their first choice and get weight 1 on their second expert
    keep = capacity_keep(out.routing, 4, 8, "position").view(10, 2)
    assert keep[:8, 0].all() and not keep[8:, 0].any() and keep[:, 1].all()
    weights = layer.combine_weights(out.routing, keep.reshape(-1)).view(10, 2)
    torch.testing.assert_close(weights[8:, 1], torch.ones(2))
    for t in (8, 9):
        e2 = int(out.routing.indices(2)[t, 1])
        torch.testing.assert_close(out.output[t], layer.experts.forward_expert(e2, x[t:t + 1])[0])
    # dropless by default
    assert layer_for().config.capacity(10, training=True) is None


def test_probs_drop_policy_keeps_the_highest_gates():
    layer = layer_for(capacity_factor=1.5, drop_policy="probs")
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    x = _first_choice_on_expert0(10)
    x[:, 0] = torch.linspace(1.0, 4.0, 10)  # later tokens are more confident about expert 0
    out = layer(x)
    keep = capacity_keep(out.routing, 4, 8, "probs").view(10, 2)
    assert not keep[:2, 0].any() and keep[2:, 0].all()


def test_eval_capacity_factor_applies_in_eval():
    layer = layer_for(capacity_factor=1.0, eval_capacity_factor=2.0)
    assert layer.config.capacity(10, training=True) == 5
    assert layer.config.capacity(10, training=False) == 10


# ---------------------------------------------------------------------------------------------------- backends
BACKEND_CASES = {
    "swiglu": {},
    "mlp_bias": {"expert_form": "mlp", "activation": "gelu", "bias": True},
    "capacity": {"capacity_factor": 0.75},
    "shared_gated": {"num_shared": 2, "shared_gate": True},
    "bigmac": {"bigmac_rank": 6},
    "many_empty": {"num_experts": 16, "top_k": 1},
    "top_p_null": {"router": "top_p", "top_p": 0.6, "top_k": 3, "null_experts": 2},
    "expert_choice": {"router": "expert_choice", "expert_choice_factor": 1.0},
    "sigmoid_groups": {"router": "sigmoid_bias", "num_experts": 8, "num_groups": 4, "topk_groups": 2},
}


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backends_give_the_same_outputs_and_gradients(case):
    results = {}
    x0 = torch.randn(3, 5, 12)
    for backend in DISPATCHERS.names():
        layer = layer_for(seed=1, backend=backend, **BACKEND_CASES[case])
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        loss = (out.output * torch.linspace(-1, 1, 12)).square().sum() + sum(out.aux_losses.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[backend] = (out.output.detach(), x.grad.clone(), grads, out.stats.kept.clone())
    ref_out, ref_dx, ref_grads, ref_kept = results["loop"]
    if case == "many_empty":
        assert (ref_kept == 0).any(), "the case must include empty experts"
    for backend, (y, dx, grads, kept) in results.items():
        torch.testing.assert_close(y, ref_out, rtol=1e-5, atol=1e-5, msg=f"{backend} output")
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5, msg=f"{backend} input grad")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=f"{backend} {name}")
        assert torch.equal(kept, ref_kept)


@pytest.mark.parametrize("mode", ["native", "segments"])
def test_grouped_kernels_agree_including_empty_experts(mode, monkeypatch):
    from zoo.moe import kernels

    results = {}
    for backend, setting in (("loop", "auto"), ("grouped", mode)):
        monkeypatch.setattr(kernels, "GROUPED_MM", setting)
        layer = layer_for(seed=3, backend=backend, hidden_size=16, expert_size=32, num_experts=12, top_k=1)
        x = torch.randn(6, 16, requires_grad=True)
        out = layer(x)
        out.output.square().sum().backward()
        results[backend] = (out.output, x.grad, layer.experts.w_in.grad, layer.experts.w_out.grad, out.stats.kept)
    assert (results["loop"][4] == 0).any()
    for a, b in zip(results["grouped"][:4], results["loop"][:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backends_agree_in_bfloat16():
    x = torch.randn(40, 12, dtype=torch.bfloat16)
    outs = {}
    for backend in DISPATCHERS.names():
        layer = layer_for(seed=2, backend=backend).to(torch.bfloat16)
        outs[backend] = layer(x).output.float()
    for backend, y in outs.items():
        torch.testing.assert_close(y, outs["loop"], rtol=2e-2, atol=2e-2, msg=backend)


# ---------------------------------------------------------------------------------------------------- upcycling
def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(3)
    return LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, hidden_act="silu", num_attention_heads=4))


def _phi_mlp():
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    torch.manual_seed(4)
    return PhiMLP(PhiConfig(hidden_size=24, intermediate_size=40, hidden_act="gelu_new", num_attention_heads=4))


def _gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(5)
    mlp = GPT2MLP(40, GPT2Config(n_embd=24, n_head=4, activation_function="gelu_new", resid_pdrop=0.0))
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.3)
    return mlp


@pytest.mark.parametrize("make", [_llama_mlp, _phi_mlp, _gpt2_mlp], ids=["llama", "phi", "gpt2"])
@pytest.mark.parametrize("backend", ["loop", "grouped", "padded"])
def test_upcycled_layer_equals_the_dense_ffn(make, backend):
    dense = make().eval()
    moe = upcycle(dense, num_experts=4, top_k=2, backend=backend, router_init_std=1.0)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).output, dense(x), rtol=1e-6, atol=1e-6)
    # without renormalisation the gates no longer sum to 1 and the identity breaks: the test can fail
    raw = upcycle(dense, num_experts=4, top_k=2, backend=backend, renormalize=False, router_init_std=1.0)
    with torch.no_grad():
        assert (raw(x).output - dense(x)).abs().max() > 1e-3


def test_upcycling_reads_activation_and_form():
    assert read_ffn(_llama_mlp()).form == "swiglu" and read_ffn(_llama_mlp()).activation == "silu"
    assert read_ffn(_phi_mlp()).activation == "gelu_new" and read_ffn(_gpt2_mlp()).form == "mlp"
    assert activation_name(nn.GELU(approximate="tanh")) == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match=r"Linear: not a supported dense FFN"):
        read_ffn(nn.Linear(3, 4))


def test_fine_grained_upcycling_and_segmentation_are_exact():
    dense = _llama_mlp().eval()
    x = torch.randn(9, 24)
    parts = read_ffn(dense).segments(4)
    with torch.no_grad():
        torch.testing.assert_close(sum(p(x) for p in parts), dense(x), rtol=0, atol=1e-6)
        # E = m = 4 slices, all active; a uniform router gives gates 1/4, routed_scaling 4 restores 1
        moe = upcycle(dense, num_experts=4, top_k=4, granularity=4, routed_scaling=4.0)
        nn.init.zeros_(moe.router.weight)
        assert moe.config.expert_size == 10
        torch.testing.assert_close(moe(x).output, dense(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="granularity"):
        upcycle(dense, num_experts=4, granularity=3)


def test_expert_noise_breaks_symmetry():
    dense = _llama_mlp()
    moe = upcycle(dense, num_experts=3, expert_noise=0.01, generator=torch.Generator().manual_seed(0))
    w = moe.experts.w_in.detach()
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - read_ffn(dense).w_in).std() / read_ffn(dense).w_in.std()
    assert 0.005 < rel.item() < 0.02


def test_modulelist_round_trip_and_shared_expert_slices():
    experts = StackedExperts(3, 10, 14, "mlp", "gelu", bias=True)
    mods = experts.to_modulelist()
    x = torch.randn(5, 10)
    with torch.no_grad():
        for e in range(3):
            torch.testing.assert_close(mods[e](x), experts.forward_expert(e, x))
        back = StackedExperts.from_modulelist(mods)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), experts.state_dict().values()))
    # a fused shared FFN of width K_s * w equals the sum of K_s FFNs cut from its rows/columns
    shared = ExpertMLP(10, 3 * 8)
    with torch.no_grad():
        torch.testing.assert_close(sum(p(x) for p in read_ffn(shared).segments(3)), shared(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- routers
def test_sigmoid_bias_selection_uses_bias_but_gates_do_not():
    layer = layer_for(router="sigmoid_bias", num_experts=8, top_k=2, renormalize=False)
    x = torch.randn(20, 12)
    out = layer(x)
    scores = torch.sigmoid(out.routing.logits)
    chosen = out.routing.indices(2)
    torch.testing.assert_close(out.routing.score.view(20, 2), scores.gather(1, chosen))
    # a bias shift that leaves the chosen set unchanged leaves the gates unchanged
    with torch.no_grad():
        layer.router.bias += 0.5
    out2 = layer(x)
    assert torch.equal(out2.routing.indices(2), chosen)
    torch.testing.assert_close(out2.output, out.output)


def test_bias_update_moves_load_off_the_busiest_expert():
    layer = layer_for(router="sigmoid_bias", num_experts=4, top_k=1, bias_update_rate=0.05)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    x = _first_choice_on_expert0(32)
    layer.train()
    first = layer(x).stats.kept.clone()
    busiest = int(first.argmax())
    assert update_router_biases(layer) == 1
    bias = layer.router.bias
    assert bias[busiest] < 0 and torch.all(bias[torch.arange(4) != busiest] > 0)
    for _ in range(40):
        layer(x)
        update_router_biases(layer)
    assert layer(x).stats.kept[busiest] < first[busiest]


def test_expert_choice_gives_every_expert_exactly_C_tokens():
    layer = layer_for(router="expert_choice", num_experts=4, expert_choice_factor=1.0)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([3.0, 2.0, 0.0, 0.0])
    x = _first_choice_on_expert0(16)
    out = layer(x)
    assert out.stats.kept.tolist() == [4, 4, 4, 4]
    per_token = torch.bincount(out.routing.token, minlength=16)
    assert (per_token == 0).any() and per_token.sum() == 16


def test_second_expert_sampling_is_a_training_only_flag():
    x = torch.randn(64, 12)
    det = layer_for(router_init_std=0.05).train()
    assert torch.equal(det(x).routing.expert, det(x).routing.expert)
    sampled = layer_for(router_init_std=0.05, second_expert_sampling=True).train()
    torch.manual_seed(0)
    a = sampled(x).routing.indices(2)
    torch.manual_seed(1)
    b = sampled(x).routing.indices(2)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])
    assert torch.all(a[:, 0] != a[:, 1])
    sampled.eval()
    assert torch.equal(sampled(x).routing.expert, det.eval()(x).routing.expert)


def test_noisy_topk_is_deterministic_in_eval_only():
    layer = layer_for(router="noisy_topk")
    nn.init.normal_(layer.router.noise_weight, std=1.0)
    x = torch.randn(50, 12)
    layer.eval()
    clean = layer(x).routing.expert
    assert torch.equal(clean, layer(x).routing.expert)
    assert torch.equal(clean.view(50, 2), torch.softmax(x @ layer.router.weight.t(), -1).topk(2).indices)
    layer.train()
    assert not torch.equal(clean, layer(x).routing.expert)


def test_top_p_router_adds_experts_until_the_threshold():
    layer = layer_for(router="top_p", top_p=0.5, top_k=3, num_experts=4, renormalize=False, router_init_std=0.3)
    x = torch.randn(40, 12)
    out = layer(x)
    probs = out.routing.probs.sort(-1, descending=True).values
    expected = ((probs.cumsum(-1) - probs) < 0.5)[:, :3].sum(-1)
    assert torch.equal(torch.bincount(out.routing.token, minlength=40), expected)
    assert (expected == 1).any() and (expected > 1).any()


def test_null_experts_cost_nothing_and_are_counted():
    layer = layer_for(null_experts=2)
    with torch.no_grad():
        layer.router.weight[4:, 0] = 10.0  # both null experts win every token
    out = layer(_first_choice_on_expert0(6))
    assert torch.all(out.output == 0)
    assert out.stats.null.item() == 12 and out.stats.kept.sum().item() == 0


def test_deepseek_v1_gates_are_not_renormalised():
    layer = layer_for(num_experts=8, top_k=3, renormalize=False, router_init_std=1.0)
    out = layer(torch.randn(10, 12))
    gates = layer.combine_weights(out.routing, torch.ones_like(out.routing.expert, dtype=torch.bool)).view(10, 3)
    assert torch.all(gates.sum(-1) < 1)
    torch.testing.assert_close(gates, out.routing.probs.gather(1, out.routing.indices(3)))


def test_padding_neither_routes_nor_counts():
    layer = layer_for()
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, padding_mask=mask)
    real = layer(x[mask])
    assert out.stats.tokens == 10
    torch.testing.assert_close(out.output[mask], real.output)
    assert torch.all(out.output[~mask] == 0)
    for name in real.aux_losses:
        torch.testing.assert_close(out.aux_losses[name], real.aux_losses[name])


def test_statistics_split_by_modality():
    layer = layer_for()
    x = torch.randn(2, 8, 12)
    image = torch.zeros(2, 8, dtype=torch.bool)
    image[:, :3] = True
    stats = layer(x, modality=image).stats
    assert stats.by_modality["image"].tokens == 6 and stats.by_modality["text"].tokens == 10
    assert torch.equal(stats.by_modality["image"].kept + stats.by_modality["text"].kept, stats.kept)
    d = stats.as_dict()
    assert d["tokens"] == 16 and sum(d["tokens_per_expert"]) == 32 and "image" in d
    image_only = layer(x[image]).stats
    assert torch.equal(stats.by_modality["image"].kept, image_only.kept)


# ---------------------------------------------------------------------------------------------------- parity
def _mixtral(hidden, inter, experts, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock(MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                               num_experts_per_tok=k))


def _qwen2_moe(hidden, inter, experts, k):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, shared_expert_intermediate_size=inter + 3,
        num_experts=experts, num_experts_per_tok=k, norm_topk_prob=False))


def _deepseek_v3(hidden, inter, experts, k):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    return DeepseekV3MoE(DeepseekV3Config(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts, num_experts_per_tok=k,
        n_group=experts // 2, topk_group=2, n_shared_experts=2, norm_topk_prob=True, routed_scaling_factor=2.5))


@pytest.mark.parametrize("make", [_mixtral, _qwen2_moe, _deepseek_v3], ids=["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("sizes", [(16, 32, 4, 2), (37, 19, 6, 3)], ids=["tiny", "odd"])
def test_parity_with_transformers_blocks(make, sizes):
    torch.manual_seed(sum(sizes))
    block = make(*sizes)
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    for buf in block.buffers():
        buf.normal_(std=0.1)
    block.eval()
    hidden, k = sizes[0], sizes[3]
    x = torch.randn(3, 11, hidden)
    x_ref = x.clone().requires_grad_(True)
    ref = block(x_ref)
    ref.square().sum().backward()
    _, _, ref_idx = block.gate(x.view(-1, hidden))
    layer = from_transformers(block)
    for backend in DISPATCHERS.names():
        layer.set_backend(backend)
        xz = x.clone().requires_grad_(True)
        out = layer(xz)
        out.output.square().sum().backward()
        assert (out.output - ref).abs().max().item() <= 1e-5, backend
        assert torch.equal(out.routing.indices(k).sort(-1).values, ref_idx.sort(-1).values), backend
        torch.testing.assert_close(xz.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    back = to_transformers(layer)
    assert type(back) is type(block)
    with torch.no_grad():
        assert torch.equal(back(x), ref.detach())


def test_to_transformers_names_what_the_block_cannot_express():
    with pytest.raises(ValueError, match="^bigmac_rank: "):
        to_transformers(layer_for(bigmac_rank=4), kind="mixtral")
    with pytest.raises(ValueError, match="^shared_gate: "):
        to_transformers(layer_for(num_shared=1), kind="qwen2_moe")


def test_fused_weighted_swiglu_gradients():
    from zoo.moe.kernels import WeightedSwiGLU

    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(WeightedSwiGLU.apply, (h, w))


EXPERT_FORMS = {  # (form, activation, bias): the hand-written silu gradient and the autograd-per-expert one
    "swiglu_silu": ("swiglu", "silu", False), "swiglu_gelu_bias": ("swiglu", "gelu", True),
    "mlp_gelu_bias": ("mlp", "gelu_new", True),
}


def _segment_inputs(dtype, form, activation, bias, width_in=5, width_out=4):
    """A 3-expert bank with an empty middle expert and a token routed twice to the same expert."""
    from zoo.moe.kernels import expert_segments

    torch.manual_seed(7)
    experts = StackedExperts(3, width_out, 6, form, activation, bias).to(dtype)
    experts.w_in = nn.Parameter(torch.randn(3, width_in, experts.w_in.shape[2], dtype=dtype))  # in != out width
    x = torch.randn(6, width_in, dtype=dtype, requires_grad=True)
    token = torch.tensor([0, 2, 2, 5, 1, 3, 4, 0])
    gate = torch.rand(8, dtype=dtype, requires_grad=True)
    params = (experts.w_in, experts.b_in, experts.w_out, experts.b_out)

    def run(x, gate, *params):
        return expert_segments(x, token, gate, [3, 0, 5], *params, form, activation, experts.act_fn)
    return run, (x, gate, *params), experts, token, gate


@pytest.mark.parametrize("case", list(EXPERT_FORMS))
def test_expert_segments_gradcheck(case):
    run, inputs, *_ = _segment_inputs(torch.float64, *EXPERT_FORMS[case])
    assert torch.autograd.gradcheck(run, inputs)


def test_expert_blocks_trade_padding_against_block_count(monkeypatch):
    from zoo.moe import kernels

    monkeypatch.setattr(kernels, "BLOCK_COST_ROWS", 3)
    # [4, 5] [1, 1]: 10 + 2 padded rows + 2 blocks * 3 = 18, cheaper than one block (20 + 3) or [4] [5] [1, 1] (20)
    assert kernels.expert_blocks([4, 5, 1, 1], width=10) == [(0, 2, 5, 0), (2, 4, 1, 10)]
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 80)  # at most 8 padded rows of width 10 per block...
    assert kernels.expert_blocks([4, 5, 1, 1], width=10) == [(0, 1, 4, 0), (1, 2, 5, 4), (2, 4, 1, 9)]
    assert kernels.expert_blocks([9, 0], width=10) == [(0, 1, 9, 0), (1, 2, 0, 9)]  # ...unless one expert needs more
    monkeypatch.setattr(kernels, "BLOCK_COST_ROWS", 0)  # blocks are free: no padding at all
    assert kernels.expert_blocks([2, 0, 3], width=10) == [(0, 1, 2, 0), (1, 2, 0, 2), (2, 3, 3, 2)]


def test_block_layout_pads_each_expert_to_the_block_capacity(monkeypatch):
    from zoo.moe import kernels

    monkeypatch.setattr(kernels, "BLOCK_COST_ROWS", 100)
    layout = kernels.BlockLayout.build([2, 0, 3, 1], torch.arange(6) + 10, torch.arange(6.0) + 1, width=4)
    assert layout.blocks == [(0, 4, 3, 0)] and layout.rows == 12
    assert layout.slot_row.tolist() == [0, 1, 6, 7, 8, 9]
    assert layout.token.tolist() == [10, 11, 0, 0, 0, 0, 12, 13, 14, 15, 0, 0]
    assert layout.gate.tolist() == [1, 2, 0, 0, 0, 0, 3, 4, 5, 6, 0, 0]
    assert layout.padding.tolist() == [2, 3, 4, 5, 10, 11] and layout.padding_spans == [(0, 6)]


@pytest.mark.parametrize("case", list(EXPERT_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["expert_per_block", "one_padded_block"])
def test_expert_segments_match_the_per_expert_oracle(case, dtype, blocks, monkeypatch):
    """Outputs and all gradients against the loop oracle's per-expert math, with an empty expert, in fp32 and bf16,
    one expert per block and all in one block (padding rows included)."""
    from zoo.moe import kernels

    monkeypatch.setattr(kernels, "BLOCK_COST_ROWS", 0 if blocks == "expert_per_block" else 1000)
    run, inputs, experts, token, gate = _segment_inputs(dtype, *EXPERT_FORMS[case])
    x = inputs[0]
    params = [t for t in inputs[2:] if t is not None]
    y = run(*inputs)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, gate, *params], g)
    ref = torch.zeros_like(y)
    expert = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])
    for s in range(8):
        ref = ref.index_add(0, token[s:s + 1], experts.forward_expert(int(expert[s]), x[token[s:s + 1]]) * gate[s])
    ref_grads = torch.autograd.grad(ref, [x, gate, *params], g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
    assert torch.all(grads[2][1] == 0), "the empty expert's input weights get a zero gradient"
    with torch.no_grad():  # inference keeps no pre-activations: same outputs
        assert torch.equal(run(*inputs), y.detach())


def test_second_expert_sampling_always_samples_in_eval_too_as_moe_llavas_deepspeed_did():
    x = torch.randn(64, 12)
    layer = layer_for(router_init_std=0.05, second_expert_sampling="always").eval()
    torch.manual_seed(0)
    a = layer(x).routing.indices(2)
    torch.manual_seed(1)
    b = layer(x).routing.indices(2)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])  # first choice argmax, second noisy
    assert torch.equal(a[:, 0], layer_for(router_init_std=0.05).eval()(x).routing.indices(2)[:, 0])
    with pytest.raises(ConfigError, match=r"second_expert_sampling: expected bool \| 'always'"):
        from_dict(MoEConfig, {"second_expert_sampling": "sometimes"})
