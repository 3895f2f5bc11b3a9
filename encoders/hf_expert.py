"""Vision experts from transformers: CLIP / SigLIP vision towers (and any AutoModel vision tower)."""

from __future__ import annotations

import torch

from zoo.config import ConfigError, VisionConfig
from zoo.errors import MissingWeightsError
from zoo.hf import config_to_dict

from .base import ENCODERS, VisionExpert, hidden_state_to_block

# Normalisation of the families whose processors we do not load when the weights are random.
_FAMILY_NORM = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2_with_registers": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _vision_config(config: VisionConfig):
    from transformers import AutoConfig

    if config.pretrained:
        if not config.name:
            raise ConfigError("vision.name: a hub id or local dir is required when vision.pretrained is true")
        try:
            cfg = AutoConfig.from_pretrained(config.name)
        except OSError as e:
            raise MissingWeightsError(f"vision.name: cannot resolve {config.name!r} locally or in the offline cache: "
                                      f"{e}") from e
        return getattr(cfg, "vision_config", cfg)
    kwargs = dict(config.kwargs)
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ConfigError("vision.kwargs.model_type: required for kind 'hf' without pretrained weights "
                          "(e.g. clip_vision_model, siglip_vision_model)")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"vision.kwargs: transformers rejected the vision config: {e}") from e


# Modules of a transformers vision tower that act after its last encoder layer (or on masked inputs only), so never
# on ``hidden_states``: CLIP/SigLIP's post-layernorm, SigLIP's attention-pooling head, DINOv2's final layernorm and
# mask token.
_UNUSED_BY_HIDDEN_STATES = ("post_layernorm", "head", "pooler", "layernorm", "embeddings.mask_token")


@ENCODERS.register("hf")
class HFVisionTower(VisionExpert):
    """A transformers vision tower read through ``hidden_states[feature_layer]`` (LLaVA's ``default`` strategy
    drops the CLS token).

    The whole tower is kept (its checkpoint layout stays transformers', e.g. llava-hf's), but the parameters that
    cannot reach ``hidden_states[feature_layer]`` -- the encoder layers after it and the modules of
    `_UNUSED_BY_HIDDEN_STATES` -- are frozen (``unused_parameters``): they never get a gradient, hold no optimiser
    state and need no ``find_unused_parameters`` under DDP.
    """

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        from transformers import AutoModel

        vcfg = _vision_config(config)
        if config.image_size is not None:
            vcfg.image_size = config.image_size
        if config.pretrained:
            try:
                self.model = AutoModel.from_pretrained(config.name, config=vcfg)
            except OSError as e:
                raise MissingWeightsError(f"vision.name: cannot load the weights of {config.name!r} from a local dir "
                                          f"or the offline cache: {e}") from e
        else:
            self.model = AutoModel.from_config(vcfg)
        self.hf_config = vcfg
        self.block_index = hidden_state_to_block(config.feature_layer, vcfg.num_hidden_layers)
        self.width = vcfg.hidden_size
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side, side)
        embeddings = _embeddings(self.model)
        has_cls = hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")  # CLIP / DINOv2
        self.num_prefix_tokens = int(has_cls) + int(getattr(vcfg, "num_register_tokens", 0) or 0)
        self.image_size = int(vcfg.image_size)
        mean, std = _FAMILY_NORM.get(vcfg.model_type, _FAMILY_NORM["clip_vision_model"])
        self.mean = tuple(config.mean or mean)
        self.std = tuple(config.std or std)
        self.freeze_unreachable()

    @property
    def reachable_blocks(self) -> int:
        """How many encoder layers feed ``hidden_states[feature_layer]`` (the rest run but are never read)."""
        return self.block_index + 1

    def freeze_unreachable(self) -> set[str]:
        """Freeze (again, e.g. after the blocks were sparsified) what ``hidden_states[feature_layer]`` cannot reach;
        returns those parameter names (``unused_parameters``)."""
        self.unused_parameters = self._unused_parameter_names()
        for name, param in self.model.named_parameters():
            if name in self.unused_parameters:
                param.requires_grad_(False)
        return self.unused_parameters

    def _unused_parameter_names(self) -> set[str]:
        """Parameter names (in ``self.model``) that cannot affect ``hidden_states[feature_layer]``."""
        layers = next((m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList)
                       and len(m) == self.hf_config.num_hidden_layers), None)
        later = {id(p) for layer in (layers[self.block_index + 1:] if layers is not None else []) for p in
                 layer.parameters()}
        inner = getattr(self.model, "vision_model", self.model)
        prefix = "vision_model." if inner is not self.model else ""
        after = [f"{prefix}{name}" for name in _UNUSED_BY_HIDDEN_STATES]
        return {name for name, p in self.model.named_parameters()
                if id(p) in later or any(name == a or name.startswith(a + ".") for a in after)}

    def resolved_config(self) -> VisionConfig:
        resolved = super().resolved_config()
        resolved.kwargs = config_to_dict(self.hf_config)
        return resolved

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.block_index + 1]
        return hidden[:, self.num_prefix_tokens:] if self.config.drop_prefix else hidden


def _embeddings(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "vision_model", model)
    return inner.embeddings
