"""Tiny offline processors for the test twins of transformers-native models.

A released model brings its own processor (tokenizer, image processor, chat template), read with
``AutoProcessor.from_pretrained``. A tiny twin is built here without any download: the family's own processor class
over its own image processor (configured for the twin's 64-pixel images and small patches), a word-level tokenizer
trained on easy-vqa holding the family's special tokens under the names the processor reads, and a chat template
in the family's turn format (Llama 4's processor ships transformers' own template, which is kept). Assistant turns
end with the tokenizer's EOS, so generation stops where training taught it to.

`fill_token_ids` writes the tokenizer's ids of those special tokens (image, video, vision start/end, ...) and its
length into a transformers config, so the twin's model and processor agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_QWEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
_GLM_IDS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>", "image_start_token_id": "<|begin_of_image|>",
            "image_end_token_id": "<|end_of_image|>", "video_start_token_id": "<|begin_of_video|>",
            "video_end_token_id": "<|end_of_video|>"}
_ERNIE_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                 "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                 "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
_PATCHES = {"patch_size": 16, "merge_size": 2}  # 64-pixel images: 4 x 4 patches, 2 x 2 image tokens
_QWEN_IMAGES = {**_PATCHES, "temporal_patch_size": 2, "min_pixels": 32 * 32, "max_pixels": 64 * 64,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def chat_template(turn_start: str, turn_end: str, image: str, generation: str) -> str:
    """A Jinja chat template: each message as ``turn_start`` (``{role}`` filled) + its content (``image`` for an image
    part) + EOS after an assistant message + ``turn_end``; ``generation`` opens the assistant's turn."""
    start = "{{ '" + turn_start.replace("{role}", "' + message['role'] + '") + "' }}"
    return ("{% for message in messages %}" + start
            + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image
            + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}" + turn_end + "{% endfor %}"
            "{% if add_generation_prompt %}" + generation + "{% endif %}")


_QWEN_CHAT = chat_template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                           "<|im_start|>assistant\n")


@dataclass(frozen=True)
class TinyProcessor:
    """How to build one family's tiny processor: classes, image-processor settings, special tokens (``named``: the
    tokenizer attributes the processor reads; ``extra``: the rest of the format), the chat template (None: the
    processor's default), and ``config_ids``: config attribute -> token whose id it holds."""

    processor: str
    image_processor: str
    image_kwargs: dict[str, Any]
    named: dict[str, str]
    config_ids: dict[str, str]
    template: str | None
    extra: tuple[str, ...] = ()
    video_processor: str | None = None
    video_kwargs: dict[str, Any] = field(default_factory=dict)
    audio: bool = False
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    eos: str = "</s>"


_QWEN = TinyProcessor("Qwen3VLProcessor", "Qwen2VLImageProcessor", _QWEN_IMAGES, _QWEN_TOKENS, _QWEN_IDS, _QWEN_CHAT,
                      ("<|im_start|>", "<|im_end|>"), "Qwen3VLVideoProcessor")
_GLM = TinyProcessor("Glm4vProcessor", "Glm4vImageProcessor",  # GLM's pixel budget counts t x h x w
                     {**_PATCHES, "temporal_patch_size": 2, "size": {"shortest_edge": 2 * 32 * 32,
                                                                    "longest_edge": 2 * 64 * 64}},
                     {"image_token": "<|image|>", "video_token": "<|video|>"}, _GLM_IDS,
                     chat_template("<|{role}|>\n", "", "<|begin_of_image|><|image|><|end_of_image|>", "<|assistant|>\n"),
                     ("<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|user|>",
                      "<|assistant|>"), "Glm4vVideoProcessor")
TINY_PROCESSORS: dict[str, TinyProcessor] = {
    "qwen3_vl_moe": _QWEN, "qwen3_vl": _QWEN, "glm4v_moe": _GLM, "glm4v": _GLM,
    "llama4": TinyProcessor(
        "Llama4Processor", "Llama4ImageProcessor", {"size": {"height": 64, "width": 64}, "max_patches": 1}, {},
        {"image_token_id": "<|patch|>", "boi_token_id": "<|image_start|>", "eoi_token_id": "<|image_end|>"}, None,
        ("<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
         "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
        processor_kwargs={"patch_size": 16, "pixel_shuffle_ratio": 0.5}, eos="<|eot|>"),
    # Aria's processor asks for 980-pixel images (its call default): the twin's ViT reads them in 140-pixel patches
    "aria": TinyProcessor(
        "AriaProcessor", "AriaImageProcessor", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        {"image_token": "<|img|>"}, {"image_token_id": "<|img|>"},
        chat_template("<|im_start|>{role}\n", "<|im_end|>\n", "<fim_prefix><|img|><fim_suffix>",
                      "<|im_start|>assistant\n"),
        ("<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>"),
        processor_kwargs={"size_conversion": {490: 4, 980: 4}}),
    "ernie4_5_vl_moe": TinyProcessor(
        "Ernie4_5_VLMoeProcessor", "Ernie4_5_VLMoeImageProcessor",
        {**_PATCHES, "min_pixels": 32 * 32, "max_pixels": 64 * 64}, _ERNIE_TOKENS,
        {f"{name}_id": token for name, token in _ERNIE_TOKENS.items()},
        chat_template("{role}: ", "\n", "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", "assistant: "),
        video_processor="Ernie4_5_VLMoeVideoProcessor", video_kwargs={"draw_on_frames": False}),  # no font file here
    "qwen3_omni_moe": TinyProcessor(
        "Qwen3OmniMoeProcessor", "Qwen2VLImageProcessor", _QWEN_IMAGES,
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
         "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
         "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"},
        {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>", "audio_token_id": "<|audio_pad|>",
         "vision_start_token_id": "<|vision_start|>", "audio_start_token_id": "<|audio_start|>"},
        _QWEN_CHAT, ("<|im_start|>", "<|im_end|>"), "Qwen2VLVideoProcessor", audio=True),
}


def _tokenizer(spec: TinyProcessor):
    """A word-level tokenizer trained on easy-vqa's text whose special tokens are the family's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zoo.tokenizer import SPECIAL_TOKENS, easy_vqa_text

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *spec.named.values(), *spec.extra]))
    tok.train_from_iterator(sorted(set(easy_vqa_text())), trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=spec.eos, pad_token="<pad>",
                                   unk_token="<unk>", model_specific_special_tokens=dict(spec.named),
                                   additional_special_tokens=list(spec.extra))


def tiny_processor(model_type: str):
    """The tiny offline processor of a family (see the module docstring)."""
    import transformers

    spec = TINY_PROCESSORS[model_type]
    parts: dict[str, Any] = {"tokenizer": _tokenizer(spec),
                             "image_processor": getattr(transformers, spec.image_processor)(**spec.image_kwargs)}
    if spec.video_processor:
        parts["video_processor"] = getattr(transformers, spec.video_processor)(**_PATCHES, **spec.video_kwargs)
    if spec.audio:
        parts["feature_extractor"] = transformers.WhisperFeatureExtractor(feature_size=16)
    if spec.template is not None:
        parts["chat_template"] = spec.template
    return getattr(transformers, spec.processor)(**parts, **spec.processor_kwargs)


def fill_token_ids(hf_config, processor, given_vocab: int | None) -> None:
    """Write the tiny processor's special-token ids, and its vocabulary size unless the config gave one
    (``given_vocab``, which must hold the tokenizer), into a transformers config, in place."""
    tokenizer = processor.tokenizer
    spec = TINY_PROCESSORS[hf_config.model_type]
    holder = getattr(hf_config, "thinker_config", hf_config)  # Qwen3-Omni: the thinker reads the tokens
    for attribute, token in spec.config_ids.items():
        setattr(holder, attribute, tokenizer.convert_tokens_to_ids(token))
    text = hf_config.get_text_config()
    if given_vocab is not None and given_vocab < len(tokenizer):
        raise ValueError(f"vocab_size: {given_vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    text.vocab_size = given_vocab or len(tokenizer)
    text.pad_token_id, text.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    if hasattr(holder, "pad_token_id") and holder is not text:
        holder.pad_token_id = tokenizer.pad_token_id


__all__ = ["TINY_PROCESSORS", "TinyProcessor", "chat_template", "fill_token_ids", "tiny_processor"]
