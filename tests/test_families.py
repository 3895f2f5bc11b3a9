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
    # save (into a hub cache snapshot) -> the transformers class loads the same tensors; zoo.load of the hub id,
    # offline, gives the same logits and answers
    repo = tmp_path / "hub" / f"models--zoo-test--{model_type}"
    checkpoint = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(checkpoint)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == model_type
    loaded = type(reference).from_pretrained(checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = zoo.load(f"zoo-test/{model_type}", cache_dir=tmp_path / "hub")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out.logits)
    assert torch.equal(again.generate(**inputs, max_new_tokens=6), greedy[:, inputs["input_ids"].shape[1]:])


def test_routing_by_modality_through_zoo_analyze(images, tmp_path):
    """`zoo analyze routing` on a transformers-native model: per layer, the image-token and text-token loads add up
    to the layer's slots (top-k per real token), the image tokens are the processor's image placeholders, and the
    heatmaps and tables are written."""
    from zoo.analyze import analyze_routing

    torch.manual_seed(0)
    model = zoo.build(TWINS["qwen3_vl_moe"]).eval()
    rows = analyze_routing(model, ["easy-vqa"], limit=6, batch_size=3, out_dir=tmp_path)["easy-vqa"]
    by = {(r["layer"], r["modality"]): r for r in rows}
    assert {layer for layer, _ in by} == {"lm.layers.0", "lm.layers.1"}
    for layer in ("lm.layers.0", "lm.layers.1"):
        image, text, every = by[layer, "image"], by[layer, "text"], by[layer, "all"]
        assert image["tokens"] == 6 * 4  # six 64-pixel images, 2 x 2 merged patches each
        assert image["tokens"] + text["tokens"] == every["tokens"]
        assert abs(sum(image["load"]) - 1) < 1e-9 and abs(sum(text["load"]) - 1) < 1e-9
    assert (tmp_path / "routing-easy-vqa.png").stat().st_size > 0 and "lm.layers.1" in (tmp_path / "routing.md").read_text()
    # the same statistics a forward carries (ZooOutput.routing_stats): each modality's slots are top-2 of its tokens
    out = model(**model.prompt_inputs(images, QUESTIONS))
    for stats in out.routing_stats.values():
        for part in stats.by_modality.values():
            assert int(part.kept.sum()) == 2 * part.tokens
        assert torch.equal(stats.by_modality["image"].kept + stats.by_modality["text"].kept, stats.kept)


def test_eval_harness_answers_through_the_processor_and_chat_template(tmp_path):
    """The harness's predictions are transformers' own greedy generations on the same weights, prompted by the
    model's chat template through its processor (batched, left padding)."""
    from zoo.eval import evaluate
    from zoo.eval.harness import get_benchmark

    reference, model = _reference_and_zoo(TWINS["glm4v_moe"])
    results = evaluate(model, "easy-vqa", limit=4, batch_size=2, out_dir=tmp_path, progress=False)
    assert results["benchmarks"]["easy-vqa"]["questions"] == 4
    predictions = [json.loads(line)["text"] for line in
                   (tmp_path / "easy-vqa" / "predictions.jsonl").read_text().splitlines()]
    samples, processor = get_benchmark("easy-vqa").load(4), model.processor
    expected = []
    for pair in (samples[:2], samples[2:]):
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": s.question}]}], add_generation_prompt=True, tokenize=False)
            for s in pair]
        inputs = processor(text=texts, images=[s.load_image() for s in pair], padding=True, padding_side="left",
                           return_tensors="pt")
        new = reference.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        expected += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    assert predictions == expected


def _dense_config(model_type: str) -> zoo.ModelConfig:
    """A tiny dense base (qwen3_vl, glm4v): the MoE twin's config without its experts."""
    moe = {"qwen3_vl": TWINS["qwen3_vl_moe"], "glm4v": TWINS["glm4v_moe"]}[model_type]
    data = zoo.get_config(moe).to_dict()
    data.update(name=f"{model_type}-tiny", family=model_type)
    transformers_config = data["transformers"]["config"]
    transformers_config["model_type"] = model_type
    text = transformers_config["text_config"]
    for key in [k for k in text if "expert" in k or k in ("moe_intermediate_size", "router_aux_loss_coef", "n_group",
                                                           "topk_group", "first_k_dense_replace")]:
        text.pop(key)
    return zoo.ModelConfig.from_dict(data)


@pytest.mark.parametrize("model_type", ["qwen3_vl", "glm4v"])
def test_upcycling_a_dense_base_with_a_zoo_policy(model_type, images, tmp_path):
    """A dense Qwen3-VL / GLM-4V upcycled by MoE-LLaVA's policy (dropless here) gives the dense model's logits,
    routes by modality, and its checkpoint (the base's transformers layout plus the policy) reloads exactly."""
    torch.manual_seed(0)
    model = zoo.build(_dense_config(model_type)).eval()
    inputs = model.prompt_inputs(images, QUESTIONS)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**inputs).logits
    policy = {"preset": "moe-llava", "layers": "all", "moe": {"capacity_factor": None, "eval_capacity_factor": None}}
    assert model.sparsify(policy) == [0, 1]
    with torch.no_grad():
        out = model(**inputs)
    assert (out.logits - dense)[real].abs().max().item() <= 1e-5  # every expert a copy of the dense FFN
    assert set(out.routing_stats) == {"lm.layers.0", "lm.layers.1"} and "lm.balance" in out.aux_losses
    assert out.routing_stats["lm.layers.0"].by_modality["image"].tokens == int((out.image_mask & real).sum()) > 0
    model.save_pretrained(tmp_path)
    again = zoo.load(tmp_path, verify=True)  # written as a zoo export is: checksums.json lists every file
    assert again.config.lm.sparsity.preset == "moe-llava"
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out.logits)
    listed = json.loads((tmp_path / "checksums.json").read_text())
    assert {"config.json", "model.safetensors", "processor_config.json"} <= set(listed)
    assert not [p for p in tmp_path.parent.iterdir() if ".tmp-" in p.name]  # the staging directory is gone
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-1] + b"\0")
    from zoo.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 \w+ does not match"):
        zoo.load(tmp_path, verify=True)


def test_bad_input_names_the_file_and_what_is_supported(tmp_path):
    from zoo.checkpoint import CheckpointError
    from zoo.train.recipe import set_trainable

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["X"],
                                                      "text_config": {}}))
    with pytest.raises(CheckpointError) as error:
        zoo.load(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "'gemma3' is not supported" in message and str(tmp_path / "config.json") in message
    assert all(t in message for t in TWINS)  # one line that lists the supported model types
    config = zoo.get_config(TWINS["qwen3_vl_moe"])
    config.transformers.config["text_config"]["num_hidden_layers"] = "two"
    with pytest.raises(zoo.ConfigError, match=r"(?s)^qwen3-vl-30b-a3b-tiny: transformers\.config: .*"
                                              r"'num_hidden_layers' expected int, got str"):
        zoo.build(config)
    (tmp_path / "config.json").write_text(json.dumps({**config.transformers.config, "architectures": ["X"]}))
    with pytest.raises(CheckpointError, match=r"(?s)config\.json: transformers rejected the config: .*num_hidden_layers"):
        zoo.load(tmp_path)
    model = zoo.build(TWINS["qwen3_vl_moe"])
    with pytest.raises(zoo.ConfigError, match=r"\['connector'\] match no parameter \(parts of .*: vision, lm; .*"
                                              r"connector: the patch merger is part of the vision tower"):
        set_trainable(model, ["connector"])


def test_upcycled_qwen3_vl_exports_as_a_transformers_qwen3_vl_moe(images, tmp_path):
    """Qwen3-VL upcycled on its even layers (dropless top-2 of 4) is a Qwen3-VL-MoE with the odd layers dense: the
    transformers class loads the export and gives the zoo model's logits; a dropping policy is named as the reason
    it cannot be exported."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from zoo.families import export_sparse

    torch.manual_seed(0)
    model = zoo.build(_dense_config("qwen3_vl")).eval()
    model.sparsify({"preset": "moe-llava", "moe": {"capacity_factor": None, "eval_capacity_factor": None}})
    randomise(model, "router", std=0.5, seed=3)
    randomise(model, "experts.w_", std=0.05, seed=4)  # distinct experts: the routing now shapes the output
    inputs = model.prompt_inputs(images, QUESTIONS)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
    export_sparse(model, tmp_path)
    moe = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert moe.config.text_config.mlp_only_layers == [1] and moe.config.text_config.num_experts == 4
    with torch.no_grad():
        assert (moe(**inputs).logits - expected)[real].abs().max().item() <= 1e-5
    dropping = zoo.build(_dense_config("qwen3_vl"))
    dropping.sparsify({"preset": "moe-llava"})  # capacity 1.5: tokens may be dropped
    with pytest.raises(ValueError, match="^capacity_factor: qwen3_vl_moe is dropless"):
        export_sparse(dropping, tmp_path / "x")


def test_chat_renders_the_family_chat_template_each_turn(images):
    from zoo.chat import ChatSession

    reference, model = _reference_and_zoo(TWINS["llama4"])
    chat = ChatSession(model, images[0], max_new_tokens=3)
    first = chat.ask("what color is the shape?")
    assert first == model.answer(images[:1], ["what color is the shape?"], max_new_tokens=3)[0]
    chat.ask("is it a circle?")
    assert [role for role, _ in chat.turns] == ["user", "assistant", "user", "assistant"]
    text = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert model.chat_inputs(chat.turns[:1], images[:1])["input_ids"].shape[1] == \
        model.processor(text=[text], images=images[:1], return_tensors="pt")["input_ids"].shape[1]


def test_sampling_and_streaming_go_through_transformers_generate(images):
    """What a server hands `generate`: a transformers GenerationConfig (sampling) and a streamer. Under one seed the
    zoo model samples transformers' own tokens on the same weights, and the streamer sees the prompt, then each
    step's tokens: together the returned ids."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    reference, model = _reference_and_zoo(TWINS["qwen3_vl_moe"])
    inputs = model.prompt_inputs(images, QUESTIONS)
    config = GenerationConfig(do_sample=True, top_k=20, temperature=1.5)
    streamer = Collect()
    torch.manual_seed(5)
    sampled = model.generate(**inputs, max_new_tokens=5, generation_config=config, streamer=streamer)
    torch.manual_seed(5)
    expected = reference.generate(**inputs, max_new_tokens=5, generation_config=config)
    assert torch.equal(sampled, expected[:, inputs["input_ids"].shape[1]:])
    torch.manual_seed(0)
    assert not torch.equal(model.generate(**inputs, max_new_tokens=5, generation_config=config), sampled)
    assert torch.equal(streamer.puts[0], inputs["input_ids"]) and streamer.ended
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), sampled)
    with pytest.raises(ValueError, match="^generation_config: a transformers-native model takes one"):
        model.generate(**inputs, generation_config=[config, config])
