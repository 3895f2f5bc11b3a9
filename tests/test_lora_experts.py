"""LoRA experts on the LM (zoo.lm.lora): zero init in every mode, parity with peft, the SMoRA unification identities,
top-k sparsity of gates and gradients, aux-loss-free bias balancing, task adapters and merging, the Switch loss with
padding, a training step, config errors. Tiny Llama models built from configs; no network."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import randomise
from torch import nn

from zoo.config import ConfigError, LoRAExpertConfig, from_dict
from zoo.lm.lora import (
    LoRAExpertLinear,
    apply_lora_experts,
    apply_peft_lora,
    gather_lora_aux_losses,
    gather_lora_routing_stats,
    lora_context,
    lora_modules,
    merge_lora,
    set_lora_task,
    unmerge_lora,
    update_lora_biases,
)

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)
TASKS = ["extract", "update", "answer"]


@pytest.fixture(scope="module")
def base_lm():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _ids(batch=3, length=9):
    return torch.randint(0, LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


def _with_lora(lm, **cfg):
    model = copy.deepcopy(lm)
    layers = apply_lora_experts(model, LoRAExpertConfig(**cfg))
    return model.eval(), layers


def _randomize_b(model, std=0.2, seed=2):
    """Give every LoRA B factor (zero at init) random values so the adapters change the output."""
    randomise(model, "lora_B", std, seed)


def _layer(mode, d_in=16, d_out=12, seed=0, **cfg) -> LoRAExpertLinear:
    torch.manual_seed(seed)
    layer = LoRAExpertLinear(nn.Linear(d_in, d_out), LoRAExpertConfig(mode=mode, **cfg))
    _randomize_b(layer, seed=seed + 1)
    return layer


@pytest.mark.parametrize("cfg", [
    dict(mode="single"),
    dict(mode="moe", n_experts=4, rank_per_expert=4, top_k=2),
    dict(mode="moe", n_experts=4, rank_per_expert=4, dense_soft=True),
    dict(mode="rank_moe", total_rank=16, active_ranks=4, balance="bias"),
    dict(mode="task", task_names=TASKS),
], ids=["single", "moe", "dense_soft", "rank_moe", "task"])
def test_every_mode_starts_at_the_base_logits(base_lm, cfg):
    model, layers = _with_lora(base_lm, **cfg)
    assert len(layers) == 10 and all(isinstance(m, LoRAExpertLinear) for m in layers.values())
    renamed = {f"{name}.weight": f"{name}.base.weight" for name in layers}  # wrapped weights move under .base
    assert {renamed.get(k, k) for k in base_lm.state_dict()} <= set(model.state_dict())
    ids = _ids()
    padding = torch.ones_like(ids, dtype=torch.bool)
    padding[0, -3:] = False
    tags = torch.tensor([2, 0, 1]) if cfg["mode"] == "task" else None
    with torch.no_grad(), lora_context(model, padding=padding, task=tags):
        out = model(ids).logits
    assert torch.equal(out, base_lm(ids).logits)


@pytest.mark.parametrize("cfg", [dict(mode="moe", n_experts=1, top_k=1, rank_per_expert=4), dict(mode="single", rank=4)],
                         ids=["moe-one-expert", "single"])
def test_one_expert_equals_peft_lora(base_lm, cfg):
    """One expert routed with gate 1 (softmax over one logit) is peft's LoRA with the same factors."""
    targets = ["q_proj", "v_proj", "gate_proj"]
    ours, layers = _with_lora(base_lm, targets=targets, alpha=8.0, **cfg)
    _randomize_b(ours)
    theirs = apply_peft_lora(copy.deepcopy(base_lm), LoRAExpertConfig(targets=targets, rank=4, alpha=8.0)).eval()
    peft_layers = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A.reshape(4, -1))
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B.reshape(-1, 4))
        ids = _ids()
        out, ref, base = ours(ids).logits, theirs(ids).logits, base_lm(ids).logits
    assert (out - base).abs().max().item() > 1e-3  # the adapters are live
    assert (out - ref).abs().max().item() <= 1e-6


def test_experts_with_gates_are_one_lora_with_repeated_rank_gates():
    """Unification: sum_i g_i s B_i A_i x == s B diag(repeat(g, r_e)) A x with A, B the stacked factors."""
    n, r = 4, 3
    layer = _layer("moe", n_experts=n, rank_per_expert=r, top_k=2)
    x = torch.randn(7, 16)
    gates = torch.rand(7, n)
    with torch.no_grad():
        out = layer.delta(x, gates)
        a, b = layer.lora_A, layer.lora_B
        loop = sum(gates[:, i:i + 1] * layer.scaling * (x @ a[i].T @ b[i].T) for i in range(n))
        a_flat, b_flat = torch.cat(list(a), 0), torch.cat(list(b), 1)  # [N r, d_in], [d_out, N r]
        unified = layer.scaling * F.linear(F.linear(x, a_flat) * gates.repeat_interleave(r, dim=-1), b_flat)
        # the forward uses the router's top-2 gates: W0 x + the same sum over the chosen experts
        routed, _, _ = layer.router(x)
        forward = layer(x)
        expected = layer.base(x) + sum(routed[:, i:i + 1] * layer.scaling * (x @ a[i].T @ b[i].T) for i in range(n))
    assert (out - loop).abs().max().item() <= 1e-6
    assert (out - unified).abs().max().item() <= 1e-6
    assert ((routed > 0).sum(-1) == 2).all()
    assert (forward - expected).abs().max().item() <= 1e-6


def test_smora_with_every_rank_and_unit_gates_is_plain_lora(base_lm):
    smora, smora_layers = _with_lora(base_lm, mode="rank_moe", total_rank=8, active_ranks=8, gate="ones")
    lora, lora_layers = _with_lora(base_lm, mode="single", rank=8)
    _randomize_b(smora)
    with torch.no_grad():
        for name, layer in smora_layers.items():
            lora_layers[name].lora_A.copy_(layer.lora_A)
            lora_layers[name].lora_B.copy_(layer.lora_B)
        ids = _ids()
        out, ref = smora(ids).logits, lora(ids).logits
    assert (out - base_lm(ids).logits).abs().max().item() > 1e-3
    assert (out - ref).abs().max().item() <= 1e-6


def test_smora_activates_k_ranks_and_only_they_get_gradients():
    k = 3
    layer = _layer("rank_moe", total_rank=8, active_ranks=k)
    gates, chosen, probs = layer.router(torch.randn(20, 16))
    assert ((gates != 0).sum(-1) == k).all()
    assert torch.equal((gates != 0), torch.zeros_like(gates, dtype=torch.bool).scatter(1, chosen, True))
    assert torch.allclose(gates.sum(-1), torch.ones(20))  # softmax over the chosen ranks
    x = torch.randn(1, 16)
    layer(x).square().sum().backward()
    selected = set(layer.router(x)[1][0].tolist())
    assert set(torch.nonzero(layer.lora_B.grad.abs().sum(0)).flatten().tolist()) == selected  # columns of B
    assert set(torch.nonzero(layer.lora_A.grad.abs().sum(1)).flatten().tolist()) == selected  # rows of A
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_bias_balancing_equalises_rank_load_without_changing_gates():
    layer = _layer("rank_moe", total_rank=8, active_ranks=2, balance="bias")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=gen)
    x[:, 0] = 1.0  # a constant feature the router reads as "rank 0"
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(8, 16, generator=gen) * 0.3)
        layer.router.weight[0, 0] = 3.0
        layer(x)
    first = layer.update_bias(1e-2)
    assert first[0] > 0.9 * 256 and first.max() / first.min().clamp_min(1) > 5  # nearly every token takes rank 0
    for _ in range(500):
        with torch.no_grad():
            layer(x)
        load = layer.update_bias(1e-2)
    assert load.sum() == 256 * 2 and load.max() / load.min() < 1.5
    assert layer.router.bias[0] < 0 and layer.router.load.sum() == 0

    layer.eval()
    with torch.no_grad():
        gates_b, chosen_b, _ = layer.router(x)
        bias = layer.router.bias.clone()
        layer.router.bias.zero_()
        gates_0, chosen_0, _ = layer.router(x)
        layer.router.bias.copy_(bias)
    same = (chosen_b.sort(-1).values == chosen_0.sort(-1).values).all(-1)
    assert 0 < same.sum() < 256  # b moved some selections, and some tokens keep theirs
    assert torch.equal(gates_b[same], gates_0[same])


def test_update_lora_biases_steps_only_bias_balanced_layers(base_lm):
    model, layers = _with_lora(base_lm, mode="rank_moe", total_rank=8, active_ranks=2, balance="bias",
                               targets=["q_proj"])
    model.train()
    with torch.no_grad():
        model(_ids())
    assert update_lora_biases(model, gamma=0.5) == 2
    assert all(m.router.bias.abs().max() == 0.5 for m in layers.values())
    aux_model, _ = _with_lora(base_lm, mode="moe", n_experts=4, rank_per_expert=2, balance="aux")
    assert update_lora_biases(aux_model) == 0


def test_task_adapters_switch_tag_merge_and_unmerge(base_lm):
    model, layers = _with_lora(base_lm, mode="task", task_names=TASKS, targets=["q_proj", "v_proj", "down_proj"])
    _randomize_b(model)
    ids = _ids()
    outs = {}
    with torch.no_grad():
        for task in TASKS:
            set_lora_task(model, task)
            outs[task] = model(ids).logits
        assert (outs["extract"] - outs["update"]).abs().max().item() > 1e-3
        tags = ["update", "answer", "extract"]
        with lora_context(model, task=tags):
            tagged = model(ids).logits
        with lora_context(model, task=torch.tensor([TASKS.index(t) for t in tags])):
            assert torch.equal(model(ids).logits, tagged)
    for i, task in enumerate(tags):
        assert (tagged[i] - outs[task][i]).abs().max().item() <= 1e-5

    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        set_lora_task(model, "summarize")
    with pytest.raises(ValueError, match="do not match the batch"), lora_context(model, task=[0, 1]):
        model(ids)

    set_lora_task(model, "update")
    w0 = {n: m.base.weight.clone() for n, m in layers.items()}
    assert merge_lora(model) == len(layers)
    assert all(not torch.equal(m.base.weight, w0[n]) for n, m in layers.items())
    with torch.no_grad():
        merged = model(ids).logits
    assert (merged - outs["update"]).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="unmerge"):
        set_lora_task(model, "answer")
    unmerge_lora(model)
    assert all(torch.equal(m.base.weight, w0[n]) for n, m in layers.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, outs["update"])

    routed, _ = _with_lora(base_lm, mode="moe", n_experts=2, top_k=1, targets=["q_proj"])
    with pytest.raises(RuntimeError, match="cannot be merged"):
        merge_lora(routed)


def test_switch_balance_on_a_hand_computed_case_with_padding():
    layer = _layer("moe", d_in=4, d_out=4, n_experts=2, rank_per_expert=2, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(5, 4))
    assert layer.last_aux["lora_balance"].item() == pytest.approx(1.0, abs=1e-6)  # uniform probabilities

    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2, 4))
    a, b = [math.log(3), 0, 0, 0], [0, math.log(3), 0, 0]  # probs (3/4, 1/4) and (1/4, 3/4)
    x = torch.tensor([[a, a, b, b]])
    layer.context.padding = torch.tensor([[True, True, True, False]])  # the last token is padding
    out = layer(x)
    # F = (2/3, 1/3), P = (1.75/3, 1.25/3): 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9
    assert layer.last_aux["lora_balance"].item() == pytest.approx(9.5 / 9, abs=1e-6)
    assert layer.last_stats.tokens == 3 and layer.last_stats.kept.tolist() == [2, 1]
    assert torch.equal(out[0, 3], layer.base(x)[0, 3])  # padding gets W0 x only
    assert (out[0, 2] - layer.base(x)[0, 2]).abs().max() > 1e-4


def test_moe_training_step_lowers_the_loss_and_trains_every_router(base_lm):
    torch.manual_seed(4)
    cfg = dict(mode="moe", n_experts=4, rank_per_expert=4, top_k=2, targets=["q_proj", "v_proj", "gate_proj"])
    model, layers = _with_lora(base_lm, **cfg)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(frozen) == len(list(base_lm.parameters()))
    assert sum(p.numel() for p in trainable) == sum(m.lora_A.numel() + m.lora_B.numel() + m.router.weight.numel()
                                                   for m in layers.values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids(batch=4, length=16)
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids)
        aux = gather_lora_aux_losses(model)
        per_layer = torch.stack([m.last_aux["lora_balance"] for m in layers.values()])
        assert torch.equal(aux["lora_balance"], per_layer.mean())
        optimizer.zero_grad()
        (out.loss + 0.01 * aux["lora_balance"]).backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(m.router.weight.grad.abs().sum() > 0 for m in layers.values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    stats = gather_lora_routing_stats(model)
    assert set(stats) == set(layers) and all(s.kept.sum() == 4 * 16 * 2 for s in stats.values())


@pytest.mark.parametrize("fields, message", [
    (dict(mode="moe", n_experts=2, top_k=3), "lm.lora.top_k: 3 > n_experts 2"),
    (dict(mode="rank_moe", total_rank=8, active_ranks=9), "lm.lora.active_ranks: 9 > total_rank 8"),
    (dict(mode="mixture"), "lm.lora.mode: expected one of"),
    (dict(mode="task"), "lm.lora.task_names:"),
    (dict(mode="task", task_names=["a", "a"]), "lm.lora.task_names: duplicate"),
    (dict(rank=0), "lm.lora.rank: must be >= 1"),
    (dict(mode="moe", dense_soft=True, balance="bias"), "lm.lora.balance:"),
    (dict(ranks=4), "unknown key 'lm.lora.ranks'; did you mean 'lm.lora.rank'?"),
], ids=["top_k", "active_ranks", "mode", "task_names", "duplicate_tasks", "rank", "bias_dense", "typo"])
def test_bad_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError) as error:
        from_dict(LoRAExpertConfig, fields, path="lm.lora")
    assert str(error.value).startswith(message)


def test_build_errors_name_the_target_or_mode(base_lm):
    with pytest.raises(ConfigError, match="mode: unknown LoRA mode 'mixture'"):
        LoRAExpertConfig(mode="mixture")
    with pytest.raises(ConfigError, match="^top_k: 3 > n_experts 2$"):
        LoRAExpertConfig(mode="moe", n_experts=2, top_k=3)
    model = copy.deepcopy(base_lm)
    with pytest.raises(ConfigError, match="lm.lora.targets: 'qkv_proj' matches no nn.Linear"):
        apply_lora_experts(model, {"targets": ["q_proj", "qkv_proj"]})
    assert not lora_modules(model)
    apply_lora_experts(model, {"targets": ["q_proj"]})
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora_experts(model, {"targets": ["v_proj"]})
    with pytest.raises(ConfigError, match="lm.lora.mode: peft gives a plain LoRA"):
        apply_peft_lora(copy.deepcopy(base_lm), LoRAExpertConfig(mode="moe"))
