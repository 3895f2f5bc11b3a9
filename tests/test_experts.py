"""The Experts view (`zoo.experts`): where each image patch and text token went, read from `ZooOutput.routing_stats`,
checked against the routers recomputed from their own inputs (captured with a forward hook)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise, tiny_config
from PIL import Image

import zoo
from zoo.experts import expert_colour, expert_map, heatmap


def router_choices(router, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts and their renormalised softmax gates, recomputed from a router's weight ``[E, d]``."""
    probs = torch.nn.functional.linear(tokens.float(), router.weight.float()).softmax(-1)
    top = probs.topk(k, dim=-1)
    return top.indices, top.values / top.values.sum(-1, keepdim=True)


def capture_input(module: torch.nn.Module, run):
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]  # the last call (a multi-scale tower runs its blocks once per scale)


@pytest.fixture(scope="module")
def random_routers():
    """A fresh sparse tiny-llava (MoE-LLaVA's layout, dropless) with random routers, and a noise image whose patches
    go to different experts, so a transposed or shifted grid cannot pass. (The trained demo-style checkpoint sends
    every patch of its test image to one expert: its routers specialised by modality.)"""
    import numpy as np

    torch.manual_seed(0)
    model = zoo.build(tiny_config()).eval()
    model.sparsify({"layers": "every_other_even", "init": "upcycle",
                    "moe": {"num_experts": 4, "top_k": 2, "router": "softmax_topk", "renormalize": True}})
    randomise(model, "router", std=1.0, seed=1)
    return model, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture
def trained(demo_checkpoint):
    return demo_checkpoint["model"], Image.open(demo_checkpoint["image"]).convert("RGB")


@pytest.mark.parametrize("which", ["trained", "random_routers"])
def test_lm_layer_patches_and_text_tokens_follow_the_router(request, which):
    model, image = request.getfixturevalue(which)
    ids = model.encode_prompt("what color is the shape?") + model.encode_answer("red")[:-1]
    sparse = model.lm.model.layers[0].mlp
    hidden = capture_input(sparse, lambda: expert_map(model, image, ids))  # [1, T', d]: what the router read
    (layer,) = expert_map(model, image, ids)
    assert layer.name == "lm.layers.0" and layer.num_experts == 4 and layer.grid.shape == (4, 4)  # 4x4 ConvNeXt grid
    experts, gates = router_choices(sparse.moe.router, hidden[0], k=2)
    image_positions = torch.arange(1, 17)  # <s> then the image block (prompt "<image>\n{question}")
    assert torch.equal(layer.experts.reshape(16, 2), experts[image_positions])
    torch.testing.assert_close(layer.weights.reshape(16, 2), gates[image_positions])
    assert torch.equal(layer.grid.flatten(), experts[image_positions, 0])
    text_positions = [0, *range(17, hidden.shape[1])]
    tokens = ["<s>", *model.tokenizer.convert_ids_to_tokens(ids[2:])]
    assert layer.text == list(zip(tokens, experts[text_positions, 0].tolist()))
    assert tokens[-1] == "red"  # the answer's tokens are part of the view
    if which == "random_routers":
        assert len(set(layer.grid.flatten().tolist())) > 2  # the patches went to different experts
    assert layer.patch_rows()[5] == [1, 1, *(f"expert {int(e)}: {float(w):.2f}" for e, w in
                                             zip(layer.experts[1, 1], layer.weights[1, 1]))]


def test_heatmap_has_one_cell_per_patch_in_its_experts_colour(random_routers):
    model, image = random_routers
    (layer,) = expert_map(model, image, model.encode_prompt("is there a circle?"))
    assert len(set(layer.grid.flatten().tolist())) > 2
    picture = heatmap(layer, cell=20)
    assert picture.size == (4 * 20, 4 * 20)
    for r in range(4):
        for c in range(4):
            assert picture.getpixel((c * 20 + 10, r * 20 + 10)) == expert_colour(int(layer.grid[r, c]), 4)
    assert len({expert_colour(e, 4) for e in range(4)}) == 4 and expert_colour(-1, 4) != expert_colour(0, 4)


def test_vision_blocks_and_moe_connector_on_their_patch_grids():
    """CuMo's layout: a CLIP-MoE tower read at scales 1 and 3 (2x2 patches + CLS per crop) and an MLP-MoE connector."""
    torch.manual_seed(0)
    model = zoo.build("cumo-mistral-7b-tiny").eval()
    randomise(model, "router", std=1.0, seed=1)
    image = Image.new("RGB", (40, 40), (30, 160, 60))
    ids = model.encode_prompt("what shape is it?")
    inner = model.vision.expert
    blocks = [m for m in model.modules() if type(m).__name__ == "SparseFFN"]
    view = {layer.name: layer for layer in expert_map(model, image, ids)}
    assert list(view) == [*(f"vision.layers.{i}" for i in range(len(blocks))), "connector"]
    block_input = capture_input(blocks[0], lambda: expert_map(model, image, ids))  # the last call: 9 crops of 1 image
    assert block_input.shape[:2] == (9, 1 + 4)  # CLS + 2x2 patches per crop
    experts, _ = router_choices(blocks[0].moe.router, block_input[:, 1:].reshape(-1, block_input.shape[-1]), k=2)
    crops = experts[:, 0].reshape(3, 3, 2, 2)  # crop row, crop col, patch row, patch col
    merged = crops.permute(0, 2, 1, 3).reshape(6, 6)
    assert torch.equal(view["vision.layers.0"].grid, merged) and inner.grid == (2, 2)
    features = capture_input(model.connector, lambda: expert_map(model, image, ids))  # [1, 4, C]
    experts, gates = router_choices(model.connector.router, features[0], k=2)
    assert view["connector"].grid.shape == (2, 2)
    assert torch.equal(view["connector"].experts.reshape(4, 2), experts)
    torch.testing.assert_close(view["connector"].weights.reshape(4, 2), gates)
    assert view["connector"].text is None


def test_dense_model_has_no_routed_layer(trained_model):
    model = trained_model["model"]
    assert expert_map(model, Image.new("RGB", (64, 64)), model.encode_prompt("what shape?")) == []


@pytest.mark.parametrize("count, grid, expected", [(16, (4, 4), (4, 4)), (36, (4, 4), (6, 6)), (5, None, (1, 5))])
def test_patch_grid(count, grid, expected):
    from zoo.experts import patch_grid

    assert patch_grid(count, grid) == expected
