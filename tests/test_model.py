"""ZooModel: encoders, projector, splicing, labels, checkpoints, generation."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_config

import zoo
from zoo.checkpoint import CheckpointError
from zoo.config import ConnectorConfig, VisionConfig
from zoo.connectors import MLPProjector
from zoo.encoders import build_encoder
from zoo.model import IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.build(tiny_config()).eval()


# ------------------------------------------------------------------ encoders and projector
def test_timm_expert_matches_manual_block_loop():
    torch.manual_seed(0)
    cfg = VisionConfig(kind="timm", name="vit_large_patch14_clip_336.openai",
                       kwargs={"patch_size": 14, "embed_dim": 64, "depth": 3, "num_heads": 2}, image_size=56)
    last = build_encoder(VisionConfig(**{**cfg.__dict__, "feature_layer": -1})).eval()
    expert = build_encoder(cfg).eval()
    assert len(expert.model.blocks) == 2  # the unused last block is pruned
    missing, unexpected = expert.load_state_dict(last.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("model.blocks.2.") for k in unexpected)
    vit = last.model
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks[:2]:  # feature_layer -2 of 3 blocks = output of block index 1
            h = block(h)
        tokens = expert(x)
        last_tokens = last(x)
    assert expert.num_prefix_tokens == 1 and expert.grid == (4, 4)
    assert tokens.shape == (2, 16, 64)  # CLS dropped: 16, not 17
    torch.testing.assert_close(tokens, h[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(tokens, last_tokens)
    assert expert.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_timm_expert_keeps_prefix_when_asked():
    torch.manual_seed(0)
    kwargs = {"patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}
    expert = build_encoder(VisionConfig(kind="timm", name="vit_large_patch14_reg4_dinov2", kwargs=kwargs,
                                        image_size=70, drop_prefix=False)).eval()
    assert expert.num_prefix_tokens == 5 and expert.num_tokens == 25 + 5
    ref = timm.create_model("vit_large_patch14_reg4_dinov2", img_size=70, num_classes=0, **kwargs).eval()
    missing, unexpected = expert.model.load_state_dict(ref.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith(("blocks.1.", "norm.")) for k in unexpected)
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        full = ref.forward_features(x)  # last block + final norm; compare the unnormalised block output instead
        (spatial, prefix) = ref.forward_intermediates(x, indices=[0], return_prefix_tokens=True, norm=False,
                                                      output_fmt="NLC", intermediates_only=True)[0]
        tokens = expert(x)
    assert full.shape[1] == 30
    torch.testing.assert_close(tokens, torch.cat([prefix, spatial], 1), rtol=0, atol=0)


def test_hf_clip_tower_drops_cls_and_picks_layer():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    kwargs = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
    expert = build_encoder(VisionConfig(kind="hf", kwargs=kwargs, feature_layer=-2)).eval()
    ref = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in kwargs.items() if k != "model_type"})).eval()
    ref.load_state_dict(expert.model.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        tokens = expert(x)
    assert expert.num_prefix_tokens == 1 and tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_hf_siglip_tower_has_no_prefix():
    kwargs = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
    expert = build_encoder(VisionConfig(kind="hf", kwargs=kwargs))
    assert expert.num_prefix_tokens == 0 and expert.num_tokens == 16
    assert expert.mean == (0.5, 0.5, 0.5)
    assert expert(torch.randn(1, 3, 56, 56)).shape == (1, 16, 32)


def test_feature_layer_out_of_range_names_field():
    with pytest.raises(ValueError, match=r"vision\.feature_layer: -4 is out of range for a 2-block encoder"):
        build_encoder(VisionConfig(kind="timm", name="vit_base_patch16_clip_224", image_size=32,
                                   kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}, feature_layer=-4))


def test_mlp2x_gelu_closed_form_and_7b_parameter_count():
    torch.manual_seed(0)
    proj = MLPProjector(ConnectorConfig(projector="mlp2x_gelu"), 6, 5)
    x = torch.randn(2, 3, 6)
    w1, b1, w2, b2 = proj.layers[0].weight, proj.layers[0].bias, proj.layers[2].weight, proj.layers[2].bias
    expected = F.gelu(x @ w1.T + b1, approximate="none") @ w2.T + b2
    torch.testing.assert_close(proj(x).tokens, expected)
    big = MLPProjector(ConnectorConfig(projector="mlp2x_gelu"), 1024, 4096)
    assert sum(p.numel() for p in big.parameters()) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20.98 M
    assert len(MLPProjector(ConnectorConfig(projector="mlp3x_gelu"), 4, 4).layers) == 5
    assert len(MLPProjector(ConnectorConfig(projector="linear"), 4, 8).layers) == 1
    with pytest.raises(ValueError, match=r"connector\.projector: unknown projector 'mlp_gelu'"):
        MLPProjector(ConnectorConfig(projector="mlp_gelu"), 4, 4)


# ------------------------------------------------------------------ splicing and labels
def test_splice_expands_placeholder_into_image_block(model):
    img = model.image_token_id
    L, d = model.num_image_tokens, model.lm.config.hidden_size
    assert L == 16
    ids = torch.tensor([[1, 5, img, 7, 8]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    image = torch.randn(1, L, d)
    sp = model.splice(ids, image, labels=labels)
    assert sp.inputs_embeds.shape == (1, 4 + L, d)
    torch.testing.assert_close(sp.inputs_embeds[0, 2:2 + L], image[0])
    embed = model.lm.get_input_embeddings().weight
    torch.testing.assert_close(sp.inputs_embeds[0, [0, 1, 2 + L, 3 + L]], embed[[1, 5, 7, 8]])
    assert sp.image_mask[0].nonzero().flatten().tolist() == list(range(2, 2 + L))
    assert (sp.labels[0, 2:2 + L] == IGNORE_INDEX).all() and sp.labels[0, -2:].tolist() == [7, 8]
    assert sp.position_ids[0].tolist() == list(range(4 + L))
    two = model.splice(torch.tensor([[1, img, 5, img, 8]]), torch.randn(2, L, d))
    assert two.inputs_embeds.shape[1] == 5 + 2 * (L - 1)


def test_splice_left_padding_right_aligns_every_sample(model):
    img, pad = model.image_token_id, model.tokenizer.pad_token_id
    L, d = model.num_image_tokens, model.lm.config.hidden_size
    ids = torch.tensor([[pad, pad, 1, img, 9], [1, 6, img, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sp = model.splice(ids, torch.randn(2, L, d), mask, padding_side="left")
    assert sp.attention_mask.sum(1).tolist() == [2 + L, 4 + L]
    assert sp.attention_mask[:, -1].tolist() == [1, 1] and sp.attention_mask[0, :2].tolist() == [0, 0]
    assert sp.position_ids[0, -1].item() == 1 + L and sp.position_ids[1, -1].item() == 3 + L


def test_placeholder_count_mismatch_is_an_error(model):
    img = model.image_token_id
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\).*but 1 image\(s\) were given"):
        model.splice(torch.tensor([[1, img, img]]), torch.randn(1, 16, model.lm.config.hidden_size))


def test_sample_without_supervised_tokens_is_an_error(model, easy_vqa):
    split = easy_vqa["train"]
    ids, mask = model.collate_prompts([model.encode_prompt("what shape is in the image?")] * 2, "right")
    labels = ids.clone()
    labels[1] = IGNORE_INDEX
    pixels = model.vision.preprocess(split.images[:2])
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no supervised token"):
        model(ids, pixels, mask, labels)


def test_training_labels_cover_exactly_answer_and_eos(model, easy_vqa):
    from zoo.train import VQATrainingSet

    split = easy_vqa["train"]
    split = type(split)(split.images, split.samples[:8])
    ds = VQATrainingSet(model, split)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    for row, sample in enumerate(split.samples):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert supervised[-1] == model.tokenizer.eos_token_id
        assert model.tokenizer.decode(supervised[:-1]).strip() == sample.answer
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_over_long_sample_is_a_counted_skip(easy_vqa):
    from zoo.train import VQATrainingSet

    torch.manual_seed(0)
    short = zoo.build(tiny_config(max_length=16 + 7))  # room for the image and 7 text tokens only
    split = easy_vqa["train"]
    split = type(split)(split.images, split.samples[:50])
    ds = VQATrainingSet(short, split)
    prompt_lengths = [len(short.encode_prompt(s.question)) for s in split.samples]
    expected_skips = [s.id for s, n in zip(split.samples, prompt_lengths) if n >= 8]
    assert expected_skips, "the fixture must contain over-long questions"
    assert ds.skipped.total == len(expected_skips) == 50 - len(ds)
    assert sorted(sum(ds.skipped.by_reason.values(), [])) == sorted(expected_skips)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert torch.isfinite(short(**batch).loss)


# ------------------------------------------------------------------ checkpoints
def test_save_load_gives_bitwise_identical_logits(model, easy_vqa, tmp_path):
    split = easy_vqa["test"]
    ids, mask = model.collate_prompts([model.encode_prompt(s.question) for s in split.samples[:3]], "right")
    pixels = model.vision.preprocess([split.images[s.image] for s in split.samples[:3]])
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"config.json", "model.safetensors", "checksums.json"}
    loaded = zoo.load(tmp_path / "ckpt")
    with torch.no_grad():
        a = model(ids, pixels, mask).logits
        b = loaded(ids, pixels, mask).logits
    assert torch.equal(a, b)
    assert loaded.config.to_dict() == model.resolved_config().to_dict()


def test_load_from_hub_id_via_offline_cache(model, tmp_path):
    snapshot = tmp_path / "hub" / "models--zoo-test--tiny" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--zoo-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--zoo-test--tiny" / "refs" / "main").write_text("0" * 40)
    loaded = zoo.load("zoo-test/tiny", cache_dir=tmp_path / "hub")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(OSError, match="zoo-test/absent"):
        zoo.load("zoo-test/absent", cache_dir=tmp_path / "hub")


def test_truncated_or_mismatched_checkpoint_names_file_and_tensor(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        zoo.load(tmp_path / "ckpt")
    weights.write_bytes(data)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["connector"]["projector"] = "linear"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'connector\.layers\.2\.(weight|bias)' is not in"):
        zoo.load(tmp_path / "ckpt")
    config["connector"]["projector"] = "mlp2x_gelu"
    config["lm"]["config"]["intermediate_size"] = 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'lm\.model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        zoo.load(tmp_path / "ckpt")


def test_unknown_source_lists_catalogue():
    with pytest.raises(zoo.UnknownPartError, match="tiny-llava"):
        zoo.load("no such model")
    with pytest.raises(zoo.ConfigError, match="names no released weights"):
        zoo.load("tiny-llava")


# ------------------------------------------------------------------ training and generation
def test_training_reduces_loss(trained_model):
    assert trained_model["loss_after"] < 0.5 * trained_model["loss_before"]


def test_answers_do_not_depend_on_batch_size(trained_model, easy_vqa):
    model = trained_model["model"]
    split = easy_vqa["test"]
    samples = split.samples[:16]
    images, questions = [split.images[s.image] for s in samples], [s.question for s in samples]
    batched = model.answer(images, questions, batch_size=16)
    single = [model.answer([im], [q], batch_size=1)[0] for im, q in zip(images, questions)]
    assert batched == single
    assert len(set(batched)) >= 3  # a trained model gives varied answers (the test could not pass on a constant)
    references = [s.answer for s in samples]
    assert sum(a == r for a, r in zip(batched, references)) >= 8


def test_generation_with_cache_matches_full_forward(trained_model, easy_vqa):
    """The KV-cache loop picks the same tokens as re-running the whole sequence at every step."""
    model = trained_model["model"]
    split = easy_vqa["test"]
    sample = split.samples[5]
    pixels = model.vision.preprocess([split.images[sample.image]])
    prompt = model.encode_prompt(sample.question)
    ids, mask = model.collate_prompts([prompt])
    cached = model.generate(pixels, ids, mask, max_new_tokens=4)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(cached)):
            ids, mask = model.collate_prompts([seq])
            seq.append(int(model(ids, pixels, mask).logits[0, -1].argmax()))
    assert seq[len(prompt):] == cached[: len(seq) - len(prompt)]


def test_preprocess_accepts_any_pil_mode_and_normalises(model):
    from PIL import Image

    red = Image.new("RGB", (64, 64), (255, 0, 0))
    modes = [red, red.convert("CMYK"), red.convert("P"), red.convert("RGBA")]
    pixels = model.vision.preprocess(modes)
    assert pixels.shape == (4, 3, 64, 64)
    for row in pixels[1:]:
        torch.testing.assert_close(row, pixels[0], atol=0.05, rtol=0)
    mean, std = torch.tensor(model.vision.mean), torch.tensor(model.vision.std)
    torch.testing.assert_close(pixels[0, :, 0, 0], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent -> composited on white
    torch.testing.assert_close(model.vision.preprocess([clear])[0, :, 0, 0], (1 - mean) / std)
    gray = model.vision.preprocess([Image.new("L", (32, 32), 128)])
    assert gray.shape == (1, 3, 64, 64) and torch.allclose(gray[0, 0], gray[0, 0, 0, 0])
    with pytest.raises(TypeError, match="image 1: expected a PIL.Image, got str"):
        model.vision.preprocess([red, "not an image"])


def test_parts_load_from_local_dirs_like_hub_ids(tmp_path):
    """`pretrained: true` with a directory (what a hub id resolves to in the cache) loads the real weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from zoo.tokenizer import train_word_tokenizer

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14))
    clip.save_pretrained(tmp_path / "clip")
    tokenizer = train_word_tokenizer(["what shape is it", "circle"])
    tokenizer.save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tokenizer)))
    llama.save_pretrained(tmp_path / "llama")
    config = zoo.ModelConfig.from_dict({
        "vision": {"kind": "hf", "name": str(tmp_path / "clip"), "pretrained": True, "feature_layer": -1},
        "lm": {"kind": "hf", "name": str(tmp_path / "llama"), "pretrained": True},
        "tokenizer": {"name": str(tmp_path / "llama")},
    })
    model = zoo.build(config)
    for name, value in clip.state_dict().items():
        assert torch.equal(model.vision.model.state_dict()[name], value), name
    for name, value in llama.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], value), name
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
    model.save_pretrained(tmp_path / "zoo")  # the saved config rebuilds both parts without their directories
    (tmp_path / "clip" / "model.safetensors").unlink()
    (tmp_path / "llama" / "model.safetensors").unlink()
    reloaded = zoo.load(tmp_path / "zoo")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    with pytest.raises(OSError, match="vision.name: cannot load the weights of"):
        zoo.build(config)  # the tower's weights were deleted above
    from zoo.config import LMConfig
    from zoo.lm import build_lm

    with pytest.raises(OSError, match="lm.name: cannot load"):
        build_lm(LMConfig(name=str(tmp_path / "nowhere"), pretrained=True))


def test_image_index_encodes_shared_images_once_with_same_result(model, easy_vqa):
    from zoo.train import ImageGroupedBatchSampler, VQATrainingSet

    split = easy_vqa["train"]
    split = type(split)(split.images, split.samples[:40])
    ds = VQATrainingSet(model, split)
    sampler = ImageGroupedBatchSampler([ds.image_of(i) for i in range(len(ds))], 2, 3, seed=0)
    batches = list(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and len(batches) == len(sampler)  # no item twice in an epoch
    for b in batches:
        assert len({ds.image_of(i) for i in b}) <= 2 and len(b) <= 6
    batch = ds.collate([ds[i] for i in batches[0]])
    assert len(batch["pixel_values"]) == len(set(ds.image_of(i) for i in batches[0])) < len(batches[0])
    with torch.no_grad():
        shared = model(**batch)
        index = batch.pop("image_index")
        batch["pixel_values"] = batch["pixel_values"][index]
        repeated = model(**batch)
    torch.testing.assert_close(shared.logits, repeated.logits)
    torch.testing.assert_close(shared.loss, repeated.loss)
    with pytest.raises(ValueError, match="image_index: expected"):
        model(**{**batch, "image_index": torch.tensor([0, 99])})
