"""``ZooModel``: vision expert -> connector -> splice at ``<image>`` placeholders -> transformers causal LM."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import GenerationConfig

from zoo.checkpoint import load_weights, read_checkpoint_config, save_checkpoint
from zoo.config import ConfigError, LoRAExpertConfig, ModelConfig, SparsityConfig, from_dict
from zoo.connectors import build_connector
from zoo.encoders import FusedVision, build_vision, map_pixels, num_images
from zoo.generation import BatchDecoding
from zoo.lm import build_lm, lm_config_dict
from zoo.lm.lora import (
    apply_lora,
    gather_lora_aux_losses,
    gather_lora_routing_stats,
    lora_context,
    lora_modules,
    update_lora_biases,
)
from zoo.lm.lora import merge_lora as merge_lora_layers
from zoo.lm.lora import unmerge_lora as unmerge_lora_layers
from zoo.lm.sparse import gather_aux_losses, gather_routing_stats, modality_mask, sparse_context, sparsify
from zoo.moe.layer import RoutingStats, update_router_biases
from zoo.tokenizer import build_tokenizer

IGNORE_INDEX = -100


def pad_token_ids(sequences: Sequence[list[int]], pad_id: int, padding_side: str = "right"):
    """Pad token-id lists to ``input_ids`` and ``attention_mask`` ``[B, T]`` (``padding_side``: left | right)."""
    if not sequences:
        raise ValueError("pad_token_ids: no sequences to pad")
    width = max(len(seq) for seq in sequences)
    rows, masks = [], []
    for seq in sequences:  # one tensor built from lists: row-by-row tensor writes cost 10x more at batch 256
        gap = width - len(seq)
        rows.append([pad_id] * gap + list(seq) if padding_side == "left" else list(seq) + [pad_id] * gap)
        masks.append([0] * gap + [1] * len(seq) if padding_side == "left" else [1] * len(seq) + [0] * gap)
    ids, mask = torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
    return ids, mask


def _embedded_vocab(tokenizer, config: ModelConfig) -> int | None:
    """How many token ids the LM must embed: the tokenizer's length, less an image token appended after the LM's
    declared vocabulary (released LLaVA checkpoints: 32000 ids, ``<image>`` added as 32000); the splice replaces
    image placeholders before the embedding, so that id is never looked up."""
    if tokenizer is None:
        return None
    declared = config.lm.config.get("vocab_size")
    image_id = tokenizer.convert_tokens_to_ids(config.tokenizer.image_token)
    return declared if declared == len(tokenizer) - 1 == image_id else len(tokenizer)


@dataclass
class Spliced:
    """The LM's inputs after the image blocks replace their placeholders (all ``[B, T']``, embeds ``[B, T', d]``)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_mask: torch.Tensor  # True at image-token positions: the modality mask sparse layers read
    labels: torch.Tensor | None = None


@dataclass
class ZooOutput:
    """``loss`` = LM cross-entropy + sum of coefficient * aux loss; each aux term is kept unscaled by name."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    past_key_values: object | None = None
    image_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # of the spliced sequence
    # routing statistics of every routed part: sparse LM layers (lm.layers.{i}), routed LoRA layers (lm.lora.<module>),
    # sparse vision blocks (vision[.{e}].layers.{i}) and MoE connectors (connector[.{e}])
    routing_stats: dict[str, RoutingStats] = field(default_factory=dict)


class ZooModel(nn.Module):
    """A vision-language model assembled from a :class:`~zoo.config.ModelConfig`.

    Build one with :func:`zoo.build` or load one with :func:`zoo.load`. ``forward`` takes ``pixel_values``
    ``[N_images, 3, S, S]`` (images in placeholder order across the batch; with several vision experts, a dict of
    one such tensor per expert, as ``model.vision.preprocess`` gives), ``input_ids`` ``[B, T]`` holding one
    image-token id per image, and optional ``attention_mask`` / ``labels`` ``[B, T]``.
    """

    def __init__(self, config: ModelConfig, tokenizer=None):
        super().__init__()
        config = copy.deepcopy(config)  # the model owns its config (image_token_id is filled in below)
        self.config = config
        self.tokenizer = tokenizer
        self.vision = build_vision(config.vision, config.fusion)
        self.lm = build_lm(config.lm, vocab_size=_embedded_vocab(tokenizer, config))
        self.connector = build_connector(config.connector, self.vision.width, self.lm.config.hidden_size)
        if self.num_image_tokens >= config.max_length:
            raise ConfigError(f"max_length: {config.max_length} leaves no room for text after the "
                              f"{self.num_image_tokens} tokens of one image")
        if config.lm.sparsity is not None:
            sparsify(self.lm, config.lm.sparsity)
        if config.lm.lora is not None:
            apply_lora(self.lm, config.lm.lora)
        if config.image_token_id is None:
            if tokenizer is None:
                raise ValueError("image_token_id: not set and no tokenizer to read it from")
            config.image_token_id = tokenizer.convert_tokens_to_ids(config.tokenizer.image_token)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """LM positions one image occupies after splicing (the connector may compress or pool the vision tokens)."""
        sequence = isinstance(self.vision, FusedVision) and self.vision.fusion.mode == "sequence"
        counts = self.vision.token_counts if sequence else self.vision.num_tokens
        output_tokens = getattr(self.connector, "output_tokens", None)
        if output_tokens is not None:
            return int(output_tokens(counts))
        return sum(counts) if sequence else counts

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor | dict[str, torch.Tensor], text: torch.Tensor | None = None):
        """``[N, 3, S, S]`` (or, for several vision experts, ``{"0": [N, 3, S0, S0], ...}`` from
        ``model.vision.preprocess``) -> :class:`~zoo.connectors.ConnectorOutput` with tokens ``[N, Lv, d_lm]``.
        ``text`` ``[N, d_lm]``: each image's `question_context`, for connectors that read the question."""
        return self._connect(self.vision_features(pixel_values), text)

    def vision_features(self, pixel_values: torch.Tensor | dict[str, torch.Tensor]):
        """The vision tower's (fused) features: ``[N, L, C]``, or one ``[N, L_e, C_e]`` per sequence-fused expert."""
        if isinstance(self.vision, FusedVision):
            return self.vision(pixel_values)
        if isinstance(pixel_values, dict):
            raise TypeError("pixel_values: a dict of per-expert pixels was given to a single-expert model")
        return self.vision(pixel_values.to(next(self.vision.parameters()).dtype))

    @property
    def reads_question(self) -> bool:
        """Whether the connector reads each image's question (MoVA's gate): it then gets `question_context`."""
        return bool(getattr(self.connector, "reads_question", False))

    def _connect(self, features, text: torch.Tensor | None = None):
        features = self._cast_features(features)
        return self.connector(features, text=text) if self.reads_question else self.connector(features)

    def question_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """``[N_placeholders, d_lm]``: for each image placeholder (in batch order), the mean LM input embedding of
        its sample's prompt tokens -- real tokens, not image placeholders and, when ``labels`` are given,
        unsupervised (so a connector that reads the question never sees the answer). The same call at training and
        at generation time gives a question-reading connector the same text."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_img = (input_ids == self.image_token_id) & mask
        keep = mask & ~is_img
        if labels is not None:
            keep = keep & (labels == IGNORE_INDEX)
        embeds = self.lm.get_input_embeddings()(torch.where(keep, input_ids, torch.zeros_like(input_ids)))
        weights = keep.unsqueeze(-1).to(embeds.dtype)
        per_sample = (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return per_sample[is_img.nonzero()[:, 0]]

    def _cast_features(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        param = next(self.connector.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (self.device, None)
        if isinstance(features, (list, tuple)):
            return [f.to(device, dtype) for f in features]
        return features.to(device, dtype)

    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               padding_side: str = "right", image_positions: torch.Tensor | None = None) -> Spliced:
        """Replace each image placeholder by its block of image tokens, vectorised over the batch.

        The output is padded on ``padding_side`` (left for generation); labels at image positions are -100.
        ``image_positions`` ``[L]`` (a connector's ``routing["position_ids"]``, MouSi's position compression): the
        image tokens' position offsets, from 0 in steps of 0 or 1; tokens with equal ids share a position and the
        text after the image continues after the last id. None: one position per image token.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_img = (input_ids == self.image_token_id) & attention_mask.bool()
        n_img = is_img.sum(1)
        given = 0 if image_embeds is None else image_embeds.shape[0]
        if int(n_img.sum()) != given:
            raise ValueError(f"input_ids hold {int(n_img.sum())} image placeholder(s) (id {self.image_token_id}) "
                             f"but {given} image(s) were given; per sample: {n_img.tolist()}")
        L = image_embeds.shape[1] if image_embeds is not None else 1
        before = torch.cumsum(is_img.long(), 1) - is_img.long()  # placeholders strictly before each position
        new_pos = torch.arange(T, device=input_ids.device).unsqueeze(0) + (L - 1) * before
        new_len = T + (L - 1) * n_img
        total = int(new_len.max())
        if padding_side == "left":
            new_pos = new_pos + (total - new_len).unsqueeze(1)
        elif padding_side != "right":
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        valid = attention_mask.sum(1) + (L - 1) * n_img
        if int(valid.max()) > self.config.max_length:
            worst = int(valid.argmax())
            raise ValueError(f"sample {worst} is {int(valid[worst])} tokens long after expanding its images "
                             f"(max_length {self.config.max_length}); truncate it in the data pipeline")

        embed = self.lm.get_input_embeddings()
        text_ids = torch.where(is_img, torch.zeros_like(input_ids), input_ids)
        text_embeds = embed(text_ids)
        d = text_embeds.shape[-1]
        rows = torch.arange(B, device=input_ids.device).unsqueeze(1).expand(B, T)
        is_text = ~is_img
        embeds = text_embeds.new_zeros(B, total, d)
        embeds[rows[is_text], new_pos[is_text]] = text_embeds[is_text]
        mask = attention_mask.new_zeros(B, total)
        mask[rows, new_pos] = attention_mask
        image_mask = torch.zeros(B, total, dtype=torch.bool, device=input_ids.device)
        if given:
            offsets = torch.arange(L, device=input_ids.device)
            img_rows = rows[is_img].unsqueeze(1).expand(-1, L)
            img_cols = new_pos[is_img].unsqueeze(1) + offsets
            embeds[img_rows, img_cols] = image_embeds.to(embeds.dtype)
            mask[img_rows, img_cols] = 1
            image_mask[img_rows, img_cols] = True
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((B, total), IGNORE_INDEX)
            new_labels[rows[is_text], new_pos[is_text]] = labels[is_text]
            new_labels = new_labels.masked_fill(mask == 0, IGNORE_INDEX)
        steps = mask.long()  # how far each token advances the position id
        if image_positions is not None and given:
            ids = image_positions.to(steps.device)
            step = torch.diff(ids, prepend=ids.new_full((1,), -1))  # 1 where a new id starts (the first always)
            if ids.shape != (L,) or int(ids[0]) != 0 or not bool(((step == 0) | (step == 1)).all()):
                raise ValueError(f"image_positions: expected [{L}] ids from 0 in steps of 0 or 1, got {ids.tolist()}")
            steps[img_rows, img_cols] = step.expand_as(img_cols)
        position_ids = (steps.cumsum(1) - 1).clamp(min=0)
        return Spliced(embeds, mask, position_ids, image_mask, new_labels)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | dict[str, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None,
                image_features: torch.Tensor | list[torch.Tensor] | None = None,
                task: torch.Tensor | list[str] | list[int] | None = None) -> ZooOutput:
        """Logits ``[B, T', V]`` over the spliced sequence; with ``labels``, the loss on unmasked labels.

        ``image_index`` ``[N_placeholders]`` (optional) maps each placeholder, in batch order, to a row of
        ``pixel_values``: an image shared by several samples is then encoded once. ``image_features`` replaces
        ``pixel_values`` with the vision tower's output read from a `zoo.encoders.FeatureCache` (frozen vision).
        ``task`` ``[B]`` (LoRA task adapters, ``lm.lora.mode: task``): each sample's adapter, by name or index.
        A sample whose labels are all -100 raises: it would train on nothing (data pipelines skip such samples).
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("pixel_values and image_features: give one, not both")
        features = image_features
        vision_ran = features is None and pixel_values is not None and num_images(pixel_values) > 0
        if vision_ran:
            features = self.vision_features(pixel_values)
        if image_index is not None:
            n_images = 0 if features is None else len(features[0] if isinstance(features, list) else features)
            in_range = image_index.ndim == 1 and bool(((image_index >= 0) & (image_index < n_images)).all())
            if not in_range:
                raise ValueError(f"image_index: expected [N_placeholders] indices into the {n_images} given "
                                 f"images, got {image_index.tolist()}")
        text = None
        if features is not None and self.reads_question:  # each placeholder's own question: connect per placeholder
            text = self.question_context(input_ids, attention_mask, labels)
            if image_index is not None:
                index = image_index.to(text.device)
                features = [f[index] for f in features] if isinstance(features, list) else features[index]
                image_index = None
        image_out = self._connect(features, text) if features is not None else None
        image_tokens = image_out.tokens if image_out is not None else None
        if image_index is not None and image_tokens is not None:
            image_tokens = image_tokens[image_index]
        positions = image_out.routing.get("position_ids") if image_out is not None else None
        sp = self.splice(input_ids, image_tokens, attention_mask, labels, image_positions=positions)
        if sp.labels is not None:
            # The LM predicts token t+1 from t: a label at position 0 is never a target.
            empty = (sp.labels[:, 1:] == IGNORE_INDEX).all(1)
            if bool(empty.any()):
                raise ValueError(f"sample(s) {empty.nonzero().flatten().tolist()} have no supervised token "
                                 "(all labels are -100): the loss would be silently zero for them")
        with self._lm_context(sp.image_mask, sp.attention_mask, task):
            out = self.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                          position_ids=sp.position_ids, labels=sp.labels, use_cache=False)
        aux = {f"connector.{k}": v for k, v in image_out.aux_losses.items()} if image_out is not None else {}
        routing = dict(image_out.routing) if image_out is not None else {}
        loss = out.loss
        if loss is not None and image_out is not None:
            coefficients = self.config.connector.coefficients
            for name, value in image_out.aux_losses.items():
                coefficient = coefficients.get(name, coefficients.get(name.rsplit(".", 1)[0], 0.0))
                if coefficient:
                    loss = loss + coefficient * value
        parts = [("lm", *self._lm_aux_losses())] + (self._vision_aux_losses() if vision_ran else [])
        for prefix, losses, coefficients in parts:
            aux.update({f"{prefix}.{name}": value for name, value in losses.items()})
            if loss is not None:
                for name, coefficient in coefficients.items():
                    if coefficient and name in losses:
                        loss = loss + coefficient * losses[name]
        stats = self._lm_routing_stats()
        if vision_ran:
            stats.update(gather_routing_stats(self.vision))
        if image_out is not None:
            stats.update(image_out.routing_stats)
        return ZooOutput(logits=out.logits, loss=loss, lm_loss=out.loss, aux_losses=aux, routing=routing,
                         image_mask=sp.image_mask, attention_mask=sp.attention_mask, routing_stats=stats)

    def _vision_experts(self) -> list[tuple[str, nn.Module]]:
        """``(name, expert)`` of each vision expert: ``vision`` alone, ``vision.<i>`` when several are fused."""
        if isinstance(self.vision, FusedVision):
            return [(f"vision.{i}", e) for i, e in enumerate(self.vision.experts)]
        return [("vision", self.vision)]

    def _vision_aux_losses(self) -> list[tuple[str, dict[str, torch.Tensor], dict[str, float]]]:
        """``(prefix, unscaled losses, coefficients)`` of each sparse vision expert's last call (CuMo's CLIP-MoE)."""
        out = []
        for (name, expert), cfg in zip(self._vision_experts(), self.config.vision_experts):
            if cfg.sparsity is not None:
                out.append((name, gather_aux_losses(expert, cfg.sparsity.layer_losses), cfg.sparsity.coefficients))
        return out

    def _lm_aux_losses(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The LM's unscaled aux losses of the last call (sparse FFNs, LoRA experts) and their coefficients."""
        losses: dict[str, torch.Tensor] = {}
        coefficients: dict[str, float] = {}
        if self.config.lm.sparsity is not None:
            losses.update(gather_aux_losses(self.lm, self.config.lm.sparsity.layer_losses))
            coefficients.update(self.config.lm.sparsity.coefficients)
        if self.config.lm.lora is not None:
            losses.update(gather_lora_aux_losses(self.lm))
            coefficients["lora_balance"] = self.config.lm.lora.aux_coef
        return losses, coefficients

    def _lm_routing_stats(self) -> dict[str, RoutingStats]:
        stats = gather_routing_stats(self.lm)
        stats.update({f"lm.lora.{name}": value for name, value in gather_lora_routing_stats(self.lm).items()})
        return stats

    @contextlib.contextmanager
    def _lm_context(self, image_mask: torch.Tensor, attention_mask: torch.Tensor | None, task=None):
        """Hands this LM call's modality and padding masks to the sparse layers, and the padding mask and task
        tags to the LoRA layers (no-ops for a dense LM without LoRA)."""
        padding = attention_mask.bool() if attention_mask is not None else None
        with contextlib.ExitStack() as stack:
            policy = self.config.lm.sparsity
            if policy is not None:
                modality = modality_mask(image_mask, attention_mask, policy.last_image_token_as_text)
                stack.enter_context(sparse_context(self.lm, modality, padding))
            if self.config.lm.lora is not None:
                stack.enter_context(lora_context(self.lm, padding, task))
            elif task is not None:
                raise ValueError("task: per-sample task tags need LoRA task adapters (lm.lora.mode: task)")
            yield

    def update_balancing_biases(self) -> int:
        """The aux-loss-free balancing step of every bias-balanced router (``sigmoid_bias`` MoE routers, LoRA
        experts with ``balance: bias``), over the load counted since the last call; call it after each optimiser
        step (`zoo.train` does). Returns how many routers moved."""
        return update_router_biases(self) + update_lora_biases(self)

    def sparsify(self, policy: SparsityConfig | dict) -> list[int]:
        """Make the LM sparse by ``policy`` in place (e.g. upcycle after a dense stage); the config records it so
        checkpoints rebuild the sparse architecture. Returns the sparse layer indices."""
        return self._adapt_lm("sparsity", SparsityConfig, policy, sparsify, "the model is already sparse")

    def sparsify_vision(self, policy: SparsityConfig | dict, experts: Sequence[int] | None = None) -> dict[str, list]:
        """Make the MLPs of vision experts' transformer blocks sparse by ``policy`` in place (CuMo's co-upcycling of
        CLIP at its SFT stage: preset ``cumo``); ``experts``: indices into ``vision`` (default: all). The config
        records the policy per expert. Returns the sparse block indices by expert name."""
        from zoo.encoders.base import sparsify_expert

        if isinstance(policy, dict):
            policy = from_dict(SparsityConfig, policy, path="vision.sparsity")
        named, configs = self._vision_experts(), self.config.vision_experts
        chosen = range(len(named)) if experts is None else list(experts)
        out = {}
        for i in chosen:
            if not 0 <= i < len(named):
                raise ValueError(f"experts: {i} is not a vision expert index (0-{len(named) - 1})")
            name, expert = named[i]
            path = "vision" if name == "vision" else f"vision[{i}]"
            if configs[i].sparsity is not None:
                raise ValueError(f"{path}.sparsity: the expert is already sparse")
            out[name] = sparsify_expert(expert, policy, path=f"{path}.sparsity", name=name)
            configs[i].sparsity = copy.deepcopy(policy)
            getattr(expert, "expert", expert).config.sparsity = configs[i].sparsity
        return out

    def add_lora(self, config: LoRAExpertConfig | dict) -> list[str]:
        """Put LoRA (or LoRA experts) on the LM's linear layers in place, freezing the rest of the LM (e.g. at a
        stage boundary); the config records it so checkpoints rebuild it. Returns the wrapped module names."""
        return self._adapt_lm("lora", LoRAExpertConfig, config, apply_lora, "the model already has LoRA layers")

    def _adapt_lm(self, field: str, cls: type, value, apply, already: str) -> list:
        """Apply ``lm.<field>`` (a ``cls`` or its mapping) to the LM with ``apply`` and record it in the config."""
        if isinstance(value, dict):
            value = from_dict(cls, value, path=f"lm.{field}")
        if getattr(self.config.lm, field) is not None:
            raise ValueError(f"lm.{field}: {already}")
        changed = apply(self.lm, value)
        setattr(self.config.lm, field, value)
        return sorted(changed)

    def merge_lora(self) -> int:
        """Fold zoo LoRA layers (modes single and task's active adapter) into the base weights for deployment;
        `unmerge_lora` restores them bitwise. Routed modes raise. Returns the number of layers."""
        return merge_lora_layers(self.lm)

    def unmerge_lora(self) -> int:
        """Undo `merge_lora` exactly; returns the number of LoRA layers."""
        return unmerge_lora_layers(self.lm)

    # ------------------------------------------------------------------ prompts and generation
    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the prompt template filled with `question` (one image placeholder)."""
        text = self.config.prompt.format(question=question)
        return self.tokenizer(text).input_ids

    def encode_answer(self, answer: str) -> list[int]:
        """Token ids of an answer as it follows the prompt, closed by EOS (the supervised span)."""
        return self.tokenizer(" " + answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | dict[str, torch.Tensor] | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, max_new_tokens: int = 16,
                 image_embeds: torch.Tensor | None = None, task=None,
                 generation_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 seed: int | Sequence[int | None] | None = None, streamer=None) -> torch.Tensor:
        """Decoding with the KV cache from left-padded prompts; returns new ids ``[B, <=max_new_tokens]`` (pad after
        EOS). Greedy by default; ``generation_config`` (transformers' `GenerationConfig`, one for all sequences or
        one per sequence; `zoo.generation.sampling_config` builds one) samples with temperature / top-p / top-k /
        min-p, applies a repetition penalty, stops at stop strings and sets each sequence's ``max_new_tokens``;
        ``seed`` (one, or one per sequence) makes sampling reproducible whatever the batch. ``streamer``:
        transformers' streamer interface (``put`` gets the prompt ids, then each step's ``[B]`` tokens; ``end``).
        ``image_embeds`` ``[N, L, d_lm]`` replaces ``pixel_values`` with image blocks computed by the caller (MoVA's
        two passes). ``task``: per-sample LoRA task tags, as in `forward`."""
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pixel_values and image_embeds: give one, not both")
        decoding = BatchDecoding(input_ids, attention_mask, self.tokenizer, max_new_tokens, generation_config, seed)
        positions = None
        if pixel_values is not None:
            text = self.question_context(input_ids, attention_mask) if self.reads_question else None
            image_out = self.encode_images(pixel_values, text)
            image_embeds, positions = image_out.tokens, image_out.routing.get("position_ids")
        sp = self.splice(input_ids, image_embeds, attention_mask, padding_side="left", image_positions=positions)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with self._lm_context(sp.image_mask, sp.attention_mask, task):
            out = self.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                          position_ids=sp.position_ids, use_cache=True)
        mask, position = sp.attention_mask, sp.position_ids[:, -1:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        steps = []
        for step in range(decoding.steps):
            token = decoding.next_tokens(out.logits[:, -1], done)
            steps.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            done = decoding.update_done(token, done)
            if bool(done.all()) or step == decoding.steps - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            position = position + 1
            text = torch.zeros_like(token, dtype=torch.bool).unsqueeze(1)  # generated tokens are text
            with self._lm_context(text, None, task):
                out = self.lm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                              past_key_values=out.past_key_values, use_cache=True)
        if streamer is not None:
            streamer.end()
        return torch.stack(steps, 1)

    def collate_prompts(self, prompts: Sequence[list[int]], padding_side: str = "left"):
        """Pad token-id lists to ``input_ids`` and ``attention_mask`` ``[B, T]`` with the tokenizer's pad id."""
        return pad_token_ids(prompts, self.tokenizer.pad_token_id, padding_side)

    def prompt_inputs(self, images: Sequence[Image.Image], questions: Sequence[str],
                      padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Model inputs for one question about each image (``input_ids``, ``attention_mask``, ``pixel_values``) on
        the model's device: the prompt template, the tokenizer and the vision experts' preprocessing (left padding for
        generation). `zoo.families.FamilyModel` gives the same through its processor and chat template."""
        ids, mask = self.collate_prompts([self.encode_prompt(q) for q in questions], padding_side)
        pixels = map_pixels(self.vision.preprocess(images), lambda t: t.to(self.device))
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "pixel_values": pixels}

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8,
               batch_size: int = 16, progress: bool = False) -> list[str]:
        """Answer one question per image: greedy, batched with left padding; answers do not depend on batch size."""
        if len(images) != len(questions):
            raise ValueError(f"answer(): {len(images)} images but {len(questions)} questions")
        if self.tokenizer is None:
            raise ValueError("answer(): this model has no tokenizer")
        was_training = self.training
        self.eval()
        answers: list[str] = []
        starts = range(0, len(questions), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="answering", unit="batch")
        try:
            for start in starts:
                batch = self.prompt_inputs(images[start:start + batch_size], questions[start:start + batch_size])
                new = self.generate(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], max_new_tokens)
                answers += [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.train(was_training)
        return answers

    # ------------------------------------------------------------------ checkpoints
    def resolved_config(self) -> ModelConfig:
        """The config that rebuilds this exact architecture without any download: parts' architectures are
        written out in full and ``pretrained`` flags are cleared (the weights come from the checkpoint)."""
        config = copy.deepcopy(self.config)
        config.vision = self.vision.resolved_config()
        config.lm.pretrained = False
        config.lm.config = lm_config_dict(self.lm)
        config.tokenizer.train_on = None
        return config

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files to `directory`. Merged zoo LoRA
        layers are saved unmerged (W0 and the factors), as the config rebuilds them."""
        merged = [layer for layer in lora_modules(self.lm).values() if layer.merged]
        for layer in merged:
            layer.unmerge()
        try:
            return save_checkpoint(self, directory)
        finally:
            for layer in merged:
                layer.merge()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> ZooModel:
        """Load a checkpoint written by :meth:`save_pretrained` (no pickle; tensors checked by name and shape)."""
        directory = Path(directory)
        config = read_checkpoint_config(directory)
        tokenizer = None
        if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
            tokenizer = build_tokenizer(config.tokenizer, path=str(directory))
        model = cls(config, tokenizer)
        load_weights(model, directory)
        if device is not None:
            model.to(device)
        return model.eval()
