"""Sparse LMs to and from other layouts (zoo.lm.interop): export to transformers' MixtralForCausalLM and
Qwen2MoeForCausalLM with identical logits; import MoE-LLaVA checkpoints in their DeepSpeed-MoE layout (state dicts
the tests write from tiny models in each family's released names)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers

from zoo.config import SparsityConfig, from_dict
from zoo.lm.interop import export_sparse_lm, import_moe_llava_state_dict
from zoo.lm.sparse import sparsify

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _sparse_lm(cls, config_cls, policy, seed=0, **extra):
    torch.manual_seed(seed)
    lm = cls(config_cls(**SIZES, **extra)).eval()
    sparsify(lm, from_dict(SparsityConfig, policy, path="lm.sparsity"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # distinct experts and a decisive router, so a wrong mapping shows in the logits
        for name, p in lm.named_parameters():
            if ".moe." in name:
                p.add_(torch.randn(p.shape, generator=g) * (1.0 if "router" in name else 0.05))
    return lm


def _inputs(batch=3, length=11, vocab=97):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


def _assert_same_logits(a, b, atol=1e-5):
    ids, mask = _inputs()
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (la[keep] - lb[keep]).abs().max().item() <= atol


ALL_LAYERS = {"layers": "all", "init": "upcycle_noise", "noise": 0.1, "moe": {"num_experts": 4, "top_k": 2}}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_every_layer_sparse_llama_and_mistral_export_to_mixtral(family):
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[family]
    lm = _sparse_lm(cls, cfg, ALL_LAYERS)
    mixtral = export_sparse_lm(lm)
    assert isinstance(mixtral, transformers.MixtralForCausalLM)
    assert mixtral.config.num_local_experts == 4 and mixtral.config.num_experts_per_tok == 2
    _assert_same_logits(lm, mixtral)


@pytest.mark.parametrize("policy", [
    {"preset": "moe-llava"},  # even layers, capacity 1.5 train / 2.0 eval: no drops in eval
    {"layers": [1, 2], "init": "upcycle_noise", "noise": 0.1,
     "moe": {"num_experts": 4, "top_k": 2, "renormalize": False, "num_shared": 1, "shared_gate": True}},
], ids=["moe-llava", "shared-expert"])
def test_qwen2_exports_to_qwen2_moe_with_its_dense_layers(policy):
    lm = _sparse_lm(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, policy)
    moe = export_sparse_lm(lm)
    assert isinstance(moe, transformers.Qwen2MoeForCausalLM)
    sparse = [i for i, layer in enumerate(moe.model.layers)
              if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"]
    assert sparse == ([0, 2] if "preset" in policy else [1, 2])
    _assert_same_logits(lm, moe)


def test_what_the_export_cannot_express_names_the_field():
    even = _sparse_lm(transformers.LlamaForCausalLM, transformers.LlamaConfig, {"preset": "moe-llava"})
    with pytest.raises(ValueError, match=r"lm.sparsity.layers: Mixtral has a MoE FFN in every layer; layers \[1, 3\]"):
        export_sparse_lm(even)
    dropping = _sparse_lm(transformers.LlamaForCausalLM, transformers.LlamaConfig,
                          {**ALL_LAYERS, "moe": {"num_experts": 4, "top_k": 2, "eval_capacity_factor": 1.0}})
    with pytest.raises(ValueError, match=r"lm.layers.0.moe.eval_capacity_factor: .* can drop tokens"):
        export_sparse_lm(dropping)
    moiie = _sparse_lm(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {"preset": "moiie"})
    with pytest.raises(ValueError, match="routing by modality"):
        export_sparse_lm(moiie)
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(**SIZES))
    with pytest.raises(ValueError, match="no transformers MoE model to export 'phi' to"):
        export_sparse_lm(phi)


# ---------------------------------------------------------------------------------------------------- import

def _to_deepspeed_layout(lm, expert_names, prefix="model.layers"):
    """The test's own writer of MoE-LLaVA's released names, from a zoo-sparsified LM's state dict."""
    out = {}
    for key, value in lm.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.moe\.(.+)$", key)
        if m is None:
            out[key] = value.clone()
            continue
        i, rest = m.groups()
        base = f"{prefix}.{i}.mlp.deepspeed_moe."
        if rest == "router.weight":
            out[base + "gate.wg.weight"] = value.clone()
        elif rest == "experts.w_in":
            for e in range(value.shape[0]):
                parts = value[e].t().chunk(len(expert_names) - 1, 0)
                for name, part in zip(expert_names[:-1], parts):
                    out[f"{base}experts.deepspeed_experts.{e}.{name}.weight"] = part.clone()
        elif rest == "experts.w_out":
            for e in range(value.shape[0]):
                out[f"{base}experts.deepspeed_experts.{e}.{expert_names[-1]}.weight"] = value[e].t().clone()
        elif rest.startswith("experts.b_"):
            for e in range(value.shape[0]):
                name = expert_names[0] if rest == "experts.b_in" else expert_names[-1]
                out[f"{base}experts.deepspeed_experts.{e}.{name}.bias"] = value[e].clone()
        else:
            raise AssertionError(key)
    return out


def _fresh_twin(lm, cls, config_cls, policy):
    torch.manual_seed(123)
    twin = cls(copy.deepcopy(lm.config)).eval()
    sparsify(twin, from_dict(SparsityConfig, policy, path="lm.sparsity"))
    return twin


FAMILIES = {
    "stablelm": (transformers.StableLmForCausalLM, transformers.StableLmConfig, ["gate_proj", "up_proj", "down_proj"]),
    "phi": (transformers.PhiForCausalLM, transformers.PhiConfig, ["fc1", "fc2"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_llava_deepspeed_layout_imports_exactly(family):
    cls, config_cls, names = FAMILIES[family]
    policy = {"preset": "moe-llava"}
    source = _sparse_lm(cls, config_cls, policy)
    checkpoint = _to_deepspeed_layout(source, names)
    checkpoint["model.mm_projector.0.weight"] = torch.zeros(2, 2)  # a VLM tensor the LM import hands back
    assert any(".deepspeed_moe.experts.deepspeed_experts.3." in k for k in checkpoint)
    target = _fresh_twin(source, cls, config_cls, policy)
    rest = import_moe_llava_state_dict(target, checkpoint)
    assert list(rest) == ["model.mm_projector.0.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    _assert_same_logits(source, target, atol=0.0)


def test_original_qwen_layout_imports_onto_qwen2_names():
    policy = {"preset": "moe-llava"}
    sizes = {**SIZES, "num_key_value_heads": SIZES["num_attention_heads"]}  # Qwen-1 has no grouped-query attention
    torch.manual_seed(0)
    source = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes)).eval()
    sparsify(source, from_dict(SparsityConfig, policy, path="lm.sparsity"))
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".moe." in name:
                p.add_(torch.randn_like(p) * 0.05)
    ds = _to_deepspeed_layout(source, ["w2", "w1", "c_proj"])  # Qwen: w2 gates, w1 goes up
    qwen = {}
    for key, value in ds.items():  # the rest of the original Qwen names, written by hand
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", key)
        if key == "model.embed_tokens.weight":
            qwen["transformer.wte.weight"] = value
        elif key == "model.norm.weight":
            qwen["transformer.ln_f.weight"] = value
        elif m is None:
            qwen[key] = value
        else:
            i, rest = m.groups()
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue
            rest = (rest.replace("self_attn.o_proj", "attn.c_proj").replace("input_layernorm", "ln_1")
                    .replace("post_attention_layernorm", "ln_2").replace("mlp.gate_proj", "mlp.w2")
                    .replace("mlp.up_proj", "mlp.w1").replace("mlp.down_proj", "mlp.c_proj"))
            qwen[f"transformer.h.{i}.{rest}"] = value
    for i in range(sizes["num_hidden_layers"]):
        attn = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qwen[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(
                [ds[f"{attn}{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")])
    assert not any(k.startswith("model.layers") and "deepspeed" not in k for k in qwen)
    qwen = {k.replace("model.layers.", "transformer.h.") if "deepspeed_moe" in k else k: v for k, v in qwen.items()}
    target = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes)).eval()
    sparsify(target, from_dict(SparsityConfig, policy, path="lm.sparsity"))
    assert import_moe_llava_state_dict(target, qwen) == {}
    _assert_same_logits(source, target, atol=0.0)


def test_import_errors_name_the_tensor():
    cls, config_cls, names = FAMILIES["stablelm"]
    source = _sparse_lm(cls, config_cls, {"preset": "moe-llava"})
    checkpoint = _to_deepspeed_layout(source, names)
    target = _fresh_twin(source, cls, config_cls, {"preset": "moe-llava"})
    broken = {k: v for k, v in checkpoint.items() if k != "model.layers.1.self_attn.q_proj.weight"}
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.weight: missing from the MoE-LLaVA"):
        import_moe_llava_state_dict(target, broken)
    odd = _fresh_twin(source, cls, config_cls, {"preset": "moe-llava", "layers": "every_other_odd"})
    with pytest.raises(ValueError, match=r"layer 0 is a MoE layer in the checkpoint but dense in the zoo LM"):
        import_moe_llava_state_dict(odd, checkpoint)
    three = _fresh_twin(source, cls, config_cls, {"preset": "moe-llava", "moe": {"num_experts": 3}})
    with pytest.raises(ValueError, match=r"experts \[0, 1, 2, 3\] in the checkpoint, the zoo layer has 3"):
        import_moe_llava_state_dict(three, checkpoint)
