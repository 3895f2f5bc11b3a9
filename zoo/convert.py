"""Convert between :class:`~zoo.model.ZooModel` and transformers' ``LlavaForConditionalGeneration``.

Only the dense LLaVA layout has an equivalent on both sides: a transformers CLIP or SigLIP vision tower read at one
``hidden_states`` index, the ``mlp2x_gelu`` projector (Linear, exact GELU, Linear) and a transformers causal LM.
Weights are copied exactly (``load_state_dict(strict=True)`` per part, so nothing is silently dropped); the result
computes the same logits as its source.

How the two sides feed images differs: a llava-hf model expects ``input_ids`` in which every image token is already
repeated ``image_seq_length`` times, a ZooModel expects ONE placeholder per image and expands it itself.

>>> import zoo.convert
>>> model = zoo.convert.from_transformers(llava)      # LlavaForConditionalGeneration -> ZooModel
>>> llava = zoo.convert.to_transformers(model)        # ZooModel -> LlavaForConditionalGeneration
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zoo.config import ConnectorConfig, LMConfig, ModelConfig, TokenizerConfig, VisionConfig
from zoo.hf import config_to_dict

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from zoo.model import ZooModel

__all__ = ["from_transformers", "to_transformers"]

_TARGET = "LlavaForConditionalGeneration"
# Vision towers whose hidden_states / prefix-token layout we map exactly: CLIP has one CLS token, SigLIP none.
_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
_PROJECTOR = "mlp2x_gelu"


def _load(part: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``part.load_state_dict(state, strict=True)`` with an error naming the part."""
    try:
        part.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what}: the weights do not fit ({e})") from e


def _prefix_tokens(vision_config: Any) -> int:
    """CLS/register tokens in front of the patch tokens of a CLIP (1) or SigLIP (0) vision tower."""
    return 1 if vision_config.model_type == "clip_vision_model" else 0


# ---------------------------------------------------------------------------------------------------------------
# transformers -> zoo


def _model_config(llava: LlavaForConditionalGeneration, tokenizer=None) -> ModelConfig:
    cfg = llava.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    if vcfg.model_type not in _VISION_TYPES:
        raise ValueError(f"vision_config.model_type: {vcfg.model_type!r} is not supported; expected one of "
                         f"{', '.join(_VISION_TYPES)}")
    layer = cfg.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer: {layer!r} selects several layers (concatenated features); "
                         "a zoo 'hf' vision expert reads one layer, so only an int is supported")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy: expected 'default' or 'full', got {strategy!r}")
    if strategy == "default" and _prefix_tokens(vcfg) != 1:
        # llava-hf's "default" always drops the first token; without a CLS that is a patch token.
        raise ValueError(f"vision_feature_select_strategy: 'default' drops the first token, but a "
                         f"{vcfg.model_type} has no CLS token (it would drop a patch); no zoo equivalent")
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"projector_hidden_act: {cfg.projector_hidden_act!r} has no zoo equivalent "
                         "(the mlp2x_gelu projector uses the exact erf GELU, 'gelu')")

    text = config_to_dict(tcfg)
    if cfg.tie_word_embeddings:  # LlavaConfig may tie lm_head to the embeddings on behalf of its text config
        text["tie_word_embeddings"] = True
    image_token_id = int(cfg.image_token_index)
    tok_config = TokenizerConfig()
    if tokenizer is not None:
        token = tokenizer.convert_ids_to_tokens(image_token_id)
        if token is None:
            raise ValueError(f"image_token_index: {image_token_id} is not an id of the given tokenizer "
                             f"({len(tokenizer)} tokens)")
        tok_config = TokenizerConfig(name=getattr(tokenizer, "name_or_path", None) or None, image_token=token)
    return ModelConfig(
        name=getattr(llava, "name_or_path", "") or "llava-hf",
        family="llava",
        description=f"converted from transformers {_TARGET}",
        vision=VisionConfig(
            kind="hf",
            kwargs=config_to_dict(vcfg),  # image_size, patch_size... ; mean/std: the family's (CLIP/SigLIP)
            feature_layer=layer,
            drop_prefix=strategy == "default",
        ),
        connector=ConnectorConfig(kind="mlp", projector=_PROJECTOR, bias=bool(cfg.multimodal_projector_bias)),
        lm=LMConfig(kind="hf", config=text, attn_implementation=getattr(tcfg, "_attn_implementation", None)),
        tokenizer=tok_config,
        prompt=ModelConfig.prompt.replace("<image>", tok_config.image_token),
        max_length=int(getattr(tcfg, "max_position_embeddings", None) or ModelConfig.max_length),
        image_token_id=image_token_id,
    )


def from_transformers(llava: LlavaForConditionalGeneration, tokenizer=None) -> ZooModel:
    """Build a :class:`~zoo.model.ZooModel` holding an exact copy of a ``LlavaForConditionalGeneration``.

    The vision tower becomes an ``hf`` expert reading ``hidden_states[vision_feature_layer]`` (which must be one
    int), dropping the CLS token for ``vision_feature_select_strategy="default"`` and keeping it for ``"full"``; the
    projector becomes the ``mlp2x_gelu`` connector (``projector_hidden_act`` must be ``"gelu"``); the language
    model and ``lm_head`` become an ``hf`` LM with the same transformers config. The image token id is
    ``image_token_index``; with a `tokenizer`, the config also records that token's text and the tokenizer's name.
    Preprocessing is the vision family's (image size from the vision config, CLIP or SigLIP mean/std, as the
    llava-hf processors use). The result is on the source's device and dtype, in the source's train/eval mode.

    Unsupported settings raise ``ValueError`` naming the offending ``LlavaConfig`` field.
    """
    from zoo.model import ZooModel

    config = _model_config(llava, tokenizer)
    model = ZooModel(config, tokenizer)
    source = llava.model
    _load(model.vision.model, source.vision_tower.state_dict(), "vision_tower")
    projector = source.multi_modal_projector
    layers = model.connector.layers
    _load(layers[0], projector.linear_1.state_dict(), "multi_modal_projector.linear_1")
    _load(layers[2], projector.linear_2.state_dict(), "multi_modal_projector.linear_2")
    _load(model.lm.base_model, source.language_model.state_dict(), "language_model")
    head = model.lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"text_config.model_type: {config.lm.config['model_type']!r} builds an LM without an "
                         "output head")
    _load(head, llava.lm_head.state_dict(), "lm_head")
    return model.to(device=llava.device, dtype=llava.dtype).train(llava.training)


# ---------------------------------------------------------------------------------------------------------------
# zoo -> transformers


def _llava_config(model: ZooModel):
    from transformers import LlavaConfig

    config = model.config
    if isinstance(config.vision, list):
        raise ValueError(f"vision: {len(config.vision)} fused experts have no {_TARGET} equivalent (one tower only)")
    if config.vision.kind != "hf":
        raise ValueError(f"vision.kind: {config.vision.kind!r} has no {_TARGET} equivalent (needs 'hf', a "
                         "transformers CLIP/SigLIP vision tower)")
    vcfg = model.vision.hf_config
    if vcfg.model_type not in _VISION_TYPES:
        raise ValueError(f"vision.kwargs.model_type: {vcfg.model_type!r} has no {_TARGET} equivalent here "
                         f"(supported: {', '.join(_VISION_TYPES)})")
    prefix = _prefix_tokens(vcfg)
    if prefix != model.vision.num_prefix_tokens:
        raise ValueError(f"vision.kwargs.model_type: a {vcfg.model_type} with {model.vision.num_prefix_tokens} "
                         f"prefix tokens has no {_TARGET} equivalent")
    # llava-hf "default" drops exactly one leading token; with no CLS to drop, "full" keeps the same tokens.
    strategy = "default" if config.vision.drop_prefix and prefix == 1 else "full"
    if config.connector.kind != "mlp":
        raise ValueError(f"connector.kind: {config.connector.kind!r} has no {_TARGET} equivalent (needs 'mlp' "
                         f"with projector {_PROJECTOR!r})")
    if config.connector.projector != _PROJECTOR:
        raise ValueError(f"connector.projector: {config.connector.projector!r} has no {_TARGET} equivalent "
                         f"(needs {_PROJECTOR!r})")
    if config.lm.kind != "hf":
        raise ValueError(f"lm.kind: {config.lm.kind!r} has no {_TARGET} equivalent (needs 'hf')")
    lm = model.lm
    base, head = getattr(lm, "base_model", lm), lm.get_output_embeddings()
    if base is lm or head is None:
        raise ValueError(f"lm.config.model_type: {lm.config.model_type!r} is not a base model + lm_head causal "
                         f"LM; no {_TARGET} equivalent")
    vocab = lm.get_input_embeddings().num_embeddings
    if not 0 <= model.image_token_id < vocab:
        raise ValueError(f"image_token_id: {model.image_token_id} is outside the LM vocabulary ({vocab} ids); "
                         f"{_TARGET} embeds the image token ids, so it must be one of them")
    try:
        return LlavaConfig(
            vision_config=vcfg.to_dict(),
            text_config=lm.config.to_dict(),
            image_token_index=model.image_token_id,
            image_seq_length=model.num_image_tokens,
            projector_hidden_act="gelu",
            vision_feature_select_strategy=strategy,
            vision_feature_layer=config.vision.feature_layer,
            multimodal_projector_bias=config.connector.bias,
            tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"lm.config.model_type: {lm.config.model_type!r} is not accepted by LlavaConfig as "
                         f"text_config: {e}") from e


def to_transformers(model: ZooModel) -> LlavaForConditionalGeneration:
    """Build a ``LlavaForConditionalGeneration`` holding an exact copy of a dense LLaVA-layout ZooModel.

    Supported: an ``hf`` CLIP or SigLIP vision tower, the ``mlp`` connector with projector ``mlp2x_gelu`` and an
    ``hf`` LM whose transformers config ``LlavaConfig`` accepts as ``text_config`` (llama, qwen2, mistral, ...).
    ``image_seq_length`` is ``model.num_image_tokens``; ``vision_feature_select_strategy`` is ``"default"`` when
    the CLS token is dropped and ``"full"`` when it is kept (or when the tower has none, as SigLIP);
    ``image_token_index`` is ``model.image_token_id``. Preprocessing (mean/std/resize) is not part of a
    ``LlavaForConditionalGeneration``: pair it with an image processor using ``model.vision``'s values. The result is
    on the source's device and dtype, in the source's train/eval mode.

    Anything else raises ``ValueError`` naming the zoo config field that has no equivalent.
    """
    from transformers import LlavaForConditionalGeneration

    config = _llava_config(model)
    attn = {"vision_config": model.vision.model.config._attn_implementation,
            "text_config": model.lm.config._attn_implementation}
    llava = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    target = llava.model
    if type(target.vision_tower) is not type(model.vision.model):
        raise ValueError(f"vision.kwargs.model_type: {_TARGET} builds a {type(target.vision_tower).__name__}, "
                         f"this model has a {type(model.vision.model).__name__}")
    if type(target.language_model) is not type(model.lm.base_model):
        raise ValueError(f"lm.config.model_type: {_TARGET} builds a {type(target.language_model).__name__}, "
                         f"this model has a {type(model.lm.base_model).__name__}")
    _load(target.vision_tower, model.vision.model.state_dict(), "vision")
    layers = model.connector.layers
    _load(target.multi_modal_projector.linear_1, layers[0].state_dict(), "connector.layers.0")
    _load(target.multi_modal_projector.linear_2, layers[2].state_dict(), "connector.layers.2")
    _load(target.language_model, model.lm.base_model.state_dict(), "lm.model")
    _load(llava.lm_head, model.lm.get_output_embeddings().state_dict(), "lm.lm_head")
    dtype = next(model.parameters()).dtype
    return llava.to(device=model.device, dtype=dtype).train(model.training)
