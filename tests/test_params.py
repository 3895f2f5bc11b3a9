"""zoo.param_counts: closed forms at tiny size, real-size catalogue entries on the meta device vs the papers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

import zoo
from zoo.config import from_dict
from zoo.params import build_on_meta, count_module, param_counts


def _near(value: int, target: float, tol: float = 0.02) -> bool:
    return abs(value / target - 1) <= tol


def test_tiny_sparse_model_closed_form():
    """tiny-moe-llava: LM of 2 layers, layer 0 upcycled into 4 experts (top-2) of a SwiGLU FFN 128 -> 256."""
    torch.manual_seed(0)
    model = zoo.build("tiny-moe-llava")
    counts = param_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    d, f, E, k = 128, 256, 4, 2
    expert = 3 * d * f  # gate, up, down; no bias
    lm_total = sum(p.numel() for p in model.lm.parameters())
    assert counts.parts["lm"] == (lm_total, lm_total - (E - k) * expert)
    assert counts.parts["vision"][0] == counts.parts["vision"][1] == sum(p.numel() for p in model.vision.parameters())
    assert counts.active == counts.total - (E - k) * expert
    # the dense model it was upcycled from has the LM active count minus one expert and the router
    dense = param_counts(zoo.build("tiny-llava"))
    assert counts.parts["lm"][1] == dense.parts["lm"][1] + (k - 1) * expert + E * d


def test_meta_device_build_counts_the_same_as_real_weights():
    real = param_counts(zoo.build("tiny-moe-llava"))
    meta_model = build_on_meta("tiny-moe-llava")
    assert next(meta_model.parameters()).device.type == "meta"
    assert param_counts(meta_model) == real == param_counts("tiny-moe-llava")


@pytest.mark.parametrize("policy", [
    {"preset": "deepseek-moe"},  # 2 shared + 16 routed slices of width f/4, top-6
    {"preset": "moiie"},         # one router per modality; a token runs its modality's router and top-2 experts
    {"preset": "bigmac"},
])
def test_active_counts_follow_the_layer_structure(policy):
    config = tiny_config()
    config.lm.sparsity = from_dict(zoo.config.SparsityConfig, policy, path="lm.sparsity")
    model = zoo.build(config)
    total, active = count_module(model.lm)
    assert total == sum(p.numel() for p in model.lm.parameters())
    expected = total
    for module in model.lm.modules():
        if hasattr(module, "active_parameters") and hasattr(module, "experts"):
            cfg = module.config
            bank = sum(p.numel() for p in module.experts.parameters())
            expected -= bank * (cfg.num_experts - cfg.top_k) // cfg.num_experts
            routers = getattr(module, "routers", None)
            if routers is not None:  # MoIIE: one router per modality, all of the same size here
                expected -= sum(p.numel() for p in routers.parameters()) // len(routers)
    assert active == expected < total


def test_transformers_native_sparse_blocks_are_counted():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    lm = MixtralForCausalLM(cfg)
    total, active = count_module(lm)
    assert total == sum(p.numel() for p in lm.parameters())
    assert active == total - 2 * (8 - 2) * 3 * 32 * 48


# --- real-size catalogue entries, built on the meta device (no weights, no memory) -----------------------------

def test_moe_llava_stablelm_matches_the_paper():
    """The paper reports 2.0B activated. The exact count is 2.06B: StableLM-2-1.6B (1.645B) plus one more expert of
    34.6M in each of the 12 even layers. The paper's figures are truncated to one decimal (Qwen 2.24B -> "2.2B",
    Phi-2 3.62B -> "3.6B"), so the check is 2.0 <= active < 2.1 and the derivation, not 2% of 2.0."""
    counts = param_counts("moe-llava-stablelm-1.6b-4e")
    lm_total, lm_active = counts.parts["lm"]
    dense_lm = 1_644_515_328  # stabilityai/stablelm-2-1_6b
    expert = 3 * 2048 * 5632
    assert lm_active == dense_lm + 12 * (expert + 4 * 2048)  # one extra expert and a router per MoE layer
    assert 2.0e9 <= lm_active < 2.1e9
    assert lm_total == dense_lm + 12 * (3 * expert + 4 * 2048)


def test_deepseek_moe_16b_entry_counts_like_transformers_qwen2_moe():
    """The catalogue's DeepSeekMoE-16B LM (a Llama layout with the zoo policy) against the same shapes as a
    transformers-native sparse model (Qwen2-MoE: a fused shared expert + fine-grained routed experts): equal active
    counts up to the parts the two layouts name differently (Qwen2-MoE adds q/k/v biases and a shared-expert gate)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2_moe", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                               moe_intermediate_size=1408, shared_expert_intermediate_size=2 * 1408, num_experts=64,
                               num_experts_per_tok=6, num_hidden_layers=28, num_attention_heads=16,
                               num_key_value_heads=16, mlp_only_layers=[0], decoder_sparse_step=1,
                               norm_topk_prob=False, tie_word_embeddings=False)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    total, active = count_module(lm)
    qkv_bias = 28 * 3 * 2048
    shared_gate = 27 * 2048
    zoo_total, zoo_active = param_counts("llava-deepseek-moe-16b").parts["lm"]
    assert (total - qkv_bias - shared_gate, active - qkv_bias - shared_gate) == (zoo_total, zoo_active)
    assert _near(total, 16.4e9) and _near(active, 2.8e9)


def test_counting_without_an_architecture_names_the_field():
    config = copy.deepcopy(zoo.get_config("llava-1.5-7b"))
    config.lm.config = {}  # Vicuna by hub id only: no architecture and no tokenizer offline
    with pytest.raises(ValueError, match="lm.config.vocab_size"):
        param_counts(config)


def test_counts_are_cached_on_disk_by_config_and_code(tmp_path, monkeypatch):
    import json

    import zoo.params as P

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "_MEMO", {})
    counts = P.cached_param_counts("tiny-moe-llava")
    assert counts == param_counts("tiny-moe-llava")
    stored = json.loads((tmp_path / "param_counts.json").read_text())
    assert [e["name"] for e in stored.values()] == ["tiny-moe-llava"]
    # a fresh process (empty memo) reads the file instead of counting: a planted value shows
    (entry,) = stored.values()
    entry["active"] = 12345
    (tmp_path / "param_counts.json").write_text(json.dumps(stored))
    monkeypatch.setattr(P, "_MEMO", {})
    assert P.cached_param_counts("tiny-moe-llava").active == 12345
    # another config is another key; a corrupt file is ignored and replaced
    (tmp_path / "param_counts.json").write_text("{not json")
    monkeypatch.setattr(P, "_MEMO", {})
    assert P.cached_param_counts("tiny-moe-llava") == counts
    config = copy.deepcopy(zoo.get_config("tiny-moe-llava"))
    config.lm.config["num_hidden_layers"] = 4
    assert P.cached_param_counts(config).total > counts.total
    assert len(json.loads((tmp_path / "param_counts.json").read_text())) == 2
