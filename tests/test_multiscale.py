"""S2 multi-scale features (zoo.encoders.multiscale): chessboard split/merge, CuMo's 1 + 3 scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image

import zoo
from zoo.config import ConfigError, VisionConfig, from_dict
from zoo.encoders import build_encoder
from zoo.encoders.multiscale import merge_chessboard, split_chessboard

CLIP = {"kind": "hf", "frozen": True, "kwargs": {"model_type": "clip_vision_model", "hidden_size": 32,
                                                 "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "image_size": 56, "patch_size": 14}}


def test_chessboard_split_then_merge_is_the_identity():
    x = torch.randn(2, 5, 72, 72)
    crops = split_chessboard(x, 3)
    assert crops.shape == (18, 5, 24, 24)
    assert torch.equal(crops[0 * 2 + 1], x[1, :, :24, :24])       # crop (0, 0) of image 1
    assert torch.equal(crops[5 * 2 + 0], x[0, :, 24:48, 48:72])    # crop (1, 2) of image 0
    assert torch.equal(merge_chessboard(crops, 3), x)


def test_two_scales_concatenate_the_native_and_the_pooled_crop_features():
    torch.manual_seed(0)
    expert = build_encoder(from_dict(VisionConfig, {**CLIP, "scales": [1, 3]}))
    assert expert.width == 64 and expert.num_tokens == 16 and expert.grid == (4, 4)
    image = Image.fromarray((torch.rand(80, 80, 3) * 255).byte().numpy())
    pixels = expert.preprocess([image])
    assert pixels.shape == (1, 3, 168, 168)
    with torch.no_grad():
        out = expert(pixels)
        base = expert.expert
        small = F.interpolate(pixels, size=(56, 56), mode="bicubic", align_corners=False)
        native = base(small)
        crops = [base(pixels[:, :, 56 * r:56 * (r + 1), 56 * c:56 * (c + 1)]) for r in range(3) for c in range(3)]
    assert out.shape == (1, 16, 64)
    assert torch.equal(out[..., :32], native)
    # crop (r, c) covers grid cells [4r, 4r+4) x [4c, 4c+4) of the 12x12 map; pooled 3x3 -> token (i, j)
    big = torch.zeros(1, 32, 12, 12)
    for k, tokens in enumerate(crops):
        r, c = divmod(k, 3)
        big[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = tokens.transpose(1, 2).reshape(1, 32, 4, 4)
    pooled = big.reshape(1, 32, 4, 3, 4, 3).mean((3, 5)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[..., 32:], pooled, rtol=0, atol=1e-6)


def test_multiscale_model_trains_saves_and_reloads(tmp_path):
    config = tiny_config()
    config.vision.scales = [1, 2]
    torch.manual_seed(0)
    model = zoo.build(config)
    assert model.vision.width == 2 * 128 and model.num_image_tokens == 16
    images = [Image.new("RGB", (64, 64), (200, 30, 30))]
    ids, mask = model.collate_prompts([model.encode_prompt("what color is the shape?")])
    pixels = model.vision.preprocess(images)
    assert pixels.shape[-1] == 128
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.load(str(tmp_path / "ckpt")).eval()
    assert loaded.config.vision.scales == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                   model.eval()(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    ({"scales": [2, 3]}, r"scales: expected positive integer scales including 1"),
    ({"scales": [1, 3], "drop_prefix": False}, r"vision\.drop_prefix: multi-scale"),
])
def test_bad_scales_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_encoder(from_dict(VisionConfig, {**CLIP, **bad}, path="vision"))


def test_a_frozen_expert_in_bf16_feeds_an_fp32_connector():
    config = tiny_config()
    config.vision.frozen, config.vision.dtype = True, "bfloat16"
    torch.manual_seed(0)
    model = zoo.build(config)
    assert {p.dtype for p in model.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.connector.parameters()} == {torch.float32}
    images = [Image.new("RGB", (64, 64), (30, 200, 30))]
    ids, mask = model.collate_prompts([model.encode_prompt("what color is the shape?")])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=model.vision.preprocess(images), labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.float32 and model.connector.layers[0].weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())
