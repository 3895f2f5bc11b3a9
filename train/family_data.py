"""Training data for transformers-native models (`zoo.families`): conversations through the model's own chat
template and processor.

`FamilyConversationStream` is a `ConversationStream` (the same sources, mixing, resumable position, counted skips)
whose items come from `FamilyModel.encode_conversation`: the processor expands each image into its tokens and
returns the model's image tensors (``pixel_values``, ``image_grid_thw``, ``pixel_mask``, ...) and per-token type ids
(``mm_token_type_ids``, ERNIE's ``moe_mm_token_type_ids``); labels cover the assistant turns as the chat template
renders them. Batches pad the per-token tensors like ``input_ids`` and concatenate the image tensors in order.
"""

from __future__ import annotations

import torch

from zoo.config import ConfigError
from zoo.families import FamilyModel

from .conversations import BadSample, Conversation, ConversationStream, load_image

OWN_TEMPLATES = ("zoo", "chat_template")  # both mean the model's own chat template here


class FamilyConversationStream(ConversationStream):
    """A `ConversationStream` for a `FamilyModel` (module docstring). Items are ``(id, input_ids, labels,
    (per-token tensors, image tensors), position)``."""

    def __init__(self, model: FamilyModel, sources, weights=None, template: str = "chat_template", seed: int = 0,
                 epochs: int = 1, warn_ratio: float = 0.05):
        if template not in OWN_TEMPLATES:
            raise ConfigError(f"template: {model.config.name} is a transformers-native model and renders its "
                              f"conversations with its own chat template; use one of {', '.join(OWN_TEMPLATES)}, "
                              f"got {template!r}")
        super().__init__(model, sources, weights, "chat_template", seed, epochs, warn_ratio)

    def encode(self, sample: Conversation):
        """``(id, input_ids, labels, (per-token tensors, image tensors))``, or raises `BadSample`."""
        images = [load_image(im) for im in sample.images]
        try:
            batch = self.model.encode_conversation(sample.turns, images)
        except ValueError as e:
            raise BadSample(str(e)) from e
        ids, labels = batch.pop("input_ids")[0], batch.pop("labels")[0]
        batch.pop("attention_mask", None)
        per_token = {k: v[0].cpu() for k, v in batch.items() if v.shape[:2] == (1, ids.numel())}
        rest = {k: v.cpu() for k, v in batch.items() if k not in per_token}
        return sample.id, ids.tolist(), labels.tolist(), (per_token, rest)

    def collate(self, batch) -> dict:
        """``ConversationStream.collate``'s padded ids, mask, labels and position, plus the per-token tensors padded
        with 0 on the right and the image tensors concatenated."""
        out = super().collate([(item[0], item[1], item[2], None, *item[4:]) for item in batch])
        width = out["input_ids"].shape[1]
        per_token = [item[3][0] for item in batch]
        for key in dict.fromkeys(k for p in per_token for k in p):
            rows = [p.get(key, torch.zeros(len(item[1]), dtype=torch.long)) for p, item in zip(per_token, batch)]
            padded = rows[0].new_zeros(len(rows), width)
            for i, row in enumerate(rows):
                padded[i, : row.numel()] = row
            out[key] = padded
        images = [item[3][1] for item in batch if item[3][1]]
        for key in dict.fromkeys(k for image in images for k in image):
            out[key] = torch.cat([image[key] for image in images if key in image])
        return out


__all__ = ["FamilyConversationStream"]
