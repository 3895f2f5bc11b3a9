"""Released checkpoint layouts (zoo.released, `zoo convert`): state dicts written here in the original LLaVA-1.5,
CuMo and MoE-LLaVA layouts at tiny size convert into ZooModels with the logits of the model they were written from
(for LLaVA-1.5: transformers' LlavaForConditionalGeneration on the same weights)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_convert import IMG, VOCAB, _pad, assert_parity, llava_logits, tiny_llava, zoo_logits
from transformers import CLIPVisionModel

import zoo
from zoo.catalogue import convert_checkpoint
from zoo.cli import main
from zoo.released import ReleasedCheckpointError, detect_layout, from_released
from zoo.tokenizer import train_word_tokenizer

ROWS = [[5, 6, IMG, 7, 8, 9, 10], [11, IMG, 12, 13]]  # one image per sample; IMG = llava-hf's image id


def _word_tokenizer(size: int):
    """A word tokenizer of exactly `size` ids without ``<image>`` (as LLaVA's Llama tokenizer: the converter adds it
    after the LM's vocabulary)."""
    return train_word_tokenizer([f"w{i}" for i in range(size - 5)], image_token="<im_patch>")


def _legacy_llama_tokenizer(size: int):
    """A legacy Llama tokenizer (vicuna-7b-v1.5's setting, which LLaVA-1.5 uses) of exactly `size` ids, without
    ``<image>``: single characters, byte fallback for the newline."""
    from transformers import LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", *dict.fromkeys("abcdefghijklmnopqrstuvwxyzUSERAT:?")]
    pieces += [f"▁w{i}" for i in range(size - len(pieces))]
    return LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], legacy=True)


def _llava_original_dir(tmp_path, llava, embed_tower: bool, weights: str = "bin", tokenizer=None):
    """Write `llava` (llava-hf, transformers names) in the original LLaVA-1.5 layout, by LLaVA's module names:
    LlavaLlamaForCausalLM keeps the Llama names, the projector is ``model.mm_projector`` (Sequential: 0 Linear,
    1 GELU, 2 Linear) and the tower ``model.vision_tower.vision_tower`` (a CLIPVisionModel, saved before
    transformers flattened ``vision_model.``); the tower goes to its own directory unless `embed_tower`."""
    out, tower_dir = tmp_path / "llava-v1.5-tiny", tmp_path / "clip-tower"
    out.mkdir()
    state = {}
    for key, value in llava.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            n, kind = re.match(r"model\.multi_modal_projector\.linear_(\d)\.(\w+)", key).groups()
            state[f"model.mm_projector.{2 * (int(n) - 1)}.{kind}"] = value
        elif key.startswith("model.vision_tower.") and embed_tower:
            state["model.vision_tower.vision_tower.vision_model." + key.removeprefix("model.vision_tower.")] = value
        elif key == "lm_head.weight":
            state[key] = value
    tower = CLIPVisionModel(llava.config.vision_config)
    tower.load_state_dict(llava.model.vision_tower.state_dict())
    tower.save_pretrained(tower_dir)
    state = {k: v.clone().contiguous() for k, v in state.items()}
    if weights == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:  # two safetensors shards
        from safetensors.torch import save_file

        keys = sorted(state)
        save_file({k: state[k] for k in keys[::2]}, str(out / "model-00001-of-00002.safetensors"))
        save_file({k: state[k] for k in keys[1::2]}, str(out / "model-00002-of-00002.safetensors"))
    config = {**llava.config.text_config.to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(tower_dir), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "tokenizer_model_max_length": 512}
    (out / "config.json").write_text(json.dumps(config))
    (tokenizer or _word_tokenizer(VOCAB)).save_pretrained(out)
    return out


@pytest.mark.parametrize("embed_tower, weights", [(False, "bin"), (True, "safetensors")])
def test_llava_original_layout_matches_llava_hf_logits(tmp_path, embed_tower, weights):
    llava = tiny_llava()
    src = _llava_original_dir(tmp_path, llava, embed_tower, weights)
    assert detect_layout(json.loads((src / "config.json").read_text())) == "llava"
    model = from_released(src)
    image_id = model.image_token_id
    assert image_id == VOCAB  # <image> appended after the 100-id vocabulary; never embedded
    assert model.num_image_tokens == 4 and model.config.vision.resize == "pad"
    zoo_rows = [[image_id if t == IMG else t for t in row] for row in ROWS]
    expanded = [[t for tok in r for t in ([tok] * 4 if tok == IMG else [tok])] for r in ROWS]
    (ids, mask), (hf_ids, hf_mask) = _pad(zoo_rows), _pad(expanded)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28)
    reference = llava_logits(llava, hf_ids, hf_mask, pixels)
    assert_parity(reference, zoo_logits(model, ids, mask, pixels), hf_mask)
    # `zoo convert SRC DST` writes a zoo checkpoint that reloads with the same logits
    dst = tmp_path / "zoo-ckpt"
    assert main(["convert", str(src), str(dst)]) == 0
    reloaded = zoo.load(dst)
    assert torch.equal(zoo_logits(reloaded, ids, mask, pixels), zoo_logits(model, ids, mask, pixels))
    direct = zoo.load(src)  # zoo.load reads the released layout too (the tower from the config's mm_vision_tower)
    assert torch.equal(zoo_logits(direct, ids, mask, pixels), zoo_logits(model, ids, mask, pixels))
    assert reloaded.encode_prompt("w3 w4").count(image_id) == 1


def test_a_legacy_llava_tokenizer_keeps_llavas_prompt_ids_through_zoo_convert(tmp_path):
    """LLaVA tokenizes the text after ``<image>`` as a new chunk (``▁ <0x0A> ...``); a legacy Llama tokenizer does
    the same after the ``<image>`` special token, and a zoo checkpoint must keep it legacy (transformers 5 drops the
    flag when saving; `bench/llava_parity.py` compares with LLaVA's own ``tokenizer_image_token``)."""
    src = _llava_original_dir(tmp_path, tiny_llava(), True, "safetensors", _legacy_llama_tokenizer(VOCAB))
    prompt = "USER: <image>\nwhat? ASSISTANT:"
    direct = from_released(src).tokenizer
    ids = direct(prompt).input_ids
    tokens = direct.convert_ids_to_tokens(ids)
    assert tokens[tokens.index("<image>") + 1:][:3] == ["\u2581", "<0x0A>", "w"]
    convert_checkpoint(src, tmp_path / "zoo")
    assert zoo.load(tmp_path / "zoo").tokenizer(prompt).input_ids == ids


def test_llava_hf_directory_converts_too(tmp_path):
    llava = tiny_llava(image_token_index=4)
    llava.save_pretrained(tmp_path / "hf")
    train_word_tokenizer(["w1", "w2"]).save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "zoo")
    rows = [[4 if t == IMG else t for t in row] for row in ROWS]
    ids, mask = _pad(rows)
    hf_ids, hf_mask = _pad([[t for tok in r for t in ([tok] * 4 if tok == 4 else [tok])] for r in rows])
    pixels = torch.randn(2, 3, 28, 28)
    assert_parity(llava_logits(llava, hf_ids, hf_mask, pixels), zoo_logits(zoo.load(tmp_path / "zoo"), ids, mask,
                                                                              pixels), hf_mask)


def test_released_layout_errors_name_the_tensor(tmp_path):
    src = _llava_original_dir(tmp_path, tiny_llava(), embed_tower=True)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.mm_projector.4.weight"] = torch.zeros(3, 3)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ReleasedCheckpointError, match=r"connector\.layers\.4\.weight: not in the zoo model"):
        from_released(src)
    del state["model.mm_projector.4.weight"], state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ReleasedCheckpointError, match=r"lm\.model\.layers\.1\.mlp\.up_proj\.weight: missing"):
        from_released(src)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ReleasedCheckpointError, match=r"pytorch_model\.bin: cannot read the weights"):
        from_released(src)


# ---------------------------------------------------------------------------------------------------- CuMo

def _cumo_layout(model) -> dict[str, torch.Tensor]:
    """A zoo CuMo model's weights in CuMo's names: ``model.mm_projector`` = MLPMoE (``gate`` Linear [E, C], ``experts``
    = E x Sequential(Linear, GELU, Linear)); ``model.vision_tower.vision_model`` = CLIP-MoE without post-layernorm,
    every block ``gate`` (Linear [E, d]) + ``experts`` = E x CLIPMLP(fc1, fc2) -- also the last block, which the zoo
    keeps dense (it never feeds the penultimate-layer features): written as copies of its MLP."""
    out = {}
    tower = "model.vision_tower.vision_model."
    for key, value in model.state_dict().items():
        moe = re.match(r"vision\.expert\.model\.encoder\.layers\.(\d+)\.mlp\.moe\.(.+)$", key)
        dense = re.match(r"vision\.expert\.model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", key)
        if key.startswith("lm.model.") or key == "lm.lm_head.weight":
            out[key.removeprefix("lm.")] = value
        elif moe is not None:
            i, name = moe.groups()
            block = f"{tower}encoder.layers.{i}."
            if name == "router.weight":
                out[block + "gate.weight"] = value
                continue
            layer = {"w_in": "fc1", "b_in": "fc1", "w_out": "fc2", "b_out": "fc2"}[name.split(".")[1]]
            for e in range(value.shape[0]):
                kind = "weight" if name.split(".")[1].startswith("w") else "bias"
                out[f"{block}experts.{e}.{layer}.{kind}"] = value[e].t() if kind == "weight" else value[e]
        elif dense is not None:
            i, layer, kind = dense.groups()
            for e in range(4):
                out[f"{tower}encoder.layers.{i}.experts.{e}.{layer}.{kind}"] = value
            out[f"{tower}encoder.layers.{i}.gate.weight"] = torch.zeros(4, model.vision.expert.hf_config.hidden_size)
        elif key.startswith("vision.expert.model.") and "post_layernorm" not in key:
            out[tower + key.removeprefix("vision.expert.model.")] = value
    experts = model.connector.experts
    out["model.mm_projector.gate.weight"] = model.connector.router.weight
    for e in range(experts.num_experts):
        out[f"model.mm_projector.experts.{e}.0.weight"] = experts.w_in[e].t()
        out[f"model.mm_projector.experts.{e}.0.bias"] = experts.b_in[e]
        out[f"model.mm_projector.experts.{e}.2.weight"] = experts.w_out[e].t()
        out[f"model.mm_projector.experts.{e}.2.bias"] = experts.b_out[e]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _write_cumo(tmp_path, model, state):
    from safetensors.torch import save_file

    src, tower = tmp_path / "cumo", tmp_path / "cumo-clip"
    src.mkdir(parents=True)
    save_file(state, str(src / "model.safetensors"))
    CLIPVisionModel(model.vision.expert.hf_config).save_pretrained(tower)  # its config: the tower's architecture
    config = {**model.lm.config.to_dict(), "model_type": "llava_mistral", "mm_vision_tower": str(tower),
              "mm_projector_type": "smoe_mlp", "num_experts": 4, "num_selected": 2, "scales": [1, 3],
              "clip_smoe": True, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad"}
    (src / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(src)
    return src


def test_cumo_layout_converts_with_identical_logits(tmp_path, easy_vqa):
    torch.manual_seed(0)
    source = zoo.build("cumo-mistral-7b-tiny").eval()
    with torch.no_grad():  # distinct experts and decisive routers, so a swapped expert or transpose shows
        for name, p in source.named_parameters():
            if name.startswith("connector.") or ".mlp.moe." in name:
                p.normal_(0, 0.5)
    src = _write_cumo(tmp_path, source, _cumo_layout(source))
    model = from_released(src)
    assert model.config.connector.kind == "moe_mlp" and model.config.vision.scales == [1, 3]
    assert model.config.vision.sparsity.preset == "cumo" and zoo.param_counts(model) == zoo.param_counts(source)
    images = easy_vqa["test"].images[:2]
    pixels = model.vision.preprocess(images)
    ids, mask = model.collate_prompts([model.encode_prompt("what shape is it?")] * 2, padding_side="right")
    with torch.no_grad():
        expected, got = source(ids, pixels, mask).logits, model(ids, pixels, mask).logits
    assert torch.equal(expected, got)
    left, left_mask = model.collate_prompts([model.encode_prompt("what colour?")] * 2)
    assert torch.equal(model.generate(pixels, left, left_mask, 4), source.generate(pixels, left, left_mask, 4))


def test_cumo_clip_moe_errors_name_the_tensor(tmp_path):
    torch.manual_seed(0)
    source = zoo.build("cumo-mistral-7b-tiny").eval()
    state = _cumo_layout(source)
    del state["model.vision_tower.vision_model.encoder.layers.1.experts.2.fc2.bias"]
    with pytest.raises(ReleasedCheckpointError, match=r"encoder\.layers\.1\.experts\.2\.fc2\.bias: missing from the "
                                                      r"CLIP-MoE tower"):
        from_released(_write_cumo(tmp_path / "a", source, state))
    src = _write_cumo(tmp_path / "b", source, _cumo_layout(source))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "clip_smoe": False}))
    with pytest.raises(ReleasedCheckpointError, match=r"the vision tower has MoE blocks .* but clip_smoe is not set"):
        from_released(src)


# ---------------------------------------------------------------------------------------------------- MoE-LLaVA

MOE_LLAVA = {  # tiny twin -> (released model_type, expert FFN names in DeepSpeed's experts)
    "moe-llava-phi2-2.7b-4e-tiny": ("moe_llava_phi", ["fc1", "fc2"]),
    "moe-llava-stablelm-1.6b-4e-tiny": ("moe_llava_stablelm", ["gate_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("name", MOE_LLAVA)
def test_moe_llava_layout_converts_with_identical_logits(name, tmp_path, easy_vqa):
    """MoE-LLaVA as released: DeepSpeed-MoE FFNs in the even layers (`zoo.lm.interop` imports the LM), the projector
    under ``model.mm_projector.image_spatial_proj``, the tower under ``model.image_tower.image_tower``, and the
    policy in the config's ``moe`` block."""
    from safetensors.torch import save_file
    from test_lm_interop import _to_deepspeed_layout

    model_type, expert_names = MOE_LLAVA[name]
    torch.manual_seed(0)
    source = zoo.build(name).eval()
    with torch.no_grad():  # experts that differ, so a swapped expert shows
        for key, p in source.named_parameters():
            if ".moe." in key:
                p.add_(torch.randn_like(p) * 0.2)
    state = {k: v for k, v in _to_deepspeed_layout(source.lm, expert_names).items()}
    for key, value in source.connector.layers.state_dict().items():
        state[f"model.mm_projector.image_spatial_proj.{key}"] = value.clone()
    for key, value in source.vision.model.state_dict().items():
        state[f"model.image_tower.image_tower.vision_model.{key}"] = value.clone()
    src, tower = tmp_path / "moe-llava", tmp_path / "clip"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    CLIPVisionModel(source.vision.hf_config).save_pretrained(tower)
    config = {**source.lm.config.to_dict(), "model_type": model_type, "mm_image_tower": str(tower),
              "image_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad",
              "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0], "num_experts": [4],
                      "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
                      "router_aux_loss_coef": 0.01, "use_residual": False, "ep_size": 1}}
    (src / "config.json").write_text(json.dumps(config))
    source.tokenizer.save_pretrained(src)
    assert detect_layout(config) == "moe-llava"

    dst = tmp_path / "zoo"
    assert main(["convert", str(src), str(dst)]) == 0
    model = zoo.load(dst)
    policy = model.config.lm.sparsity
    assert (policy.layers, policy.moe["num_experts"], policy.moe["top_k"], policy.coefficients) == (
        [0], 4, 2, {"balance": 0.01})
    images = easy_vqa["test"].images[:2]
    pixels = model.vision.preprocess(images)
    ids, mask = model.collate_prompts([model.encode_prompt("is there a circle?")] * 2, padding_side="right")
    with torch.no_grad():
        assert torch.equal(source(ids, pixels, mask).logits, model(ids, pixels, mask).logits)
    assert model.answer(images, ["what shape?"] * 2) == source.answer(images, ["what shape?"] * 2)


def test_original_qwen_config_becomes_the_catalogue_qwen2_architecture():
    """MoE-LLaVA-Qwen's config.json has Qwen-1's keys (remote code); read as Qwen2 it is the catalogue entry's LM."""
    from zoo.released import _lm_config

    qwen = {"model_type": "moe_llava_qwen", "architectures": ["MoELLaVAQWenForCausalLM"], "vocab_size": 151936,
            "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 24, "num_attention_heads": 16,
            "kv_channels": 128, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "seq_length": 8192,
            "max_position_embeddings": 8192, "mm_image_tower": "openai/clip-vit-large-patch14-336"}
    assert _lm_config(qwen) == zoo.get_config("moe-llava-qwen-1.8b-4e").lm.config


@pytest.mark.parametrize("name", MOE_LLAVA)
def test_moe_llava_export_then_import_is_the_identity(name, tmp_path, easy_vqa):
    """`zoo.released.export_moe_llava` writes the released layout (DeepSpeed-MoE names, MoE-LLaVA's config keys);
    reading it back gives bitwise the same tensors and logits."""
    from safetensors.torch import load_file

    from zoo.released import export_moe_llava

    torch.manual_seed(0)
    source = zoo.build(name).eval()
    with torch.no_grad():
        for key, p in source.named_parameters():
            if ".moe." in key:
                p.add_(torch.randn_like(p) * 0.2)
    export_moe_llava(source, tmp_path / "released")
    written = load_file(tmp_path / "released" / "model.safetensors")
    assert any(k.endswith("mlp.deepspeed_moe.gate.wg.weight") for k in written)
    assert not any(".mlp.moe." in k for k in written)
    config = json.loads((tmp_path / "released" / "config.json").read_text())
    assert detect_layout(config) == "moe-llava" and config["moe"]["moe_layers_idx"] == [0]
    back = from_released(tmp_path / "released")
    want, got = source.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images = easy_vqa["test"].images[:2]
    pixels = back.vision.preprocess(images)
    ids, mask = back.collate_prompts([back.encode_prompt("is there a circle?")] * 2, padding_side="right")
    with torch.no_grad():
        assert torch.equal(source(ids, pixels, mask).logits, back(ids, pixels, mask).logits)


def test_moe_llava_export_refuses_what_the_layout_cannot_hold(tmp_path):
    from zoo.released import export_moe_llava

    model = zoo.build("moe-llava-phi2-2.7b-4e-tiny")
    model.config.lm.sparsity.moe["z_loss"] = True
    with pytest.raises(ValueError, match=r"lm\.sparsity\.moe\.z_loss: True has no place in MoE-LLaVA's config"):
        export_moe_llava(model, tmp_path / "x")
    with pytest.raises(ValueError, match=r"lm.config.model_type: MoE-LLaVA's layout is exported for phi and stablelm"):
        export_moe_llava(zoo.build("moe-llava-qwen-1.8b-4e-tiny"), tmp_path / "y")
