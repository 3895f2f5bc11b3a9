"""Vision experts from timm: any timm model by name, patch tokens from a chosen block (ViTs) or stage (CNNs)."""

from __future__ import annotations

import torch

from zoo.config import ConfigError, VisionConfig

from .base import ENCODERS, VisionExpert, hidden_state_to_block


@ENCODERS.register("timm")
class TimmExpert(VisionExpert):
    """A timm model (``timm.create_model(name, **kwargs)``) read through ``forward_intermediates``.

    ViTs (models with ``patch_embed`` and ``blocks``): ``feature_layer`` counts like transformers'
    ``hidden_states`` (-2 = penultimate block); prefix tokens (CLS, registers) are dropped unless
    ``drop_prefix`` is false, in which case they come first. CNNs (ConvNeXt, ResNet, ...): ``feature_layer``
    indexes the feature stages (``model.feature_info``; -1 = last), and the map ``[B, C, h, w]`` is flattened
    row-major to ``[B, h*w, C]``. What comes after the chosen layer (later blocks, final norm, head) is pruned.
    """

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        import timm
        import timm.data

        if not config.name:
            raise ConfigError("vision.name: a timm model name is required for kind 'timm'")
        kwargs = dict(config.kwargs)
        kwargs.setdefault("num_classes", 0)
        try:
            self.model = _create(timm, config, kwargs)
        except Exception as e:  # timm raises RuntimeError/TypeError/hub errors; name the config fields instead
            raise ConfigError(f"vision: timm.create_model({config.name!r}, pretrained={config.pretrained}, "
                              f"**{kwargs}) failed: {e}") from e
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(f"vision.name: timm model {config.name!r} has no forward_intermediates")
        data_cfg = timm.data.resolve_model_data_config(self.model)
        self.image_size = int(config.image_size or data_cfg["input_size"][-1])
        self.mean = tuple(config.mean or data_cfg["mean"])
        self.std = tuple(config.std or data_cfg["std"])
        self.is_vit = hasattr(self.model, "patch_embed") and hasattr(self.model, "blocks")
        if self.is_vit:
            self.index = hidden_state_to_block(config.feature_layer, len(self.model.blocks))
            self.width = self.model.embed_dim
            self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
            self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))  # SAM ViTs have none
        else:
            stages = self.model.feature_info
            n = len(stages)
            if not -n <= config.feature_layer < n:
                raise ConfigError(f"vision.feature_layer: {config.feature_layer} is out of range for "
                                  f"{config.name!r} with {n} feature stages (valid: 0..{n - 1} or -{n}..-1)")
            self.index = config.feature_layer % n
            info = stages[self.index]
            self.width = int(info["num_chs"])
            side = -(-self.image_size // int(info["reduction"]))  # ceil: strided convs pad
            self.grid = (side, side)
            self.num_prefix_tokens = 0
        # CNNs and prefix-free ViTs whose intermediates are NCHW maps only (timm's SAM) are read as maps.
        self.spatial_maps = not self.is_vit or not hasattr(self.model, "num_prefix_tokens")
        # Blocks/stages after the feature layer and the head never run: drop them, so that no parameter sits in
        # the optimizer (or under DDP) without a gradient and parameter counts are honest.
        self.model.prune_intermediate_layers([self.index], prune_norm=True, prune_head=True)

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.spatial_maps:
            (fmap,) = self.model.forward_intermediates(pixel_values, indices=[self.index], stop_early=True,
                                                       intermediates_only=True)
            return fmap.flatten(2).transpose(1, 2)
        keep_prefix = not self.config.drop_prefix
        (out,) = self.model.forward_intermediates(
            pixel_values, indices=[self.index], return_prefix_tokens=keep_prefix, norm=False,
            stop_early=True, output_fmt="NLC", intermediates_only=True,
        )
        if keep_prefix:
            tokens, prefix = out
            return torch.cat([prefix, tokens], dim=1)
        return out



def _create(timm, config: VisionConfig, kwargs: dict):
    """``timm.create_model`` with ``img_size`` for ViT-style models; size-agnostic CNNs take no ``img_size``."""
    if config.image_size is None or "img_size" in kwargs:
        return timm.create_model(config.name, pretrained=config.pretrained, **kwargs)
    try:
        return timm.create_model(config.name, pretrained=config.pretrained, img_size=config.image_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(config.name, pretrained=config.pretrained, **kwargs)
