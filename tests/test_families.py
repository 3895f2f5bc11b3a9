"""Transformers-native models (zoo.families): for each of the six families the zoo model equals the transformers
class on the same weights (logits on images and text within 1e-5 in fp32, identical greedy generations), writes a
checkpoint the transformers class loads back bitwise, and reports its routing per layer and modality."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomise

import zoo
from zoo.families import FamilyFFN, FamilyModel
from zoo.moe import MoELayer
from zoo.moe.modality import ModalitySeparatedMoE

TWINS = {"qwen3_vl_moe": "qwen3-vl-30b-a3b-tiny", "glm4v_moe": "glm-4.5v-tiny", "llama4": "llama-4-scout-17b-16e-tiny",
         "aria": "aria-tiny", "ernie4_5_vl_moe": "ernie-4.5-vl-28b-a3b-tiny", "qwen3_omni_moe": "qwen3-omni-30b-a3b-tiny"}
QUESTIONS = ["what color is the shape?", "is there a blue circle in the image?"]


@pytest.fixture(scope="module")
def images(easy_vqa):
    return easy_vqa["test"].images[:2]


def _reference_and_zoo(name: str):
    """A transformers model with random weights (selection biases and routers made uneven) and the zoo model made
    from a copy of it, sharing the twin's tiny processor."""
    torch.manual_seed(0)
    built = zoo.build(name)
    reference = type(built.hf)._from_config(built.hf.config).eval()
    randomise(reference, "e_score_correction_bias", std=0.05, seed=1)
    with torch.no_grad():
        for module_name, module in reference.named_modules():
            if module_name.endswith((".gate", ".router")) and hasattr(module, "weight"):
                module.weight.normal_(std=0.5)
    return reference, FamilyModel(copy.deepcopy(reference), built.processor, built.config).eval()


@pytest.mark.parametrize("model_type", list(TWINS))
def test_family_equals_transformers_and_round_trips(model_type, images, tmp_path):
    reference, model = _reference_and_zoo(TWINS[model_type])
    blocks = [ffn for _, ffn in model.named_sparse_blocks()]
    assert blocks and all(isinstance(f.moe, ModalitySeparatedMoE if model_type == "ernie4_5_vl_moe" else MoELayer)
                          for f in blocks)
    assert not any(type(m).__name__.endswith(("SparseMoeBlock", "TextMoE", "MoELayer", "TextMoe", "MoeBlock"))
                   for m in model.modules() if not isinstance(m, (FamilyFFN, MoELayer, ModalitySeparatedMoE)))
    generator = reference.thinker if model_type == "qwen3_omni_moe" else reference
    inputs = model.prompt_inputs(images, QUESTIONS)  # left padding: the shorter prompt is padded
    real = inputs["attention_mask"].bool()
    assert not real.all()
    with torch.no_grad():
        expected = generator(**inputs).logits
        out = model(**inputs)
    assert (out.logits - expected)[real].abs().max().item() <= 1e-5
    greedy = generator.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(6, **inputs), greedy[:, inputs["input_ids"].shape[1]:])
    # routing statistics per layer and modality: image and text tokens add up to the real tokens
    visual = out.image_mask & real
    for layer, stats in out.routing_stats.items():
        assert stats.by_modality["image"].tokens == int(visual.sum()) > 0, layer
        assert stats.by_modality["text"].tokens == int((real & ~visual).sum()), layer
    # save -> the transformers class loads the same tensors; zoo.load gives the same logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    loaded = type(reference).from_pretrained(tmp_path)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = zoo.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out.logits)
    assert again.answer(images, QUESTIONS, max_new_tokens=3) == model.answer(images, QUESTIONS, max_new_tokens=3)
