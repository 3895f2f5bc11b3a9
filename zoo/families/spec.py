"""What the zoo knows about each transformers model type it brings in: where its parts, decoders and sparse blocks
live, which token ids are image tokens, and how its MoE blocks are called.

| model_type | class | parts | sparse blocks |
|---|---|---|---|
| ``qwen3_vl_moe`` | ``Qwen3VLMoeForConditionalGeneration`` | vision (ViT + merger + DeepStack mergers), lm | every layer's ``mlp`` |
| ``glm4v_moe`` | ``Glm4vMoeForConditionalGeneration`` | vision (ViT + merger), lm | ``mlp`` after ``first_k_dense_replace`` |
| ``llama4`` | ``Llama4ForConditionalGeneration`` | vision, connector, lm | ``feed_forward`` of ``moe_layers`` |
| ``aria`` | ``AriaForConditionalGeneration`` | vision, connector (cross-attention projector), lm | every ``mlp`` |
| ``ernie4_5_vl_moe`` | ``Ernie4_5_VLMoeForConditionalGeneration`` | vision, connector (resampler), lm | ``mlp`` of sparse layers |
| ``qwen3_omni_moe`` | ``Qwen3OmniMoeForConditionalGeneration`` | vision, audio, lm (thinker); talker, code2wav | thinker and talker ``mlp`` |
| ``qwen3_vl``, ``glm4v`` | the dense bases | as their MoE versions | none: upcycled by a zoo policy |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zoo.registry import Registry, UnknownPartError


@dataclass(frozen=True)
class FamilySpec:
    """One transformers model type.

    ``parts``: zoo part name -> module paths inside the transformers model (together they hold every parameter).
    ``decoders``: routing-statistics prefix -> path of the text model whose ``layers`` hold the sparse blocks;
    ``ffn``: the decoder layer's attribute holding its FFN. ``generator``: the module whose forward gives the logits
    and whose ``generate`` decodes ('' for the model itself; the thinker for Qwen3-Omni). ``visual_tokens``: config
    attributes (on the generator's config) of the image / video token ids, which make the modality mask;
    ``modality_kwarg``: an input the model itself routes by (ERNIE's ``moe_mm_token_type_ids``), read instead.
    ``tuple_output``: the decoder layer expects ``(hidden, router_logits)`` from a sparse block (Llama 4).
    ``notes``: why a part the zoo's own models have is missing, for errors. ``bridge``: what joins vision and
    language (for the catalogue).
    """

    model_type: str
    family: str
    class_name: str
    parts: dict[str, tuple[str, ...]]
    decoders: dict[str, str]
    ffn: str = "mlp"
    generator: str = ""
    visual_tokens: tuple[str, ...] = ("image_token_id", "video_token_id")
    modality_kwarg: str | None = None
    tuple_output: bool = False
    notes: dict[str, str] = field(default_factory=dict)
    sparse: bool = True
    bridge: str = "patch merger (in the vision tower)"


FAMILIES: Registry[FamilySpec] = Registry("transformers model type")

_MERGER = {"connector": "the patch merger is part of the vision tower ('vision')"}
_QWEN_PARTS = {"vision": ("model.visual",), "lm": ("model.language_model", "lm_head")}
for _spec in (
    FamilySpec("qwen3_vl_moe", "qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration", _QWEN_PARTS,
               {"lm": "model.language_model"}, notes=_MERGER),
    FamilySpec("qwen3_vl", "qwen3-vl", "Qwen3VLForConditionalGeneration", _QWEN_PARTS, {"lm": "model.language_model"},
               notes=_MERGER, sparse=False),
    FamilySpec("glm4v_moe", "glm4v-moe", "Glm4vMoeForConditionalGeneration", _QWEN_PARTS,
               {"lm": "model.language_model"}, notes=_MERGER),
    FamilySpec("glm4v", "glm4v", "Glm4vForConditionalGeneration", _QWEN_PARTS, {"lm": "model.language_model"},
               notes=_MERGER, sparse=False),
    FamilySpec("llama4", "llama4", "Llama4ForConditionalGeneration",
               {"vision": ("vision_model",), "connector": ("multi_modal_projector",), "lm": ("language_model",)},
               {"lm": "language_model.model"}, ffn="feed_forward", visual_tokens=("image_token_id",),
               tuple_output=True, bridge="pixel-shuffle MLP + linear projector"),
    FamilySpec("aria", "aria", "AriaForConditionalGeneration",
               {"vision": ("model.vision_tower",), "connector": ("model.multi_modal_projector",),
                "lm": ("model.language_model", "lm_head")},
               {"lm": "model.language_model"}, visual_tokens=("image_token_id",),
               bridge="cross-attention projector (learned queries)"),
    FamilySpec("ernie4_5_vl_moe", "ernie4.5-vl-moe", "Ernie4_5_VLMoeForConditionalGeneration",
               {"vision": ("model.vision_tower",), "connector": ("model.resampler_model",),
                "lm": ("model.language_model", "lm_head")},
               {"lm": "model.language_model"}, modality_kwarg="moe_mm_token_type_ids",
               bridge="spatial + temporal resampler"),
    FamilySpec("qwen3_omni_moe", "qwen3-omni-moe", "Qwen3OmniMoeForConditionalGeneration",
               {"vision": ("thinker.model.visual",), "audio": ("thinker.model.audio_tower",),
                "lm": ("thinker.model.language_model", "thinker.lm_head"), "talker": ("talker",),
                "code2wav": ("code2wav",)},
               {"lm": "thinker.model.language_model", "talker": "talker.model"}, generator="thinker", notes=_MERGER),
):
    FAMILIES.register(_spec.model_type, _spec)


def family_spec(model_type: str, where: str = "config.json") -> FamilySpec:
    """The `FamilySpec` of a transformers ``model_type``; an unsupported one is a one-line error (naming ``where``)
    that lists the supported ones."""
    if model_type not in FAMILIES:
        raise UnknownPartError(f"{where}: model_type {model_type!r} is not supported; supported transformers model "
                               f"types: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(model_type)


def _first(config: dict, *keys: str, default=None):
    return next((config[k] for k in keys if config.get(k) is not None), default)


def config_summary(config: dict) -> dict[str, str]:
    """``vision``, ``connector``, ``lm`` and ``sparsity`` of a transformers config mapping as short text (the
    catalogue's columns)."""
    spec = family_spec(config.get("model_type"), where="transformers.config")
    holder = config.get("thinker_config", config)
    vision, text = holder.get("vision_config", {}), holder.get("text_config", {})
    width = _first(vision, "hidden_size", default="?")
    depth = _first(vision, "depth", "num_hidden_layers", default="?")
    patch = _first(vision, "patch_size", default="?")
    experts = _first(text, "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
    top_k = _first(text, "num_experts_per_tok", "moe_topk", "moe_k", default=1)
    shared = _first(text, "n_shared_experts", "moe_num_shared_experts", default=1 if spec.tuple_output else 0)
    sparsity = "dense (a zoo policy upcycles it)"
    if spec.sparse:
        banks = "text + vision experts " if spec.modality_kwarg else ""
        sparsity = f"native: {banks}{experts}e top-{top_k}" + (f" +{shared} shared" if shared else "")
    return {"vision": f"{spec.model_type} ViT d{width}x{depth} patch {patch}", "connector": spec.bridge,
            "lm": f"{spec.model_type} d{_first(text, 'hidden_size', default='?')}x"
                  f"{_first(text, 'num_hidden_layers', default='?')}",
            "sparsity": sparsity}


__all__ = ["FAMILIES", "FamilySpec", "config_summary", "family_spec"]
