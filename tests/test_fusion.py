"""Several vision experts fused (zoo.encoders.fusion): grid alignment, channel and sequence fusion, per-expert
preprocessing, training with frozen experts, save and reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.config import ConfigError, FusionConfig, VisionConfig, from_dict
from zoo.encoders import FusedVision, align_grid, build_encoder

CLIP = {"kind": "hf", "kwargs": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 56,
                                 "patch_size": 14}, "frozen": True}                                  # 4x4, CLS
SIGLIP = {"kind": "hf", "kwargs": {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 42,
                                   "patch_size": 14}, "frozen": True}                                # 3x3, no CLS
DINO = {"kind": "timm", "name": "vit_large_patch14_reg4_dinov2", "image_size": 70,
        "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}, "frozen": True}                    # 5x5, 5 prefix
CONVNEXT = {"kind": "timm", "name": "convnext_atto", "image_size": 64, "feature_layer": -1,
            "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 40]}, "frozen": True}            # 2x2


def _experts(*specs):
    return [from_dict(VisionConfig, dict(s), path=f"vision[{i}]") for i, s in enumerate(specs)]


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


# --- grid alignment -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bilinear", "area"])
def test_constant_maps_stay_constant(mode):
    tokens = torch.full((2, 37 * 37, 5), 0.7)
    out = align_grid(tokens, (37, 37), (24, 24), mode)
    assert out.shape == (2, 576, 5)
    torch.testing.assert_close(out, torch.full_like(out, 0.7), rtol=0, atol=1e-6)


def test_area_resampling_is_three_by_three_mean_pooling():
    torch.manual_seed(0)
    tokens = torch.randn(2, 72 * 72, 4)
    out = align_grid(tokens, (72, 72), (24, 24), "area")
    maps = tokens.transpose(1, 2).reshape(2, 4, 72, 72)
    ref = maps.reshape(2, 4, 24, 3, 24, 3).mean((3, 5)).flatten(2).transpose(1, 2)
    assert torch.equal(out, F.avg_pool2d(maps, 3).flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_bilinear_keeps_a_ramp_ordered_and_bf16_is_resampled_in_fp32():
    ramp = torch.arange(37.0).repeat(37).view(1, 37 * 37, 1)  # value = column index
    out = align_grid(ramp, (37, 37), (24, 24)).view(24, 24)
    # align_corners=False samples column j at source x = (j + 0.5) * 37 / 24 - 0.5; a ramp interpolates exactly
    expected = ((torch.arange(24) + 0.5) * 37 / 24 - 0.5).clamp(0, 36)
    torch.testing.assert_close(out, expected.expand(24, 24), rtol=0, atol=1e-5)
    low = align_grid(ramp.bfloat16(), (37, 37), (24, 24))
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, out.view(1, 576, 1).bfloat16())


# --- fusion ---------------------------------------------------------------------------------------------------

def test_channel_fusion_of_unequal_grids_without_alignment_names_the_field():
    with pytest.raises(ConfigError, match=r"^fusion\.resample: channel fusion needs equal grids, got vision\[0\] "
                                          r"4x4, vision\[1\] 5x5"):
        FusedVision(_experts(CLIP, DINO), FusionConfig(mode="channel", resample="none"))
    with pytest.raises(ConfigError, match=r"vision\[0\]\.drop_prefix"):
        FusedVision(_experts({**CLIP, "drop_prefix": False}, DINO), FusionConfig(mode="channel", grid=4))


def test_channel_fusion_concatenates_aligned_expert_features():
    torch.manual_seed(0)
    tower = FusedVision(_experts(CLIP, DINO), FusionConfig(mode="channel", grid=4)).eval()
    assert tower.width == 32 + 64 and tower.num_tokens == 16
    images = _images()
    pixels = tower.preprocess(images)
    assert pixels["0"].shape == (3, 3, 56, 56) and pixels["1"].shape == (3, 3, 70, 70)
    with torch.no_grad():
        fused = tower(pixels)
        clip = tower.experts[0](pixels["0"])
        dino = tower.experts[1](pixels["1"])
    assert fused.shape == (3, 16, 96)
    assert torch.equal(fused[..., :32], clip)
    assert torch.equal(fused[..., 32:], align_grid(dino, (5, 5), (4, 4)))


def test_each_expert_preprocesses_with_its_own_constants():
    tower = FusedVision(_experts(CLIP, DINO), FusionConfig(mode="sequence"))
    gray = Image.new("RGB", (40, 30), (128, 128, 128))
    pixels = tower.preprocess([gray])
    for key, expert in zip(("0", "1"), tower.experts):
        centre = pixels[key][0, :, pixels[key].shape[-1] // 2, pixels[key].shape[-1] // 2]
        expected = (128 / 255 - torch.tensor(expert.mean)) / torch.tensor(expert.std)
        torch.testing.assert_close(centre, expected.float(), rtol=0, atol=1e-5)
    assert tower.experts[0].mean != tower.experts[1].mean  # OpenAI CLIP vs ImageNet constants


def test_sequence_fusion_keeps_every_expert_and_its_ids():
    tower = FusedVision(_experts(CLIP, SIGLIP, DINO, CONVNEXT), FusionConfig(mode="sequence", resample="none"))
    assert tower.width == [32, 48, 64, 40]
    assert tower.num_tokens == 16 + 9 + 25 + 4
    assert torch.bincount(tower.expert_ids).tolist() == [16, 9, 25, 4]
    with torch.no_grad():
        out = tower(tower.preprocess(_images(2)))
    assert [tuple(t.shape) for t in out] == [(2, 16, 32), (2, 9, 48), (2, 25, 64), (2, 4, 40)]
    aligned = FusedVision(_experts(CLIP, DINO), FusionConfig(mode="sequence", grid=3, resample="area"))
    assert aligned.num_tokens == 9 + 9


def test_pixels_of_the_wrong_form_are_clear_errors():
    tower = FusedVision(_experts(CLIP, DINO), FusionConfig(mode="sequence"))
    pixels = tower.preprocess(_images(2))
    with pytest.raises(TypeError, match="pixel_values: a multi-expert tower takes a dict"):
        tower(pixels["0"])
    with pytest.raises(ValueError, match=r"expected keys \['0', '1'\]"):
        tower({"0": pixels["0"]})
    with pytest.raises(ValueError, match="different numbers of images"):
        tower({"0": pixels["0"], "1": pixels["1"][:1]})


# --- whole models ---------------------------------------------------------------------------------------------

def _fused_config(specs, fusion):
    config = tiny_config(name="tiny-fused")
    config.vision = _experts(*specs)
    config.fusion = from_dict(FusionConfig, fusion, path="fusion")
    return config


@pytest.mark.parametrize("specs, fusion", [
    ((CLIP, DINO), {"mode": "channel", "grid": 4}),
    ((CLIP, SIGLIP, DINO, CONVNEXT), {"mode": "sequence", "resample": "none"}),
], ids=["clip+dino-channel", "four-experts-sequence"])
def test_fused_models_train_with_frozen_experts(specs, fusion, easy_vqa, tmp_path):
    from zoo.train import TrainConfig, VQATrainingSet, fit

    torch.manual_seed(0)
    model = zoo.build(_fused_config(specs, fusion))
    split = type(easy_vqa["train"])(easy_vqa["train"].images, easy_vqa["train"].samples[:96])
    dataset = VQATrainingSet(model, split)
    batch = dataset.collate([dataset[i] for i in range(32)])
    with torch.no_grad():
        before_loss = model(**batch).loss.item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = fit(model, dataset, TrainConfig(steps=3, batch_size=32, lr=3e-3), progress=False)
    with torch.no_grad():
        after_loss = model.eval()(**batch).loss.item()
    assert after_loss < before_loss
    after = model.state_dict()
    vision = [k for k in after if k.startswith("vision.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert all(p.grad is None for p in model.vision.parameters())
    optimizer = module.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]} | set(map(id, optimizer.state))
    assert not in_optimizer & {id(p) for p in model.vision.parameters()}
    # the checkpoint rebuilds the fused tower (a list of experts) with the same outputs
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.load(str(tmp_path / "ckpt")).eval()
    assert isinstance(loaded.config.vision, list) and len(loaded.config.vision) == len(specs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    answers = loaded.answer(_images(2), ["what shape is this?", "what color is the shape?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_single_expert_model_rejects_per_expert_pixels():
    model = zoo.build(tiny_config())
    pixels = model.vision.preprocess(_images(1))
    ids, mask = model.collate_prompts([model.encode_prompt("what shape is this?")])
    with pytest.raises(TypeError, match="single-expert model"):
        model(input_ids=ids, attention_mask=mask, pixel_values={"0": pixels})


def test_build_encoder_still_builds_one_expert():
    expert = build_encoder(_experts(DINO)[0])
    assert expert.num_prefix_tokens == 5 and expert.num_tokens == 25
