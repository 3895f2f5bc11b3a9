"""Training transformers-native models with the zoo's recipes: the tiny Qwen3-VL-MoE recipe tunes only experts and
routers (tensor by tensor), the loss falls, the routing figure is written and the export (a transformers checkpoint)
answers as the trained model; routers alone and LoRA experts train the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.train.recipe import build_model, build_source, load_recipe, run_recipe, set_trainable

RECIPE = Path(__file__).parent.parent / "configs" / "recipes" / "qwen3-vl-moe-tiny.yaml"
QUICK = ["stages.0.train.steps=16", "stages.0.train.batch_size=8", "data.easy-vqa.limit=400"]


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}


def test_qwen3_vl_moe_recipe_tunes_only_experts_and_routers(tmp_path, easy_vqa):
    recipe = load_recipe(RECIPE, QUICK)
    torch.manual_seed(recipe.seed)  # run_recipe seeds the same way before it builds the model
    before = {n: p.clone() for n, p in build_model(recipe).state_dict().items()}
    model = run_recipe(recipe, tmp_path / "run", progress=False)
    changed = _changed(before, model)
    assert changed and all(".experts." in n or ".router." in n for n in changed), changed
    assert {n for n in before if n.endswith("router.weight")} <= changed  # every layer's router moved
    stage = tmp_path / "run" / "00-experts"
    info = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["experts"]
    assert info["loss_last_fifth"] < info["loss_first_fifth"]
    assert {"lm.layers.0 image", "lm.layers.0 text", "lm.layers.1 image"} <= set(info["routing"])
    assert (stage / "routing.png").stat().st_size > 0
    exported = zoo.load(stage / "model")
    assert json.loads((stage / "model" / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    test = easy_vqa["test"]
    images, questions = [test.images[s.image] for s in test.samples[:6]], [s.question for s in test.samples[:6]]
    assert exported.answer(images, questions, max_new_tokens=3) == model.answer(images, questions, max_new_tokens=3)


@pytest.mark.parametrize("mode", ["routers", "lora_experts"])
def test_routers_alone_or_lora_experts_train_on_a_family_model(mode, tmp_path):
    from zoo.train import TrainConfig, fit
    from zoo.train.data import SkipCounter
    from zoo.train.family_data import FamilyConversationStream

    recipe = load_recipe(RECIPE, QUICK)
    torch.manual_seed(0)
    model = zoo.build(recipe.model)
    if mode == "lora_experts":  # LoRA experts on the attention projections (MixLoRA), the base frozen
        wrapped = model.add_lora({"mode": "moe", "targets": ["q_proj", "v_proj"], "n_experts": 4, "rank_per_expert": 2,
                                  "top_k": 2})
        assert len(wrapped) == 4
        set_trainable(model, ["lm.*.lora_*", "lm.*.self_attn.*.router.*"])
    else:
        set_trainable(model, ["lm.*.mlp.moe.router.*"])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    source = build_source(recipe.data["easy-vqa"], SkipCounter())
    stream = FamilyConversationStream(model, [source], epochs=10)
    fit(model, stream, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_ratio=0.0,
                                   gradient_checkpointing=mode == "routers"), progress=False)
    changed = _changed(before, model)
    if mode == "routers":
        assert changed == {n for n in before if n.endswith("mlp.moe.router.weight")}
        return
    assert changed and all("lora_" in n or ".router." in n for n in changed), changed
    model.eval()
    inputs = model.prompt_inputs([source[0].images[0]], ["what shape is it?"])
    out = model(**inputs)
    assert any(k.startswith("lm.lora.") for k in out.routing_stats)  # the LoRA experts' routing, beside the MoE's
    model.save_pretrained(tmp_path)  # zoo structure on a transformers checkpoint: the config records it
    again = zoo.load(tmp_path)
    assert again.config.lm.lora.mode == "moe"
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out.logits)
