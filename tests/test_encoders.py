"""Vision experts per kind: parity with timm / transformers / open_clip on the same weights, token counts and
preprocessing of every named expert's tiny twin, bad images, resolved configs. Offline: tiny random models only.

CLIP through transformers (``hidden_states[-2][:, 1:]``) and a timm ViT against a manual block loop are covered in
test_model.py.
"""

import io
import json
import warnings

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from zoo.config import ConfigError, VisionConfig, from_dict, to_dict
from zoo.encoders import VISION_EXPERTS, build_encoder, expert_config
from zoo.encoders.hf_expert import HFVisionTower
from zoo.registry import UnknownPartError

OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# (prefix tokens, (mean, std)) of every tiny twin, stated here independently of the registry.
TWINS = {
    "clip-vit-l-14-336-tiny": (1, OPENAI),
    "siglip-so400m-14-384-tiny": (0, HALF),
    "dinov2-vit-l-14-tiny": (1, IMAGENET),
    "dinov2-vit-l-14-reg4-tiny": (5, IMAGENET),
    "convnext-xxl-clip-tiny": (0, OPENAI),
    "sam-vit-b-tiny": (0, IMAGENET),
    "biomedclip-tiny": (1, OPENAI),
}


def test_every_named_expert_has_a_tiny_twin_listed_here():
    names = set(VISION_EXPERTS)
    assert {n for n in names if n.endswith("-tiny")} == set(TWINS)
    assert {n for n in names if not n.endswith("-tiny")} == {n.removesuffix("-tiny") for n in TWINS}
    for name in TWINS:
        real, twin = expert_config(name.removesuffix("-tiny")), expert_config(name)
        assert real.pretrained and not twin.pretrained and real.kind == twin.kind


@pytest.mark.parametrize("name", TWINS)
def test_tiny_twin_tokens_preprocessing_and_resolved_config(name):
    prefix, (mean, std) = TWINS[name]
    torch.manual_seed(0)
    expert = build_encoder(expert_config(name)).eval()
    assert expert.num_prefix_tokens == prefix
    assert expert.num_tokens == expert.grid[0] * expert.grid[1]
    assert expert.mean == pytest.approx(mean) and expert.std == pytest.approx(std)
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    images = [red, red.convert("L"), red.convert("RGBA"), red.convert("CMYK"), red.convert("P")]
    pixels = expert.preprocess(images)
    side = expert.image_size
    assert pixels.shape == (5, 3, side, side) and torch.isfinite(pixels).all()
    with torch.no_grad():
        tokens = expert(pixels)
    assert tokens.shape == (5, expert.num_tokens, expert.width) and torch.isfinite(tokens).all()
    # With the prefix kept, the count grows by exactly the stated number of prefix tokens.
    keep = build_encoder(expert_config(name, drop_prefix=False)).eval()
    keep.load_state_dict(expert.state_dict())
    with torch.no_grad():
        assert keep(pixels).shape == (5, expert.num_tokens + prefix, expert.width)
    # The resolved config survives JSON and rebuilds the same architecture with no file or download.
    resolved = from_dict(VisionConfig, json.loads(json.dumps(to_dict(expert.resolved_config()))), "vision")
    rebuilt = build_encoder(resolved)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in expert.state_dict().items()}
    assert (rebuilt.mean, rebuilt.std, rebuilt.image_size) == (expert.mean, expert.std, expert.image_size)


@pytest.mark.parametrize("name", TWINS)
def test_every_trainable_parameter_of_a_tiny_twin_gets_a_gradient(name):
    torch.manual_seed(0)
    expert = build_encoder(expert_config(name)).train()
    expert(torch.randn(2, 3, expert.image_size, expert.image_size)).square().mean().backward()
    assert [n for n, p in expert.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = sorted(n for n, p in expert.named_parameters() if not p.requires_grad)
    if isinstance(expert, HFVisionTower):  # what hidden_states[-2] cannot reach is frozen, nothing else
        depth = expert.hf_config.num_hidden_layers
        later = [n for n in frozen if f"encoder.layers.{depth - 1}." in n]
        rest = {n.split(".")[1] for n in frozen if n not in later}
        assert later and rest == ({"post_layernorm", "head"} if "siglip" in name else {"post_layernorm"})
    else:
        assert frozen == []


# ------------------------------------------------------------------ timm
def test_timm_dinov2_reg4_drops_cls_and_four_registers():
    torch.manual_seed(0)
    expert = build_encoder(expert_config("dinov2-vit-l-14-reg4-tiny")).eval()
    ref = timm.create_model("vit_large_patch14_reg4_dinov2", img_size=56, num_classes=0,
                            embed_dim=64, depth=3, num_heads=2).eval()
    missing, unexpected = ref.load_state_dict(expert.model.state_dict(), strict=False)
    assert missing and all(k.startswith(("blocks.2.", "norm.")) for k in missing) and unexpected == []
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        h = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))  # [CLS, 4 registers, 16 patches]
        for block in ref.blocks[:2]:  # hidden_states[-2] of 3 blocks
            h = block(h)
        tokens = expert(x)
    assert h.shape[1] == 21 and tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens, h[:, 5:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("feature_layer, stage", [(-1, 3), (1, 1)])
def test_timm_convnext_stage_map_flattened_row_major(feature_layer, stage):
    torch.manual_seed(0)
    kwargs = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    expert = build_encoder(VisionConfig(kind="timm", name="convnext_xxlarge", kwargs=kwargs, image_size=64,
                                        feature_layer=feature_layer)).eval()
    assert len(expert.model.stages) == stage + 1  # later stages are pruned
    ref = timm.create_model("convnext_xxlarge", num_classes=0, **kwargs).eval()
    ref.load_state_dict(expert.model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = ref.stages[:stage + 1](ref.stem(x))  # [B, C, h, w]
        tokens = expert(x)
    b, c, h, w = fmap.shape
    assert expert.grid == (h, w) and expert.width == c and tokens.shape == (b, h * w, c)
    for r, col in [(0, 0), (0, w - 1), (h - 1, 0)]:
        torch.testing.assert_close(tokens[:, r * w + col], fmap[:, :, r, col], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ transformers
HF_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
           "image_size": 56, "patch_size": 14}


@pytest.mark.parametrize("model_type, prefix, norm", [
    ("siglip_vision_model", 0, HALF),
    pytest.param("dinov2", 1, IMAGENET),
    pytest.param("dinov2_with_registers", 5, IMAGENET),
])
def test_hf_tower_matches_hidden_states_minus_two_without_prefix(model_type, prefix, norm):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    expert = build_encoder(VisionConfig(kind="hf", kwargs={"model_type": model_type, **HF_TINY})).eval()
    ref = AutoModel.from_config(AutoConfig.for_model(model_type, **HF_TINY)).eval()
    assert ref.load_state_dict(expert.model.state_dict(), strict=False).unexpected_keys == []
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, prefix:]
        tokens = expert(x)
    assert expected.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    assert expert.num_prefix_tokens == prefix
    assert expert.mean == pytest.approx(norm[0]) and expert.std == pytest.approx(norm[1])


# ------------------------------------------------------------------ open_clip
TINY_VIT = {"width": 64, "layers": 2, "head_width": 32, "patch_size": 14, "image_size": 56}  # 2 heads, 4x4 grid
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


@pytest.mark.parametrize("drop_prefix", [True, False])
def test_open_clip_vit_matches_its_own_resblock_outputs(drop_prefix):
    from open_clip.transformer import QuickGELU

    torch.manual_seed(0)
    config = VisionConfig(kind="open_clip", name="ViT-L-14-336", drop_prefix=drop_prefix,
                          kwargs={"pretrained_tag": "openai", "vision_cfg": TINY_VIT})
    expert = build_encoder(config).eval()
    assert len(expert.model.transformer.resblocks) == 1  # feature_layer -2 of 2 blocks; block 1 is pruned
    assert expert.model.proj is None and not list(expert.model.ln_post.parameters())
    assert isinstance(expert.model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # the openai tag says so
    ref = open_clip.model.CLIP(embed_dim=32, vision_cfg=TINY_VIT, text_cfg=TINY_TEXT, quick_gelu=True).eval()
    missing, unexpected = expert.model.load_state_dict(ref.visual.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith(("transformer.resblocks.1.", "ln_post.", "proj"))
                                                for k in unexpected)
    seen = []
    ref.visual.transformer.resblocks[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref.encode_image(x)
        tokens = expert(x)
    block_out = seen[0] if ref.visual.transformer.batch_first else seen[0].transpose(0, 1)
    assert block_out.shape == (2, 17, 64)
    torch.testing.assert_close(tokens, block_out[:, 1:] if drop_prefix else block_out, rtol=0, atol=1e-6)
    assert expert.mean == pytest.approx(OPENAI[0]) and expert.image_size == 56 and expert.grid == (4, 4)


@pytest.mark.parametrize("name, kwargs, quick", [
    ("ViT-L-14-336", {}, False),
    ("ViT-L-14-336-quickgelu", {}, True),
    ("ViT-L-14-336", {"pretrained_tag": "openai", "quick_gelu": False}, False),
])
def test_open_clip_quick_gelu_follows_name_tag_and_override(name, kwargs, quick):
    from open_clip.transformer import QuickGELU

    expert = build_encoder(VisionConfig(kind="open_clip", name=name, kwargs={**kwargs, "vision_cfg": TINY_VIT}))
    assert isinstance(expert.model.transformer.resblocks[0].mlp.gelu, QuickGELU) == quick


def _write_open_clip_dir(path, vision_cfg, preprocess_cfg):
    """A ``local-dir:`` model as open_clip saves one: open_clip_config.json and the full CLIP weights."""
    torch.manual_seed(0)
    model_cfg = {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": TINY_TEXT}
    model = open_clip.model.CLIP(**model_cfg).eval()
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model


@pytest.mark.parametrize("tower", ["vit", "timm_convnext"])
def test_open_clip_local_dir_weights_and_resolved_config_round_trip(tmp_path, tower):
    vision_cfg = TINY_VIT if tower == "vit" else {"timm_model_name": "test_convnext", "timm_pool": "",
                                                  "timm_proj": "linear", "image_size": 64}
    ref = _write_open_clip_dir(tmp_path / "clip", vision_cfg, {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]})
    name = f"local-dir:{tmp_path / 'clip'}"
    expert = build_encoder(VisionConfig(kind="open_clip", name=name, pretrained=True, feature_layer=-1)).eval()
    random_twin = build_encoder(VisionConfig(kind="open_clip", name=name, feature_layer=-1))
    assert expert.mean == random_twin.mean == (0.1, 0.2, 0.3) and expert.std == (0.3, 0.2, 0.1)
    x = torch.randn(2, 3, expert.image_size, expert.image_size)
    with torch.no_grad():
        tokens = expert(x)
        if tower == "vit":  # feature_layer -1: the last block, before ln_post
            h = ref.visual._embeds(x)
            expected = ref.visual.transformer(h)[:, 1:]
        else:  # the trunk's last stage, through open_clip's own timm adapter
            fmap = ref.visual.forward_intermediates(x, indices=[3], intermediates_only=True)["image_intermediates"][0]
            expected = fmap.flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)

    saved = tmp_path / "vision.json"
    saved.write_text(json.dumps(to_dict(expert.resolved_config())))
    for file in (tmp_path / "clip").iterdir():
        file.unlink()
    (tmp_path / "clip").rmdir()
    rebuilt = build_encoder(from_dict(VisionConfig, json.loads(saved.read_text()), "vision")).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in expert.state_dict().items()}
    rebuilt.load_state_dict(expert.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), tokens, rtol=0, atol=0)
    assert (rebuilt.mean, rebuilt.std) == (expert.mean, expert.std)


@pytest.mark.parametrize("config, error, match", [
    (dict(name="ViT-L-14-336", kwargs={"pretrained_tga": "openai"}), ValueError,
     r"vision\.kwargs\.pretrained_tga: unknown open_clip option; did you mean 'pretrained_tag'\?"),
    (dict(name="ViT-L-14-336", kwargs={"pretrained_tag": "laion"}), ValueError,
     r"vision\.kwargs\.pretrained_tag: unknown open_clip tag 'laion' for 'ViT-L-14-336'; known: openai"),
    (dict(name="ViT-L-14-336", pretrained=True, kwargs={"vision_cfg": {"layers": 2}}), ValueError,
     r"vision\.kwargs\.vision_cfg: changes the architecture, so it needs vision\.pretrained false"),
    (dict(name="hf-hub:org/repo", kwargs={"pretrained_tag": "openai"}), ValueError,
     r"vision\.kwargs\.pretrained_tag: 'hf-hub:org/repo' names its weights itself"),
    (dict(name="ViT-L-14-3366"), ValueError, r"vision\.name: unknown open_clip model 'ViT-L-14-3366'; did you mean"),
    (dict(name="local-dir:/nonexistent/clip"), OSError, r"vision\.name: cannot read open_clip_config\.json of"),
    (dict(name="RN50"), ValueError, r"vision\.name: 'RN50' is an open_clip ResNet tower"),
    (dict(name="ViT-L-14-336", kwargs={"timm_kwargs": {"depth": 2}}), ValueError,
     r"vision\.kwargs\.timm_kwargs: 'ViT-L-14-336' is not a timm-backed tower"),
])
def test_open_clip_config_errors_name_the_field(config, error, match):
    with pytest.raises(error, match=match):
        build_encoder(VisionConfig(kind="open_clip", **config))


# ------------------------------------------------------------------ registry and images
def test_expert_config_overrides_and_unknown_names():
    config = expert_config("dinov2-vit-l-14", image_size=224, frozen=True)
    assert (config.kind, config.name, config.image_size, config.frozen) == (
        "timm", "vit_large_patch14_dinov2.lvd142m", 224, True)
    assert expert_config("dinov2-vit-l-14").image_size is None  # the registry entry is not modified
    with pytest.raises(UnknownPartError, match=r"vision\.expert: unknown vision expert 'dinov2-vit-l14'; did you "
                                                r"mean 'dinov2-vit-l-14'\?.*siglip-so400m-14-384"):
        expert_config("dinov2-vit-l14")
    with pytest.raises(ConfigError, match=r"unknown key 'vision\.image_sise'"):
        expert_config("dinov2-vit-l-14", image_sise=224)


def _huge_header_png():
    """A PNG whose header claims 12000 x 12000 pixels (a decompression bomb); PIL opens it lazily, so only the
    header is read."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 1-bit: a few hundred KB compressed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(buffer.getvalue()))


def _truncated_png():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:76]))  # the header parses; the pixel data is cut


@pytest.mark.parametrize("bad, error, match", [
    (lambda: Image.new("RGB", (1, 1)), ValueError, r"image 1: 1x1 pixels is too small"),
    (lambda: Image.new("RGB", (0, 0)), ValueError, r"image 1: 0x0 pixels is too small"),
    (lambda: Image.new("L", (300, 1)), ValueError, r"image 1: 300x1 pixels is too small"),
    (lambda: _huge_header_png(), ValueError, r"image 1: 12000x12000 pixels is too large"),
    (_truncated_png, ValueError, r"image 1: cannot decode the image data \(OSError: image file is truncated"),
    (lambda: b"\x89PNG", TypeError, r"image 1: expected a PIL\.Image, got bytes"),
])
def test_bad_image_names_its_index(bad, error, match):
    expert = build_encoder(expert_config("dinov2-vit-l-14-tiny"))
    with pytest.raises(error, match=match):
        expert.preprocess([Image.new("RGB", (8, 8)), bad()])


def test_named_experts_in_a_model_config_expand_and_round_trip():
    from zoo.config import ConfigError, ModelConfig

    config = ModelConfig.from_dict({"vision": [{"expert": "clip-vit-l-14-336-tiny", "frozen": True},
                                               {"expert": "dinov2-vit-l-14-reg4-tiny", "image_size": 42}],
                                    "fusion": {"mode": "sequence"}})
    clip, dino = config.vision
    assert (clip.kind, clip.frozen, clip.expert) == ("hf", True, "clip-vit-l-14-336-tiny")
    assert dino.kind == "timm" and dino.image_size == 42  # the given field overrides the named default
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^vision\[1\]\.expert: unknown vision expert 'dino'"):
        ModelConfig.from_dict({"vision": [{"expert": "clip-vit-l-14-336-tiny"}, {"expert": "dino"}]})


@pytest.mark.parametrize("width, height", [(56, 28), (28, 56), (56, 27)])
def test_pad_resize_letterboxes_like_llava(width, height):
    """LLaVA-1.5's ``pad``: the image centred on a square of the mean colour, truncated to integers as LLaVA's
    ``expand2square`` and transformers' LlavaImageProcessor do (rounding would move every padding pixel by one grey
    level). Images whose long side is the expert's resolution need no resampling, so the padding alone is compared."""
    from transformers import LlavaImageProcessor

    expert = build_encoder(expert_config("clip-vit-l-14-336-tiny", resize="pad"))
    size = expert.image_size
    processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    image_mean=list(expert.mean), image_std=list(expert.std))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(expert.preprocess([image]), reference, rtol=0, atol=1e-6)
