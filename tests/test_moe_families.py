"""The sparse blocks of today's transformers VLMs convert to zoo layers and back exactly: Qwen3-VL-MoE, Qwen3-Omni
(thinker and talker), GLM-4.5V, Aria, Llama 4 (sigmoid top-1 gating the expert input, a shared expert) and ERNIE
4.5-VL (text and vision experts apart): same outputs, same chosen experts, the same block back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.moe import DISPATCHERS, MoEConfig, MoELayer, from_transformers, to_transformers
from zoo.moe.hf import KINDS
from zoo.moe.modality import ModalitySeparatedMoE

D, F, E = 24, 10, 6


def _block(kind: str) -> nn.Module:
    import transformers.models as M

    common = dict(hidden_size=D, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2)
    if kind == "qwen3_vl_moe":
        cfg = M.qwen3_vl_moe.Qwen3VLMoeTextConfig(moe_intermediate_size=F, num_experts=E, num_experts_per_tok=2,
                                                  **common)
        return M.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextSparseMoeBlock(cfg)
    if kind == "qwen3_omni_moe":
        cfg = M.qwen3_omni_moe.configuration_qwen3_omni_moe.Qwen3OmniMoeTextConfig(
            moe_intermediate_size=F, num_experts=E, num_experts_per_tok=3, norm_topk_prob=False, **common)
        return M.qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeThinkerTextSparseMoeBlock(cfg)
    if kind == "qwen3_omni_moe_talker":
        cfg = M.qwen3_omni_moe.configuration_qwen3_omni_moe.Qwen3OmniMoeTalkerTextConfig(
            moe_intermediate_size=F, num_experts=E, num_experts_per_tok=2, shared_expert_intermediate_size=F + 4,
            norm_topk_prob=True, **common)
        return M.qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeTalkerTextSparseMoeBlock(cfg)
    if kind == "glm4v_moe":
        cfg = M.glm4v_moe.Glm4vMoeTextConfig(moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=2,
                                             n_shared_experts=1, n_group=3, topk_group=2, norm_topk_prob=True,
                                             routed_scaling_factor=2.5, **common)
        return M.glm4v_moe.modeling_glm4v_moe.Glm4vMoeTextMoE(cfg)
    if kind == "aria":
        cfg = M.aria.AriaTextConfig(intermediate_size=F, moe_num_experts=E, moe_topk=2, moe_num_shared_experts=2,
                                    **common)
        return M.aria.modeling_aria.AriaTextMoELayer(cfg)
    if kind == "llama4":
        cfg = M.llama4.Llama4TextConfig(intermediate_size=F, num_local_experts=E, num_experts_per_tok=1, **common)
        return M.llama4.modeling_llama4.Llama4TextMoe(cfg)
    cfg = M.ernie4_5_vl_moe.Ernie4_5_VLMoeTextConfig(moe_intermediate_size=[F, F - 4], moe_num_experts=E, moe_k=2,
                                                     moe_num_shared_experts=1, **common)
    return M.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe.Ernie4_5_VLMoeMoeBlock(cfg)


FAMILY_KINDS = [k for k in KINDS if k not in ("mixtral", "qwen2_moe", "deepseek_v3")]


def _randomise(block: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            t.copy_(torch.randn(t.shape, generator=g) * (0.05 if "bias" in name else 0.3))


def _reference(kind: str, block: nn.Module, x: torch.Tensor, image: torch.Tensor):
    """The block's output and its chosen experts per token (vision experts numbered after the text ones)."""
    flat = x.reshape(-1, D)
    with torch.no_grad():
        if kind == "llama4":
            out, logits = block(x)
            return out.reshape(x.shape), logits.topk(1, dim=-1).indices
        if kind == "ernie4_5_vl_moe":
            out, _ = block(x, image.int())
            chosen = torch.empty(flat.shape[0], 2, dtype=torch.long)
            chosen[~image.reshape(-1)] = block.text_moe.gate(flat[~image.reshape(-1)])[2]
            chosen[image.reshape(-1)] = block.vision_moe.gate(flat[image.reshape(-1)])[2] + E
            return out, chosen
        router = block.router if kind == "aria" else block.gate
        return block(x), router(flat)[2]


def _chosen(routing, tokens: int) -> torch.Tensor:
    order = torch.argsort(routing.token * 1000 + routing.expert)
    return routing.expert[order].view(tokens, -1)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_blocks_convert_both_ways_exactly(kind):
    torch.manual_seed(0)
    block = _block(kind).eval()
    _randomise(block, seed=len(kind))
    x = torch.randn(2, 9, D)
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[:, 2:6] = True
    ref, ref_chosen = _reference(kind, block, x, image)
    layer = from_transformers(block)
    assert isinstance(layer, ModalitySeparatedMoE if kind == "ernie4_5_vl_moe" else MoELayer)
    for backend in DISPATCHERS.names():
        layer.set_backend(backend)
        with torch.no_grad():
            out = layer(x, modality=image)
        assert (out.output - ref).abs().max().item() <= 1e-5, backend
        assert torch.equal(_chosen(out.routing, 18), ref_chosen.sort(-1).values), backend
    back = to_transformers(layer, kind=kind)
    assert type(back) is type(block)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), block.state_dict().values()))
    view = to_transformers(layer, kind=kind, copy=False)  # what a checkpoint writer uses: the layer's own storage
    w_in = layer.text.experts.w_in if kind == "ernie4_5_vl_moe" else layer.experts.w_in
    assert any(t.untyped_storage().data_ptr() == w_in.untyped_storage().data_ptr() for t in view.state_dict().values())


def test_llama4_gates_the_expert_input_and_the_loop_oracle_agrees():
    """Llama 4 scales what the expert reads: expert(g x) != g expert(x) for a SwiGLU expert, so the zoo layer follows
    it only with gate_input; every backend gives the same outputs and input gradients."""
    cfg = dict(hidden_size=D, expert_size=F, num_experts=4, top_k=1, router="sigmoid_topk", renormalize=False)
    torch.manual_seed(1)
    gated = MoELayer(MoEConfig(gate_input=True, **cfg))
    plain = MoELayer(MoEConfig(**cfg))
    plain.load_state_dict(gated.state_dict())
    x = torch.randn(13, D)
    with torch.no_grad():
        g = torch.sigmoid(x @ gated.router.weight.t()).max(-1).values
        e = (x @ gated.router.weight.t()).argmax(-1)
        expected = torch.stack([gated.experts.forward_expert(int(e[t]), g[t] * x[t:t + 1])[0] for t in range(13)])
        torch.testing.assert_close(gated(x).output, expected, rtol=0, atol=1e-6)
        assert (plain(x).output - expected).abs().max() > 1e-3
    grads = []
    for backend in DISPATCHERS.names():
        gated.set_backend(backend)
        xb = x.clone().requires_grad_(True)
        gated(xb).output.square().sum().backward()
        grads.append(xb.grad)
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-6)


def test_modality_separated_layer_routes_each_modality_to_its_own_experts():
    text = MoEConfig(hidden_size=D, expert_size=F, num_experts=4, top_k=2, router="softmax_bias")
    image = MoEConfig(hidden_size=D, expert_size=F - 4, num_experts=3, top_k=2, router="softmax_bias")
    layer = ModalitySeparatedMoE(text, image, shared_size=F)
    x = torch.randn(2, 7, D)
    modality = torch.zeros(2, 7, dtype=torch.bool)
    modality[0, 1:4] = True
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 5:] = False
    out = layer(x, padding_mask=padding, modality=modality)
    stats = out.stats
    assert stats.kept.numel() == 7 and stats.by_modality["image"].tokens == 3 and stats.by_modality["text"].tokens == 9
    assert int(stats.by_modality["image"].kept[:4].sum()) == 0 and int(stats.by_modality["text"].kept[4:].sum()) == 0
    assert int(stats.kept.sum()) == 2 * 12  # two slots per real token
    assert set(out.aux_losses) == {"balance_text", "balance_image", "z_loss_text", "z_loss_image"}
    with torch.no_grad():
        alone = layer.image(x[modality]).output + layer.shared(x[modality])
    torch.testing.assert_close(out.output[modality], alone)
    # without a modality mask every token is text (ERNIE with no image in the batch)
    everything = layer(x)
    assert everything.stats.by_modality["image"].tokens == 0 and int(everything.stats.kept[4:].sum()) == 0
