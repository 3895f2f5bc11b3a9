"""Sparse vision experts (``vision.sparsity``, CuMo's CLIP-MoE): every transformer block's MLP upcycled into experts.
Co-upcycled towers equal their dense source for any routing; aux losses at a zero router; a model sparsified at a
stage boundary keeps its logits, adds the vision aux losses with their coefficients, reports routing per block,
trains its routers, saves and reloads. Tiny hf / timm / open_clip towers built from configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomise, tiny_config
from test_fusion import CLIP, CONVNEXT, DINO, _experts, _images

import zoo
from zoo.config import ConfigError, FusionConfig, SparsityConfig, VisionConfig, from_dict
from zoo.encoders import build_encoder
from zoo.encoders.base import sparsify_expert
from zoo.lm.sparse import SparseFFN
from zoo.params import param_counts

CUMO = {"preset": "cumo"}
OPEN_CLIP = {"kind": "open_clip", "name": "ViT-L-14-336", "feature_layer": -1, "kwargs": {
    "vision_cfg": {"width": 64, "layers": 3, "head_width": 32, "patch_size": 14, "image_size": 56}}}


def _policy(**fields):
    return from_dict(SparsityConfig, {**CUMO, **fields}, path="vision.sparsity")


def _randomise_routers(module, std=2.0, seed=1):
    randomise(module, "router", std, seed)


@pytest.mark.parametrize("spec", [CLIP, DINO, OPEN_CLIP], ids=["hf-clip", "timm-dinov2", "open_clip"])
def test_co_upcycled_tower_equals_its_dense_source_for_any_routing(spec):
    config = from_dict(VisionConfig, {**spec, "frozen": False}, path="vision")
    torch.manual_seed(0)
    dense = build_encoder(config).eval()
    sparse = copy.deepcopy(dense)
    blocks = sparsify_expert(sparse, _policy())
    assert blocks == list(range(len(blocks))) and blocks  # every block the expert runs (timm prunes the rest)
    _randomise_routers(sparse)
    x = torch.randn(3, 3, dense.image_size, dense.image_size)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=1e-5)
    moe = [m for m in sparse.modules() if isinstance(m, SparseFFN)]
    assert all(m.moe.config.num_experts == 4 and m.moe.config.top_k == 2 for m in moe)
    first = moe[0].last.stats
    assert int(first.assigned.sum()) == 2 * first.tokens  # top-2 of every token of every image


def test_aux_losses_at_a_zero_router_are_averaged_over_blocks():
    torch.manual_seed(0)
    config = tiny_config()
    config.vision = from_dict(VisionConfig, {**CLIP, "frozen": False, "sparsity": CUMO}, path="vision")
    model = zoo.build(config).eval()
    with torch.no_grad():
        for name, p in model.vision.named_parameters():
            if "router" in name:
                p.zero_()
    batch = _batch(model)
    with torch.no_grad():
        out = model(**batch)
    assert out.aux_losses["vision.z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-5)  # 1.9218, mean
    assert out.aux_losses["vision.balance"].item() == pytest.approx(1.0, abs=1e-6)
    expected = out.lm_loss + 0.1 * out.aux_losses["vision.balance"] + 0.01 * out.aux_losses["vision.z_loss"]
    torch.testing.assert_close(out.loss, expected)
    # the features are hidden_states[-2]: the last block stays dense (and frozen), it never feeds them
    depth = config.vision.kwargs["num_hidden_layers"]
    assert set(out.routing_stats) == {f"vision.layers.{i}" for i in range(depth - 1)}
    last = [p for n, p in model.vision.named_parameters() if f"layers.{depth - 1}." in n]
    assert last and not any(p.requires_grad or "router" in n for n, p in model.vision.named_parameters()
                            if f"layers.{depth - 1}." in n)


def _batch(model, n=4):
    from zoo.train.data import VQASample, VQASplit, VQATrainingSet

    split = VQASplit(_images(n), [VQASample(i, "what color is the shape?", "red", str(i)) for i in range(n)])
    data = VQATrainingSet(model, split)
    return data.collate([data[i] for i in range(n)])


def test_cumo_stage_boundary_sparsifies_clip_keeps_logits_trains_routers_and_reloads(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    config.vision = _experts({**CLIP, "frozen": False}, {**DINO, "frozen": False})
    config.fusion = FusionConfig(mode="sequence", resample="none")
    model = zoo.build(config)
    batch = _batch(model)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    assert model.sparsify_vision(CUMO, experts=[0]) == {"vision.0": [0, 1]}  # block 2 of 3 never feeds the features
    _randomise_routers(model.vision)
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.logits, before, rtol=0, atol=1e-5)
    assert {"vision.0.balance", "vision.0.z_loss"} <= set(out.aux_losses)
    assert not any(k.startswith("vision.1.") for k in out.aux_losses)
    assert {"vision.0.layers.0", "vision.0.layers.1"} <= set(out.routing_stats)
    assert model.config.vision[0].sparsity.preset == "cumo" and model.config.vision[1].sparsity is None
    counts = param_counts(model)
    assert counts.parts["vision"][1] < counts.parts["vision"][0]  # 2 of 4 experts active per token

    model.train()
    out = model(**batch)
    out.loss.backward()
    routers = [(n, p) for n, p in model.vision.named_parameters() if "router" in n and p.requires_grad]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in routers)

    model.eval()
    model.save_pretrained(tmp_path / "m")
    again = zoo.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    assert again.config.vision[0].sparsity == model.config.vision[0].sparsity


def test_what_cannot_be_made_sparse_names_the_field():
    config = tiny_config()
    config.vision = _experts({**CLIP, "frozen": False}, CONVNEXT)
    config.fusion = FusionConfig(mode="sequence", resample="none")
    model = zoo.build(config)
    with pytest.raises(ConfigError, match=r"^vision\[1\]\.sparsity: the timm expert convnext_atto cannot be made sparse \(Conv2d: not a linear"):
        model.sparsify_vision(CUMO, experts=[1])
    model.sparsify_vision(CUMO, experts=[0])
    with pytest.raises(ValueError, match=r"^vision\[0\]\.sparsity: the expert is already sparse"):
        model.sparsify_vision(CUMO, experts=[0])
    bad = tiny_config()
    bad.vision = from_dict(VisionConfig, {**CLIP, "sparsity": {**CUMO, "layers": [7]}}, path="vision")
    with pytest.raises(ConfigError, match=r"^vision\.sparsity\.layers: index 7 out of range for a 3-layer model"):
        zoo.build(bad)
    bad.vision.sparsity.layers = [2]
    with pytest.raises(ConfigError, match=r"^vision\.sparsity\.layers: block 2 never affects the output"):
        zoo.build(bad)
