"""LoRA experts inside a ZooModel (``lm.lora``): built from the config, trained, saved and reloaded; padding and task
tags reach the layers; the routed modes' aux loss enters the loss with ``aux_coef``; merged layers save unmerged;
bias balancing runs after optimiser steps; parameter counts. Tiny models from the catalogue's tiny-llava."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from test_lora_experts import _randomize_b

import zoo
from zoo.config import ConfigError, LoRAExpertConfig, from_dict
from zoo.lm.lora import LoRAExpertLinear, lora_modules
from zoo.params import param_counts

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _model(seed=0, **lora):
    torch.manual_seed(seed)
    config = tiny_config()
    config.lm.lora = from_dict(LoRAExpertConfig, {"targets": TARGETS, **lora}, path="lm.lora")
    return zoo.build(config)


@pytest.fixture(scope="module")
def small_split(easy_vqa):
    """The first 200 training questions with only the images they ask about (tiny-llava models all share the
    tokenizer trained on easy-vqa, so their encoded batches are interchangeable)."""
    from zoo.train import VQASample, VQASplit

    split = easy_vqa["train"]
    samples = split.samples[:200]
    images = sorted({s.image for s in samples})
    index = {old: new for new, old in enumerate(images)}
    return VQASplit([split.images[i] for i in images],
                    [VQASample(index[s.image], s.question, s.answer, s.id) for s in samples])


def _batch(model, split, n=6):
    from zoo.train import VQATrainingSet

    data = VQATrainingSet(model, split)
    return data.collate([data[i] for i in range(n)])


def _dense_twin(model):
    """The same model without LoRA, carrying the LoRA model's base weights."""
    torch.manual_seed(0)
    dense = zoo.build(tiny_config())
    base = {k.replace(".base.", ".").replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if "lora_" not in k and ".router." not in k}
    dense.load_state_dict(base)
    return dense.eval()


@pytest.mark.parametrize("lora", [
    {"mode": "single"},
    {"mode": "single", "backend": "zoo"},
    {"mode": "moe", "n_experts": 4, "rank_per_expert": 2, "top_k": 2},
    {"mode": "rank_moe", "total_rank": 8, "active_ranks": 2, "balance": "bias"},
    {"mode": "task", "task_names": ["answer", "route"]},
], ids=["peft", "zoo-single", "moe", "rank_moe", "task"])
def test_lora_model_starts_at_the_dense_logits_trains_only_lora_and_reloads(lora, small_split, tmp_path):
    model = _model(**lora).eval()
    batch = _batch(model, small_split)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _dense_twin(model)(**batch).logits)  # B = 0 at the start
    trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".router." in n for n in trainable)
    assert all(p.requires_grad for p in model.connector.parameters())  # only the LM's base is frozen
    _randomize_b(model)
    with torch.no_grad():
        logits = model(**batch).logits
    assert not torch.allclose(logits, _dense_twin(model)(**batch).logits, atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = zoo.load(tmp_path / "m")
    assert again.config.lm.lora == model.config.lm.lora
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)


def test_routed_lora_aux_loss_enters_the_loss_and_stats_skip_padding(small_split):
    model = _model(mode="moe", n_experts=4, rank_per_expert=2, top_k=2, aux_coef=0.5).eval()
    batch = _batch(model, small_split)
    with torch.no_grad():
        out = model(**batch)
    aux = out.aux_losses["lm.lora_balance"]
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * aux)
    real_tokens = int(out.attention_mask.sum())
    assert real_tokens < out.attention_mask.numel()  # the batch has padding
    stats = {k: v for k, v in out.routing_stats.items() if k.startswith("lm.lora.")}
    assert len(stats) == 2 * len(TARGETS)  # 2 layers x 3 targets
    for s in stats.values():
        assert s.tokens == real_tokens and int(s.assigned.sum()) == 2 * real_tokens


def test_task_tags_pick_each_samples_adapter(small_split):
    model = _model(mode="task", task_names=["answer", "route"]).eval()
    _randomize_b(model)
    batch = _batch(model, small_split, n=4)
    with torch.no_grad():
        mixed = model(**batch, task=["answer", "route", "route", "answer"]).logits
        for name, rows in (("answer", [0, 3]), ("route", [1, 2])):
            for layer in lora_modules(model).values():
                layer.set_active(name)
            alone = model(**batch).logits
            assert torch.allclose(mixed[rows], alone[rows], atol=1e-6)
            assert not torch.allclose(mixed, alone, atol=1e-4)
    with pytest.raises(ValueError, match="task tags of shape"):
        model(**batch, task=["answer"])
    dense = zoo.build(tiny_config())
    with pytest.raises(ValueError, match="lm.lora.mode: task"):
        dense(**_batch(dense, small_split, n=2), task=["answer", "route"])


def test_merged_model_answers_alike_and_saves_unmerged(small_split, tmp_path):
    model = _model(mode="single", backend="zoo").eval()
    _randomize_b(model)
    batch = _batch(model, small_split)
    with torch.no_grad():
        before = model(**batch).logits
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.merge_lora() == 2 * len(TARGETS)
        assert torch.allclose(model(**batch).logits, before, atol=1e-5)
        model.save_pretrained(tmp_path / "m")  # while merged
        assert all(layer.merged for layer in lora_modules(model).values())
        model.unmerge_lora()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert torch.equal(zoo.load(tmp_path / "m")(**batch).logits, before)


def test_training_moves_lora_and_bias_balancing_runs_after_each_step(small_split):
    from zoo.train import TrainConfig, VQATrainingSet, fit

    model = _model(mode="rank_moe", total_rank=8, active_ranks=2, balance="bias", bias_gamma=0.01)
    data = VQATrainingSet(model, small_split)
    batch = data.collate([data[i] for i in range(32)])
    frozen = {k: v.clone() for k, v in model.lm.state_dict().items() if "lora_" not in k and "router" not in k}
    with torch.no_grad():
        before = model(**batch).loss.item()
    fit(model, data, TrainConfig(steps=12, batch_size=16, lr=1e-2), progress=False)
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    assert after < before
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in frozen.items())  # the base LM never moved
    biases = [m.router.bias for m in lora_modules(model).values()]
    assert all(b.abs().sum() > 0 for b in biases)  # every router's bias stepped (12 steps of +-0.01 each)
    assert all(torch.allclose(b.abs(), torch.full_like(b, 0.01) * b.abs().div(0.01).round()) for b in biases)


def test_active_parameters_count_the_chosen_share():
    model = _model(mode="moe", n_experts=4, rank_per_expert=2, top_k=1)
    counts = param_counts(model)
    layers = list(lora_modules(model).values())
    factors = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    lm_total, lm_active = counts.parts["lm"]
    assert lm_total - lm_active == factors * 3 // 4  # 3 of 4 experts idle per token
    dense = param_counts(zoo.build(tiny_config()))
    routers = sum(layer.router.weight.numel() for layer in layers)
    assert lm_total == dense.parts["lm"][0] + factors + routers


def test_lora_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="lm.lora.backend: peft gives a plain LoRA"):
        from_dict(LoRAExpertConfig, {"mode": "moe", "backend": "peft"}, path="lm.lora")
    config = tiny_config()
    config.lm.lora = LoRAExpertConfig(targets=["q_prj"])
    with pytest.raises(ConfigError, match="lm.lora.targets: 'q_prj' matches no nn.Linear"):
        zoo.build(config)
    model = _model(mode="moe", n_experts=2, top_k=1)
    with pytest.raises(ValueError, match="lm.lora: the model already has LoRA layers"):
        model.add_lora({"mode": "single"})
    with pytest.raises(RuntimeError, match="input-dependent gates"):
        model.merge_lora()


def test_add_lora_at_a_stage_boundary_is_recorded(tmp_path):
    torch.manual_seed(0)
    model = zoo.build(tiny_config())
    names = model.add_lora({"targets": ["q_proj"], "mode": "moe", "n_experts": 2, "top_k": 1})
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert isinstance(model.lm.get_submodule(names[0]), LoRAExpertLinear)
    model.save_pretrained(tmp_path / "m")
    assert copy.deepcopy(zoo.load(tmp_path / "m").config.lm.lora) == model.config.lm.lora
