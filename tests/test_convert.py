"""zoo.convert: LlavaForConditionalGeneration <-> ZooModel, checked by logit parity on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

import zoo.checkpoint
import zoo.convert
from zoo.config import ConnectorConfig, LMConfig, ModelConfig, VisionConfig
from zoo.hf import config_to_dict
from zoo.model import ZooModel

IMG = 99  # image_token_index: a real id inside the vocabulary (llava-hf embeds it before overwriting)
VOCAB = 100
PAD = 0
ATOL = 1e-5


def tiny_llava(strategy: str = "default", vision: str = "clip", tie: bool = False, seed: int = 0,
               **llava_kwargs) -> LlavaForConditionalGeneration:
    """A random tiny llava-hf model (28 px images, 14 px patches: 4 patch tokens) with O(1) weights."""
    torch.manual_seed(seed)
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision]
    vcfg = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=28, patch_size=14)
    tcfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie)
    llava_kwargs.setdefault("image_token_index", IMG)
    config = LlavaConfig(vision_config=vcfg, text_config=tcfg, vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy, **llava_kwargs)
    llava = LlavaForConditionalGeneration(config)
    # The default init (std 0.02) gives near-zero logits that would hide mismatches; use O(1) activations.
    with torch.no_grad():
        for name, p in llava.named_parameters():
            if name.endswith("norm.weight") or ".layer_norm" in name or "layrnorm.weight" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return llava.eval()


# Placeholder layouts: both samples one image, or two images in the first sample and none in the second.
LAYOUTS = {
    "one_each": [[5, 6, IMG, 7, 8, 9, 10], [11, IMG, 12, 13]],
    "two_and_none": [[5, IMG, 6, IMG, 7], [8, 9, 10, 11, 12, 13, 14, 15]],
}


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``input_ids`` and ``attention_mask``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def make_inputs(layout: str, tokens_per_image: int):
    """(zoo ids, zoo mask), (llava ids, llava mask), pixels: the same sequences once expanded.

    ZooModel takes one placeholder per image; llava-hf takes each placeholder already repeated
    ``image_seq_length`` times.
    """
    rows = LAYOUTS[layout]
    expanded = [[t for tok in r for t in ([tok] * tokens_per_image if tok == IMG else [tok])] for r in rows]
    n_images = sum(r.count(IMG) for r in rows)
    torch.manual_seed(1)
    pixels = torch.randn(n_images, 3, 28, 28)
    return _pad(rows), _pad(expanded), pixels


@torch.no_grad()
def llava_logits(llava, ids, mask, pixels):
    return llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits


@torch.no_grad()
def zoo_logits(model, ids, mask, pixels):
    return model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits


def assert_parity(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal logits at every real token of right-padded sequences (`mask`: `reference`'s attention mask).

    Padded positions are left out: they get other RoPE positions, and a ZooModel may pad further on the right
    (its spliced width counts the input padding too).
    """
    valid = mask.sum(1, keepdim=True)
    assert other.shape[0] == reference.shape[0] and other.shape[1] >= reference.shape[1]
    assert torch.equal(mask.bool(), torch.arange(reference.shape[1]) < valid)
    ref = reference[mask.bool()]
    got = other[torch.arange(other.shape[1]) < valid]
    assert ref.abs().std() > 0.1  # not a vacuous comparison of near-zero logits
    diff = (ref - got).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_from_transformers_logit_parity(strategy, layout):
    llava = tiny_llava(strategy)
    model = zoo.convert.from_transformers(llava)
    assert not model.training
    # "default" drops CLIP's CLS token (4 patch tokens per image), "full" keeps it (5).
    assert model.config.vision.drop_prefix is (strategy == "default")
    assert model.num_image_tokens == (4 if strategy == "default" else 5)
    (ids, mask), (hf_ids, hf_mask), pixels = make_inputs(layout, model.num_image_tokens)
    reference = llava_logits(llava, hf_ids, hf_mask, pixels)
    assert_parity(reference, zoo_logits(model, ids, mask, pixels), hf_mask)
    # The images matter: other pixels change the logits (so the vision path was compared too).
    moved = llava_logits(llava, hf_ids, hf_mask, pixels + 1.0)
    assert (moved - reference)[hf_mask.bool()].abs().max() > 1e-2


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_round_trip_logits_and_weights(strategy):
    llava = tiny_llava(strategy)
    back = zoo.convert.to_transformers(zoo.convert.from_transformers(llava))
    assert isinstance(back, LlavaForConditionalGeneration)
    assert not back.training
    cfg = back.config
    assert cfg.vision_feature_select_strategy == strategy
    assert cfg.vision_feature_layer == -2
    assert cfg.image_token_index == IMG
    assert cfg.image_seq_length == (4 if strategy == "default" else 5)
    original, copied = llava.state_dict(), back.state_dict()
    assert original.keys() == copied.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, copied[name]), name
    (_, _), (hf_ids, hf_mask), pixels = make_inputs("one_each", cfg.image_seq_length)
    assert_parity(llava_logits(llava, hf_ids, hf_mask, pixels), llava_logits(back, hf_ids, hf_mask, pixels), hf_mask)


def test_siglip_full_parity_and_round_trip():
    llava = tiny_llava("full", vision="siglip")
    model = zoo.convert.from_transformers(llava)
    assert model.num_image_tokens == 4  # SigLIP has no CLS: "full" is the patch tokens
    (ids, mask), (hf_ids, hf_mask), pixels = make_inputs("two_and_none", 4)
    reference = llava_logits(llava, hf_ids, hf_mask, pixels)
    assert_parity(reference, zoo_logits(model, ids, mask, pixels), hf_mask)
    back = zoo.convert.to_transformers(model)
    assert back.config.vision_feature_select_strategy == "full"  # llava-hf "default" would drop a patch token
    assert_parity(reference, llava_logits(back, hf_ids, hf_mask, pixels), hf_mask)


def test_tied_embeddings_stay_tied():
    llava = tiny_llava(tie=True)
    model = zoo.convert.from_transformers(llava)
    assert model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
    back = zoo.convert.to_transformers(model)
    assert back.lm_head.weight is back.model.language_model.embed_tokens.weight
    (_, _), (hf_ids, hf_mask), pixels = make_inputs("one_each", 4)
    assert_parity(llava_logits(llava, hf_ids, hf_mask, pixels), llava_logits(back, hf_ids, hf_mask, pixels), hf_mask)


def test_preprocessing_carries_over():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = zoo.convert.from_transformers(tiny_llava())
    assert model.vision.image_size == 28
    assert model.vision.mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert model.vision.std == pytest.approx(OPENAI_CLIP_STD)
    siglip = zoo.convert.from_transformers(tiny_llava("full", vision="siglip"))
    assert siglip.vision.mean == pytest.approx((0.5, 0.5, 0.5))


def test_converted_model_saves_and_reloads(tmp_path):
    llava = tiny_llava()
    model = zoo.convert.from_transformers(llava)
    reloaded = ZooModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    (ids, mask), (_, hf_mask), pixels = make_inputs("one_each", 4)
    assert torch.equal(zoo_logits(model, ids, mask, pixels), zoo_logits(reloaded, ids, mask, pixels))


def test_tokenizer_names_the_image_token():
    from zoo.tokenizer import train_word_tokenizer

    tokenizer = train_word_tokenizer(["what colour is the circle", "red"])  # ids 0-4: <pad> <unk> <s> </s> <image>
    model = zoo.convert.from_transformers(tiny_llava(image_token_index=4), tokenizer)
    assert model.tokenizer is tokenizer
    assert model.image_token_id == 4
    assert model.config.tokenizer.image_token == "<image>"
    assert model.encode_prompt("what colour").count(4) == 1
    with pytest.raises(ValueError, match=r"image_token_index: 99 is not an id of the given tokenizer"):
        zoo.convert.from_transformers(tiny_llava(), tokenizer)


# ------------------------------------------------------------------ errors name the field


def _zoo_model(**connector) -> ZooModel:
    llava = tiny_llava()
    config = ModelConfig(
        vision=VisionConfig(kind="hf", kwargs=config_to_dict(llava.config.vision_config)),
        connector=ConnectorConfig(**connector),
        lm=LMConfig(config=config_to_dict(llava.config.text_config)),
        image_token_id=IMG,
    )
    return ZooModel(config).eval()


def test_to_transformers_rejects_unsupported_projector():
    with pytest.raises(ValueError, match=r"connector\.projector: 'linear' has no LlavaForConditionalGeneration "
                                         r"equivalent"):
        zoo.convert.to_transformers(_zoo_model(projector="linear"))
    with pytest.raises(ValueError, match=r"connector\.projector: 'mlp3x_gelu'"):
        zoo.convert.to_transformers(_zoo_model(projector="mlp3x_gelu"))


def test_to_transformers_rejects_image_token_outside_vocab():
    model = _zoo_model()
    model.config.image_token_id = VOCAB
    with pytest.raises(ValueError, match=r"image_token_id: 100 is outside the LM vocabulary"):
        zoo.convert.to_transformers(model)


def test_from_transformers_rejects_other_projector_activation():
    with pytest.raises(ValueError, match=r"projector_hidden_act: 'gelu_pytorch_tanh'"):
        zoo.convert.from_transformers(tiny_llava(projector_hidden_act="gelu_pytorch_tanh"))


def test_from_transformers_rejects_several_feature_layers():
    llava = tiny_llava()
    llava.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match=r"vision_feature_layer: \[-2, -1\]"):
        zoo.convert.from_transformers(llava)


def test_from_transformers_rejects_default_strategy_without_cls():
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy: 'default' drops the first token"):
        zoo.convert.from_transformers(tiny_llava("default", vision="siglip"))


def test_zoo_load_reads_a_llava_hf_checkpoint_dir(tmp_path):
    """A directory written by transformers' own save_pretrained (llava-hf layout) loads through zoo.load."""
    from zoo.tokenizer import train_word_tokenizer

    llava = tiny_llava(image_token_index=4)
    llava.save_pretrained(tmp_path / "llava-hf")
    train_word_tokenizer(["what colour is the circle", "red"]).save_pretrained(tmp_path / "llava-hf")
    model = zoo.load(tmp_path / "llava-hf")
    rows = [[r if r != IMG else 4 for r in row] for row in LAYOUTS["one_each"]]
    ids, mask = _pad(rows)
    expanded = [[t for tok in r for t in ([tok] * 4 if tok == 4 else [tok])] for r in rows]
    hf_ids, hf_mask = _pad(expanded)
    pixels = torch.randn(2, 3, 28, 28)
    assert_parity(llava_logits(llava, hf_ids, hf_mask, pixels), zoo_logits(model, ids, mask, pixels), hf_mask)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(zoo.checkpoint.CheckpointError, match="model_type .bert. is not supported"):
        zoo.load(tmp_path / "other")
