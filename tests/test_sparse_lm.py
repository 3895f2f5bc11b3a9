"""Sparse LMs by policy (zoo.lm.sparse): upcycled identity with and without the KV cache, presets, MoIIE routing by
modality, aux losses in the model output, a training step, policy errors, save and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.config import ConfigError, SparsityConfig, from_dict
from zoo.lm.sparse import modality_mask, sparse_layers


@pytest.fixture(scope="module")
def dense_model():
    torch.manual_seed(0)
    return zoo.build(tiny_config()).eval()


def _batch(model, n=3):
    torch.manual_seed(1)
    images = [Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()) for _ in range(n)]
    questions = ["what shape is this?", "is there a red circle in the image?", "what color is the shape?"][:n]
    ids, mask = model.collate_prompts([model.encode_prompt(q) for q in questions], padding_side="right")
    pixels = model.vision.preprocess(images)
    return images, questions, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _sparse_copy(dense, **policy):
    model = copy.deepcopy(dense)
    model.sparsify(policy)
    return model.eval()


@pytest.mark.parametrize("policy", [
    {"preset": "moe-llava"},
    {"preset": "moe-llava", "layers": [1], "moe": {"num_experts": 3, "top_k": 3}},
    {"preset": "moiie"},
    {"preset": "moe-llava", "moe": {"backend": "loop"}},
], ids=["moe-llava", "explicit-layer", "moiie", "loop-backend"])
def test_upcycled_model_has_the_dense_logits(dense_model, policy):
    model = _sparse_copy(dense_model, **policy)
    assert sparse_layers(model)
    _, _, batch = _batch(model)
    with torch.no_grad():
        ref = dense_model(**batch).logits
        out = model(**batch)
    real = out.attention_mask.bool()  # padding positions route nowhere; their logits are never used
    assert (out.logits[real] - ref[real]).abs().max().item() <= 1e-5
    assert out.routing_stats and all(s.dropped.item() == 0 for s in out.routing_stats.values())


def test_upcycled_generation_matches_dense_with_kv_cache(dense_model):
    model = _sparse_copy(dense_model, preset="moe-llava")
    images, questions, _ = _batch(model)
    prompts = [model.encode_prompt(q) for q in questions]
    ids, mask = model.collate_prompts(prompts)  # left padded
    pixels = model.vision.preprocess(images)
    torch.testing.assert_close(model.generate(pixels, ids, mask, max_new_tokens=6),
                               dense_model.generate(pixels, ids, mask, max_new_tokens=6), rtol=0, atol=0)
    assert model.answer(images, questions) == dense_model.answer(images, questions)


def test_random_init_is_not_the_dense_model(dense_model):
    model = _sparse_copy(dense_model, preset="moe-llava", init="random")
    _, _, batch = _batch(model)
    with torch.no_grad():
        out, ref = model(**batch), dense_model(**batch)
    real = out.attention_mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() > 1e-3


def test_presets_fill_and_merge():
    cfg = from_dict(SparsityConfig, {"preset": "moe-llava", "moe": {"num_experts": 8}}, path="lm.sparsity")
    assert cfg.layers == "every_other_even" and cfg.moe["num_experts"] == 8 and cfg.moe["top_k"] == 2
    assert cfg.moe["capacity_factor"] == 1.5 and cfg.moe["eval_capacity_factor"] == 2.0
    assert cfg.coefficients == {"balance": 0.01}
    moiie = from_dict(SparsityConfig, {"preset": "moiie"})
    assert moiie.layers == "every_other_odd" and moiie.modality_routing and moiie.last_image_token_as_text


def test_presets_build_on_the_tiny_model(dense_model):
    for preset, layers in (("deepseek-moe", [1]), ("bigmac", [0, 1])):
        model = _sparse_copy(dense_model, preset=preset)
        assert sorted(int(n.split(".")[-1]) for n in sparse_layers(model)) == layers
    bigmac = sparse_layers(model)["lm.layers.0"].moe
    assert bigmac.config.bigmac_rank == 32 and bigmac.experts.hidden_size == 32


def test_moiie_routes_by_modality(dense_model):
    model = _sparse_copy(dense_model, preset="moiie")
    _, _, batch = _batch(model)
    text_only = model.collate_prompts([model.tokenizer("what color is it").input_ids], padding_side="right")
    with torch.no_grad():
        out = model(**batch)
    for stats in out.routing_stats.values():
        image, text = stats.by_modality["image"], stats.by_modality["text"]
        assert image.tokens > 0 and text.tokens > 0
        assert image.kept[3] == 0, "an image token reached the text-only expert"
        assert text.kept[0] == 0, "a text token reached the vision-only expert"
        assert image.kept[1:3].sum() > 0 and text.kept[1:3].sum() > 0
    assert {"lm.balance_image", "lm.balance_text"} <= set(out.aux_losses)
    # image-free text: every token is text
    with torch.no_grad():
        out = model(input_ids=text_only[0], attention_mask=text_only[1])
    assert all(s.by_modality["image"].tokens == 0 for s in out.routing_stats.values())


def test_modality_mask_rule():
    image = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    assert modality_mask(image, None, True).int().tolist() == [[0, 1, 1, 0, 0]]
    assert modality_mask(image, None, False).int().tolist() == [[0, 1, 1, 1, 0]]


def test_moiie_layer_without_modality_mask_is_an_error(dense_model):
    model = _sparse_copy(dense_model, preset="moiie")
    layer = next(iter(sparse_layers(model).values())).moe
    with pytest.raises(ValueError, match="^modality: "):
        layer(torch.randn(2, 3, layer.config.hidden_size))


def test_aux_losses_enter_the_loss_with_their_coefficients(dense_model):
    model = _sparse_copy(dense_model, preset="moe-llava", coefficients={"balance": 0.5})
    _, _, batch = _batch(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    n_layers = len(sparse_layers(model))
    assert out.aux_losses["lm.balance"].item() >= n_layers * 0.99  # Switch loss >= ~1 per layer
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_losses["lm.balance"])


def test_a_training_step_lowers_the_loss_and_reaches_every_router(dense_model):
    model = _sparse_copy(dense_model, preset="moe-llava").train()
    _, _, batch = _batch(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(4):
        opt.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        if step == 0:
            routers = [m.moe.router.weight for m in sparse_layers(model).values()]
            assert routers and all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("policy, message", [
    ({"preset": "moe-llava", "layers": [5]}, r"^lm\.sparsity\.layers: index 5 out of range for a 2-layer model"),
    ({"preset": "moe-llava", "moe": {"top_k": 9}}, r"^lm\.sparsity\.moe\.top_k: "),
    ({"preset": "moe-lava"}, r"^lm\.sparsity\.preset: unknown sparsity preset 'moe-lava'; did you mean 'moe-llava'"),
    ({"layers": "every_other"}, r"^lm\.sparsity\.layers: "),
    ({"preset": "moe-llava", "coefficients": {"balanse": 0.1}}, r"^lm\.sparsity\.coefficients\.balanse: no such"),
])
def test_bad_policy_names_the_field(dense_model, policy, message):
    model = copy.deepcopy(dense_model)
    with pytest.raises(ConfigError, match=message):
        model.sparsify(policy)


def test_sparse_model_saves_and_reloads(dense_model, tmp_path):
    model = _sparse_copy(dense_model, preset="moe-llava", init="upcycle_noise", noise=0.05)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.load(str(tmp_path / "ckpt")).eval()
    assert loaded.config.lm.sparsity.preset == "moe-llava"
    _, _, batch = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


LM_FAMILIES = {  # tiny configs of the decoder families the policies support (SwiGLU, fused gate_up, GELU + bias)
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "phi": {"partial_rotary_factor": 0.5},
    "phi3": {}, "stablelm": {"partial_rotary_factor": 0.25, "use_qkv_bias": True}, "gemma": {"head_dim": 8},
}


@pytest.mark.parametrize("model_type", list(LM_FAMILIES))
def test_every_decoder_family_upcycles_to_its_dense_logits(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoo.lm.sparse import sparsify

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               **LM_FAMILIES[model_type])
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    sparse = copy.deepcopy(dense)
    policy = from_dict(SparsityConfig, {"preset": "moe-llava", "layers": "all", "init": "upcycle_noise",
                                        "noise": 0.0}, path="lm.sparsity")
    layers = sparsify(sparse, policy)
    assert sorted(layers) == [0, 1]
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = dense(ids).logits
        out = sparse(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    assert sparse.training is False and all(not p.is_meta for p in sparse.parameters())


@pytest.mark.parametrize("name", ["moe-llava-stablelm-1.6b-4e", "moe-llava-qwen-1.8b-4e", "moe-llava-phi2-2.7b-4e"])
def test_moe_llava_tiny_twins_train_save_and_reload(name, tmp_path):
    """Each real-size MoE-LLaVA entry has a tiny twin of the same layout that trains, saves and reloads."""
    real, twin = zoo.get_config(name), zoo.get_config(name + "-tiny")
    assert (twin.family, twin.vision.kind, twin.vision.kwargs["model_type"], twin.vision.feature_layer,
            twin.connector.projector, twin.lm.config["model_type"], twin.lm.sparsity.preset, twin.prompt) == (
        real.family, real.vision.kind, real.vision.kwargs["model_type"], real.vision.feature_layer,
        real.connector.projector, real.lm.config["model_type"], real.lm.sparsity.preset, real.prompt)
    torch.manual_seed(0)
    model = zoo.build(name + "-tiny").train()
    assert sorted(sparse_layers(model)) == ["lm.layers.0"]
    _, _, batch = _batch(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] and "lm.balance" in out.aux_losses
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = zoo.load(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
