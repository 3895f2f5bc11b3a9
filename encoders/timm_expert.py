"""Vision experts from timm: any timm ViT-style model by name, features from a chosen block."""

from __future__ import annotations

import torch

from zoo.config import VisionConfig

from .base import ENCODERS, VisionExpert, hidden_state_to_block


@ENCODERS.register("timm")
class TimmExpert(VisionExpert):
    """A timm model (``timm.create_model(name, **kwargs)``) read through ``forward_intermediates``.

    ``feature_layer`` counts like transformers' ``hidden_states`` (-2 = penultimate block); prefix tokens
    (CLS, registers) are dropped unless ``drop_prefix`` is false, in which case they come first.
    """

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        import timm
        import timm.data

        if not config.name:
            raise ValueError("vision.name: a timm model name is required for kind 'timm'")
        kwargs = dict(config.kwargs)
        if config.image_size is not None:
            kwargs.setdefault("img_size", config.image_size)
        kwargs.setdefault("num_classes", 0)
        try:
            self.model = timm.create_model(config.name, pretrained=config.pretrained, **kwargs)
        except Exception as e:  # timm raises RuntimeError/TypeError/hub errors; name the config fields instead
            raise ValueError(f"vision: timm.create_model({config.name!r}, pretrained={config.pretrained}, "
                             f"**{kwargs}) failed: {e}") from e
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "patch_embed"):
            raise ValueError(f"vision.name: timm model {config.name!r} is not a patch-token model "
                             "(needs forward_intermediates and patch_embed)")
        self.block_index = hidden_state_to_block(config.feature_layer, len(self.model.blocks))
        self.width = self.model.embed_dim
        self.grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        data_cfg = timm.data.resolve_model_data_config(self.model)
        self.image_size = int(config.image_size or data_cfg["input_size"][-1])
        self.mean = tuple(config.mean or data_cfg["mean"])
        self.std = tuple(config.std or data_cfg["std"])

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keep_prefix = not self.config.drop_prefix
        (out,) = self.model.forward_intermediates(
            pixel_values, indices=[self.block_index], return_prefix_tokens=keep_prefix, norm=False,
            stop_early=True, output_fmt="NLC", intermediates_only=True,
        )
        if keep_prefix:
            tokens, prefix = out
            return torch.cat([prefix, tokens], dim=1)
        return out
