"""`FamilyModel`: a transformers image-text-to-text model as a zoo model.

The forward is transformers' own (M-RoPE, DeepStack features, pixel shuffle, the resampler: untouched), and so are
the image processor and the chat template; every sparse block of its decoders is replaced by a zoo `MoELayer`
(or `ModalitySeparatedMoE` for ERNIE) converted exactly (`zoo.moe.from_transformers`). So the zoo's machinery works
on it: routing statistics per layer and modality in `ZooOutput.routing_stats`, aux losses with coefficients,
recipes that train experts / routers / LoRA experts, upcycling a dense base by a zoo policy, the eval harness.

The model's parts are its children (``vision``, ``connector`` where the model has one, ``lm``, and for Qwen3-Omni
``audio``, ``talker``, ``code2wav``): parameter names read ``lm.language_model.layers.3.mlp.moe.experts.w_in``.
The whole transformers model is ``model.hf`` (not a child: its modules are the parts').

Each call hands the sparse layers the modality mask (image / video tokens, or ERNIE's own
``moe_mm_token_type_ids``) and the padding mask through a forward pre-hook on the module that decodes, so
transformers' own ``generate`` feeds them too. Padding tokens are kept out of routing (their logits differ from
transformers', every real token's are the same).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from zoo.config import LoRAExpertConfig, ModelConfig, SparsityConfig, TransformersConfig, from_dict
from zoo.families.spec import FamilySpec, family_spec
from zoo.hf import config_to_dict
from zoo.lm.lora import apply_lora, gather_lora_aux_losses, gather_lora_routing_stats, update_lora_biases
from zoo.lm.sparse import SparseContext, SparseFFN, gather_aux_losses, gather_routing_stats, sparsify
from zoo.model import IGNORE_INDEX, ZooOutput
from zoo.moe import from_transformers, to_transformers, update_router_biases
from zoo.moe.hf import block_kind

ZOO_KEY = "zoo"  # config.json entry of a checkpoint with zoo-only structure (a sparsity policy, LoRA)
IMAGE_PLACEHOLDER = "<image>"  # where a conversation's images go (LLaVA data)


class FamilyFFN(SparseFFN):
    """A converted transformers sparse block in its decoder layer: the zoo layer, the block ``kind`` it is written
    back as, and what the decoder layer expects back (Llama 4 unpacks ``(hidden, router_logits)``)."""

    def __init__(self, moe: nn.Module, context: SparseContext, name: str, kind: str, tuple_output: bool):
        super().__init__(moe, context, name)
        self.kind, self.tuple_output = kind, tuple_output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = super().forward(hidden_states)
        return (out, self.last.routing.logits) if self.tuple_output else out


def _part(model: nn.Module, paths: Sequence[str]) -> nn.Module | None:
    """The module of a part: the one module at ``paths``, or a ModuleDict of several (named by their last
    component); None when the model has none of them (Qwen3-Omni without its talker)."""
    found = {p: model.get_submodule(p) for p in paths if _has(model, p)}
    if not found:
        return None
    if len(found) == 1:
        return next(iter(found.values()))
    return nn.ModuleDict({p.rsplit(".", 1)[-1]: m for p, m in found.items()})


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


class FamilyModel(nn.Module):
    """A transformers-native zoo model (module docstring). Build with `zoo.build` (a catalogue entry with a
    ``transformers`` block), `zoo.load` (a transformers checkpoint dir or hub id) or from a live transformers model
    (`FamilyModel(hf_model, processor)`); its native sparse blocks are converted in place."""

    def __init__(self, hf_model: nn.Module, processor=None, config: ModelConfig | None = None):
        super().__init__()
        spec = family_spec(hf_model.config.model_type, where=type(hf_model).__name__)
        object.__setattr__(self, "hf", hf_model)  # not a child module: its modules are the parts below
        self.spec: FamilySpec = spec
        self.processor = processor
        self.config = config or ModelConfig(name=spec.family, family=spec.family, prompt="{question}",
                                            transformers=TransformersConfig(config=config_to_dict(hf_model.config)))
        self.part_names = tuple(name for name, paths in spec.parts.items() if _part(hf_model, paths) is not None)
        for name in self.part_names:
            setattr(self, name, _part(hf_model, spec.parts[name]))
        covered = {id(p) for p in self.parameters()}
        stray = [n for n, p in hf_model.named_parameters() if id(p) not in covered]
        if stray:
            raise ValueError(f"{type(hf_model).__name__}: parameters outside the parts {self.part_names}: {stray[:5]}")
        self.context = SparseContext()
        self._convert_blocks()
        policy, lora = self.config.lm.sparsity, self.config.lm.lora
        if policy is not None:
            sparsify(self.text_model(), policy, self.context)
        if lora is not None:
            apply_lora(self.text_model(), lora)
        self.generator.register_forward_pre_hook(self._read_masks, with_kwargs=True)
        accepted = inspect.signature(self.generator.forward).parameters
        self._forward_options = {"output_router_logits": False} if "output_router_logits" in accepted else {}

    # ------------------------------------------------------------------ structure
    def _convert_blocks(self) -> None:
        """Every native sparse block of every decoder becomes a `FamilyFFN` around its exact zoo conversion."""
        for prefix, path in self.spec.decoders.items():
            if not _has(self.hf, path):
                continue
            for i, layer in enumerate(self.hf.get_submodule(path).layers):
                block = getattr(layer, self.spec.ffn)
                kind = block_kind(block)
                if kind is not None:
                    setattr(layer, self.spec.ffn, FamilyFFN(from_transformers(block), self.context,
                                                            f"{prefix}.layers.{i}", kind, self.spec.tuple_output))

    @property
    def generator(self) -> nn.Module:
        """The module whose forward gives the logits and whose ``generate`` decodes (Qwen3-Omni: the thinker)."""
        return self.hf.get_submodule(self.spec.generator) if self.spec.generator else self.hf

    def text_model(self) -> nn.Module:
        """The language model's decoder stack (the module holding ``layers``), where policies and LoRA apply."""
        return self.hf.get_submodule(self.spec.decoders["lm"])

    def named_sparse_blocks(self) -> list[tuple[nn.Module, FamilyFFN]]:
        """``(decoder layer, FamilyFFN)`` of every converted native block."""
        out = []
        for path in self.spec.decoders.values():
            if _has(self.hf, path):
                out += [(layer, getattr(layer, self.spec.ffn)) for layer in self.hf.get_submodule(path).layers
                        if isinstance(getattr(layer, self.spec.ffn), FamilyFFN)]
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", None)

    def train(self, mode: bool = True) -> FamilyModel:
        super().train(mode)
        self.hf.train(mode)  # the transformers model's own flag (its modules are the parts, already set)
        return self

    def missing_part(self, name: str) -> str | None:
        """Why this model has no part ``name`` (e.g. the merger lives in the vision tower), if known."""
        return self.spec.notes.get(name)

    # ------------------------------------------------------------------ masks for the sparse layers
    def visual_token_ids(self) -> list[int]:
        config = self.generator.config
        return [int(i) for i in (getattr(config, a, None) for a in self.spec.visual_tokens) if i is not None]

    def _read_masks(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the decoding module: this call's modality and padding masks for the sparse layers."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else embeds.shape[1] if embeds is not None else None
        mask = kwargs.get("attention_mask")
        self.context.padding = mask[:, -length:].bool() if mask is not None and mask.dim() == 2 and length else None
        if self.spec.modality_kwarg is not None:  # ERNIE routes by its own token types: read them, exactly
            types = kwargs.get(self.spec.modality_kwarg)
            self.context.modality = types.bool() if types is not None else (
                torch.zeros_like(ids, dtype=torch.bool) if ids is not None else None)
        else:
            visual = torch.tensor(self.visual_token_ids(), device=ids.device) if ids is not None else None
            self.context.modality = torch.isin(ids, visual) if ids is not None else None
        lora = getattr(self.text_model(), "zoo_lora_context", None)
        if lora is not None:  # LoRA experts keep padding out of their routing too
            lora.padding = self.context.padding

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **inputs) -> ZooOutput:
        """Transformers' forward on the processor's outputs (``input_ids``, ``pixel_values``, ``image_grid_thw``, ...):
        logits ``[B, T, V]``; with ``labels`` ``[B, T]`` the LM loss plus the weighted aux losses; the routing
        statistics of every sparse layer (``lm.layers.{i}``, split into image and text tokens)."""
        out = self.generator(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                             **self._forward_options, **inputs)
        losses, coefficients = self._aux_losses()
        loss = out.loss
        if loss is not None:
            for name, value in losses.items():
                if coefficients.get(name):
                    loss = loss + coefficients[name] * value
        stats = gather_routing_stats(self)
        stats.update({f"lm.lora.{k}": v for k, v in gather_lora_routing_stats(self.text_model()).items()})
        return ZooOutput(logits=out.logits, loss=loss, lm_loss=out.loss,
                         aux_losses={f"lm.{k}": v for k, v in losses.items()}, routing_stats=stats,
                         image_mask=self.context.modality, attention_mask=attention_mask)

    def _aux_losses(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The language model's unscaled aux losses of the last call and their coefficients: a policy's own, else
        the config's, else transformers' ``router_aux_loss_coef`` on every balance loss (averaged over the layers,
        as transformers' balance loss runs over all layers' tokens at once)."""
        policy, lora = self.config.lm.sparsity, self.config.lm.lora
        losses = gather_aux_losses(self.text_model(), policy.layer_losses if policy is not None else "mean")
        coefficient = float(getattr(self.hf.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)
        coefficients = {n: coefficient for n in losses if n.startswith("balance")}
        if policy is not None:
            coefficients = dict(policy.coefficients)
        if self.config.transformers is not None and self.config.transformers.coefficients is not None:
            coefficients = dict(self.config.transformers.coefficients)
        if lora is not None:
            losses.update(gather_lora_aux_losses(self.text_model()))
            coefficients["lora_balance"] = lora.aux_coef
        return losses, coefficients

    def update_balancing_biases(self) -> int:
        """The aux-loss-free balancing step of every bias-selected router (GLM-4.5V's, ERNIE's; LoRA experts with
        ``balance: bias``); `zoo.train` calls it after each optimiser step. Returns how many routers moved."""
        return update_router_biases(self) + update_lora_biases(self)

    # ------------------------------------------------------------------ adapting the language model
    def sparsify(self, policy: SparsityConfig | dict) -> list[int]:
        """Upcycle the language model's dense FFNs by a zoo policy (``qwen3_vl`` / ``glm4v`` into sparse models); the
        config records it. Returns the sparse layer indices."""
        if isinstance(policy, dict):
            policy = from_dict(SparsityConfig, policy, path="lm.sparsity")
        if self.config.lm.sparsity is not None or self.named_sparse_blocks():
            raise ValueError(f"lm.sparsity: {self.config.name} is already sparse")
        layers = sorted(sparsify(self.text_model(), policy, self.context))
        self.config.lm.sparsity = policy
        return layers

    def add_lora(self, config: LoRAExpertConfig | dict) -> list[str]:
        """LoRA (or LoRA experts) on the language model's linear layers, the rest of it frozen; the config records
        it. Returns the wrapped module names."""
        if isinstance(config, dict):
            config = from_dict(LoRAExpertConfig, config, path="lm.lora")
        if self.config.lm.lora is not None:
            raise ValueError("lm.lora: the model already has LoRA layers")
        wrapped = sorted(apply_lora(self.text_model(), config))
        self.config.lm.lora = config
        return wrapped

    # ------------------------------------------------------------------ prompts, conversations, generation
    def _batch(self, texts: list[str], images: Sequence[Image.Image], padding_side: str = "left") -> dict:
        """The processor's tensors for rendered texts and their images, floats in the model's dtype, on its device."""
        if self.processor is None:
            raise ValueError(f"{self.config.name}: no processor (the checkpoint holds none); pass inputs yourself")
        batch = self.processor(text=texts, images=list(images) or None, padding=True, padding_side=padding_side,
                               return_tensors="pt")
        return {k: v.to(self.device, self.dtype if torch.is_floating_point(v) else None)
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def prompt_inputs(self, images: Sequence[Image.Image], questions: Sequence[str],
                      padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Model inputs for one question about each image: the chat template with the generation prompt, through the
        processor (left padding for generation)."""
        texts = [self._render(chat_messages([("user", q)], 1), True) for q in questions]
        return self._batch(texts, images, padding_side)

    def chat_inputs(self, turns: Sequence[tuple[str, str]], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs (batch of one) to continue a conversation of ``(role, text)`` turns about ``images``: the
        chat template with the generation prompt (``zoo chat``)."""
        return self._batch([self._render(chat_messages(turns, len(images)), True)], images)

    def encode_conversation(self, turns: Sequence[tuple[str, str]], images: Sequence[Image.Image]) -> dict:
        """Model inputs (batch of one) with ``labels`` on the assistant turns, as the chat template renders them.
        Turns are ``(role, text)``; ``<image>`` placeholders mark where the images go (else before the first user
        text). Raises ValueError for a template that is not prefix-stable, no supervised token, or a sample longer
        than ``config.max_length``."""
        messages = chat_messages(turns, len(images))
        batch = self._batch([self._render(messages, False)], images)
        ids = batch["input_ids"][0]
        if ids.numel() > self.config.max_length:
            raise ValueError(f"over-long: {ids.numel()} tokens (max_length {self.config.max_length})")
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_ids(messages[:i], images, True)
                end = self._prefix_ids(messages[:i + 1], images, False)
                if not torch.equal(ids[: end.numel()], end) or not torch.equal(ids[: start.numel()], start):
                    raise ValueError("the chat template is not prefix-stable (a later turn changes earlier tokens)")
                labels[start.numel():end.numel()] = ids[start.numel():end.numel()]
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError("no supervised token (no assistant turn)")
        batch["labels"] = labels[None]
        return batch

    def _prefix_ids(self, messages: list[dict], images: Sequence[Image.Image], generation: bool) -> torch.Tensor:
        shown = sum(part.get("type") == "image" for m in messages if isinstance(m["content"], list)
                    for part in m["content"])
        return self._batch([self._render(messages, generation)], images[:shown])["input_ids"][0]

    @torch.no_grad()
    def generate(self, max_new_tokens: int = 16, generation_config=None, streamer=None, **inputs) -> torch.Tensor:
        """Decoding by transformers' ``generate`` (KV cache) on the processor's ``inputs``; returns the new ids
        ``[B, <= max_new_tokens]``. Greedy unless ``generation_config`` (one transformers ``GenerationConfig`` for the
        batch: sampling, temperature, top-k / top-p, repetition penalty, stop strings) says otherwise; ``streamer``
        (transformers' streamer interface: ``put`` gets the prompt ids, then each step's ``[B]`` tokens; ``end``)
        sees the tokens as they come. Keyword calls ``generate(**inputs, max_new_tokens=n)`` read the same for a
        `ZooModel`, whose inputs come from its own ``prompt_inputs``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        if generation_config is None:
            options = {"do_sample": False, "num_beams": 1}
        elif isinstance(generation_config, (list, tuple)):
            raise ValueError("generation_config: a transformers-native model takes one GenerationConfig for the "
                             f"batch, got a list of {len(generation_config)}")
        else:
            options = {"generation_config": generation_config}
            if generation_config.stop_strings:
                options["tokenizer"] = self.tokenizer  # transformers matches stop strings through it
        out = self.generator.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **options)
        return out[:, inputs["input_ids"].shape[1]:]

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 8,
               batch_size: int = 16, progress: bool = False) -> list[str]:
        """Answer one question per image through the processor and chat template: greedy, batched, left padding."""
        if len(images) != len(questions):
            raise ValueError(f"answer(): {len(images)} images but {len(questions)} questions")
        was_training = self.training
        self.eval()
        starts = range(0, len(questions), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="answering", unit="batch")
        answers: list[str] = []
        try:
            for start in starts:
                inputs = self.prompt_inputs(images[start:start + batch_size], questions[start:start + batch_size])
                new = self.generate(max_new_tokens, **inputs)
                answers += [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.train(was_training)
        return answers

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def transformers_blocks(self):
        """Inside, the converted blocks are transformers blocks again, as views of the zoo layers' tensors (no
        copy): the model is then exactly the transformers class, e.g. for its ``save_pretrained``."""
        swapped = []
        try:
            for layer, ffn in self.named_sparse_blocks():
                setattr(layer, self.spec.ffn, to_transformers(ffn.moe, kind=ffn.kind, copy=False))
                swapped.append((layer, ffn))
            yield self.hf
        finally:
            for layer, ffn in swapped:
                setattr(layer, self.spec.ffn, ffn)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the transformers checkpoint (``config.json``, safetensors, generation config) and the processor:
        the transformers class loads it. A model with zoo-only structure (a sparsity policy, LoRA layers) is written
        with its zoo modules and the structure under ``config.json``'s ``zoo`` entry, which `zoo.load` rebuilds.
        As a zoo export: every file renamed into place whole, ``checksums.json`` beside them
        (``zoo.load(..., verify=True)`` checks it); a failed write is a `zoo.checkpoint.WriteError` naming the path."""
        from zoo.checkpoint import staged_directory

        extras = {k: v for k, v in (("sparsity", self.config.lm.sparsity), ("lora", self.config.lm.lora))
                  if v is not None}
        with staged_directory(directory) as staging:
            if extras:
                from zoo.config import to_dict

                self.hf.save_pretrained(staging)
                path = staging / "config.json"
                data = json.loads(path.read_text())
                data[ZOO_KEY] = {k: to_dict(v) for k, v in extras.items()}
                path.write_text(json.dumps(data, indent=2) + "\n")
            else:
                with self.transformers_blocks() as hf:
                    hf.save_pretrained(staging)
            if self.processor is not None:
                self.processor.save_pretrained(staging)
        return Path(directory)


def chat_messages(turns: Sequence[tuple[str, str]], num_images: int) -> list[dict]:
    """Chat-template messages from ``(role, text)`` turns: user turns as content parts with the images where
    ``<image>`` placeholders stand (all in front of the first user text when there are none), other turns as text."""
    placed = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placed not in (0, num_images):
        raise ValueError(f"{placed} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    messages, first = [], True
    for role, text in turns:
        if role != "user":
            messages.append({"role": role, "content": text})
            continue
        content = [{"type": "image"}] * (num_images if first and not placed else 0)
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": content})
        first = False
    return messages


__all__ = ["FamilyFFN", "FamilyModel", "chat_messages"]
