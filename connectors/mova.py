"""MoVA (Zong et al., arXiv 2404.13046): coarse-to-fine mixture of vision experts, kind ``mova``.

* Coarse routing (`ExpertRouter`): the LM itself picks the experts for an (image, question) pair from a lettered
  list of expert descriptions; a strict parser turns its answer into an expert set (garbage falls back to
  ``options.default_experts`` and is counted); routing labels from data become the target text of the routing LoRA.
* Fine fusion (`MoVAdapter`): the base expert's tokens cross-attend to each picked expert's tokens; a gate reading the
  question embedding and the mean image feature weights the experts (top-k of the picked ones, renormalised);
  zero-initialised output projections make a fresh adapter the identity on the base tokens.
* `MoVAConnector`: adapter, area pooling to ``options.tokens``, then LLaVA's MLP projector.
* `MoVAInference`: the two passes on a `ZooModel` -- route with the base expert only, then run only the picked
  experts and answer.

Experts are indexed as in the model's ``vision`` list, everywhere: letter ``A`` is ``vision[0]``, the sets in
``selected`` hold these indices, ``gate_weights`` has one column per expert. The base expert (``options.base``) is
always used and never gated; naming its letter in a routing answer is allowed and changes nothing.

Differences from the released code (design/mova.md): the experts are sequence-fused (each keeps its own grid and is
read by cross-attention; no grid alignment), no 2-D RoPE, sub-LN or learnable position embedding, area pooling
instead of RegStage blocks, and the gate's text is the mean LM input embedding of the question
(`question_embedding`, `ZooModel.question_context`: the mean LM input embedding of the prompt tokens, never the
answer) instead of a BERT [CLS] state; ``ZooModel`` hands it to the connector in training and generation alike
(``reads_question``). Through ``ZooModel.forward`` and ``ZooModel.answer`` every expert is available (no coarse
routing); `MoVAInference` does both passes.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image
from torch import nn

from zoo.config import ConfigError, ConnectorConfig
from zoo.encoders import FusedVision, map_pixels

from .base import CONNECTORS, ConnectorOutput
from .compress import avg_pool_tokens, check_square_option, connector_options, square_grid
from .mlp import MLPProjector

LETTERS = string.ascii_uppercase

ROUTING_INSTRUCTION = ("You are a router. Given the image, the question and a pool of vision models, pick at most "
                       "{k} models that are most suitable to answer the question. Answer with their letters separated "
                       "by commas, or none.")


# ---------------------------------------------------------------------------------------------------- coarse routing

class ExpertRouter:
    """Routing prompt, answer parser and routing-label targets for the LM's choice of vision experts.

    ``descriptions``: one per vision expert, in ``vision`` order (letter ``A`` is expert 0). ``default_experts``:
    the set used when an answer cannot be parsed; every such fallback increments ``fallbacks``. ``max_selected``:
    an answer keeps its first ``max_selected`` letters (MoVA keeps 3).
    """

    def __init__(self, descriptions: Sequence[str], default_experts: Iterable[int], max_selected: int,
                 instruction: str = ROUTING_INSTRUCTION):
        if not 1 <= len(descriptions) <= len(LETTERS):
            raise ValueError(f"descriptions: expected 1 to {len(LETTERS)} expert descriptions, got {len(descriptions)}")
        self.descriptions = list(descriptions)
        self.default_experts = frozenset(self.index(e) for e in default_experts)
        self.max_selected = max_selected
        self.instruction = instruction
        self.fallbacks = 0

    @property
    def letters(self) -> str:
        """The letters of the expert pool, ``"ABC"`` for three experts."""
        return LETTERS[:len(self.descriptions)]

    def index(self, label: str | int) -> int:
        """Expert index of a routing label: a letter (any case) or an index; raises naming the label."""
        if isinstance(label, str) and len(label.strip()) == 1 and label.strip().upper() in self.letters:
            return self.letters.index(label.strip().upper())
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.descriptions):
            return label
        raise ValueError(f"routing label {label!r}: expected a letter {self.letters[0]}-{self.letters[-1]} or an "
                         f"expert index 0-{len(self.descriptions) - 1}")

    def prompt(self, question: str) -> str:
        """The routing question: instruction, ``Model pool:`` with one ``"<Letter>. <description>"`` line per
        expert, then the user question (the model's prompt template adds the image placeholder)."""
        pool = "\n".join(f"{letter}. {text}" for letter, text in zip(self.letters, self.descriptions))
        return f"{self.instruction.format(k=self.max_selected)}\nModel pool:\n{pool}\n\nQuestion:\n{question}"

    def parse(self, answer: str) -> set[int]:
        """The expert set named by an LM answer.

        Accepted: letters of the pool in any case, separated by commas, spaces, ``and``, ``;``, ``/`` or ``&``,
        optionally with punctuation (``"A, C"``, ``"a and c"``, ``"C,A"``, ``"(B)"``); ``"none"`` is the empty set.
        The first ``max_selected`` distinct letters are kept. Anything else (a word, a letter outside the pool, an
        empty answer) returns ``default_experts`` and increments ``fallbacks``.
        """
        words = [w for w in re.findall(r"[a-z]+|\d+", answer.lower()) if w != "and"]
        if words == ["none"]:
            return set()
        pool = self.letters.lower()
        if not words or any(len(w) != 1 or w not in pool for w in words):
            self.fallbacks += 1
            return set(self.default_experts)
        chosen = list(dict.fromkeys(pool.index(w) for w in words))
        return set(chosen[:self.max_selected])

    def route(self, questions: Sequence[str], generate: Callable[[list[str]], list[str]]) -> list[set[int]]:
        """Ask ``generate`` (routing prompts -> answers) and parse each answer: one expert set per question."""
        answers = generate([self.prompt(q) for q in questions])
        if len(answers) != len(questions):
            raise ValueError(f"generate: returned {len(answers)} answers for {len(questions)} routing prompts")
        return [self.parse(a) for a in answers]

    def target_text(self, labels: Iterable[str | int]) -> str:
        """Routing labels of one sample (letters or indices, e.g. a data field ``["C", "a"]``) -> the answer the
        routing LoRA is trained to give: ``"A, C"`` (sorted, comma separated) or ``"none"``."""
        chosen = sorted({self.index(label) for label in labels})
        return ", ".join(self.letters[i] for i in chosen) or "none"

    def training_pair(self, question: str, labels: Iterable[str | int]) -> tuple[str, str]:
        """``(routing prompt, target answer)`` for supervised routing (`MoVAInference.routing_loss` trains on it)."""
        return self.prompt(question), self.target_text(labels)


# ---------------------------------------------------------------------------------------------------- MoV-Adapter

def _zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MoVAGate(nn.Module):
    """Dynamic gating: ``MLP([text ; mean_L(x)])`` scores the routed experts; softmax over the available ones, keep
    the ``top_k`` best, renormalise. Returns ``[N, E]`` weights (fp32) that sum to 1 over the kept experts and are 0
    elsewhere, or are all 0 for an image with no available expert. The last layer starts at zero (equal scores)."""

    def __init__(self, text_dim: int, width: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.mlp = nn.Sequential(nn.Linear(text_dim + width, width), nn.GELU(),
                                 _zero_init(nn.Linear(width, num_experts)))

    def forward(self, text: torch.Tensor, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``text`` ``[N, T]``, ``x`` ``[N, L, C]``, ``available`` ``[N, E]`` bool -> weights ``[N, E]``."""
        logits = self.mlp(torch.cat([text.to(x.dtype), x.mean(1)], -1)).float()
        probs = logits.masked_fill(~available, torch.finfo(logits.dtype).min).softmax(-1)
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1).indices
        kept = torch.zeros_like(available).scatter(-1, top, True) & available
        weights = probs * kept
        return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


class ExpertExtractor(nn.Module):
    """Cross-attention from the (normed) base tokens ``[N, L, C]`` to one expert's tokens ``[N, L_e, C_e]``,
    projected to the base width first; the output projection starts at zero."""

    def __init__(self, expert_dim: int, width: int, heads: int):
        super().__init__()
        self.proj = nn.Linear(expert_dim, width)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        _zero_init(self.attn.out_proj)

    def forward(self, query: torch.Tensor, expert_tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(self.proj(expert_tokens))
        return self.attn(query, kv, kv, need_weights=False)[0]


class SwiGLU(nn.Module):
    """``out(silu(a) * b)`` with ``[a, b] = in(x)``; hidden width 8/3 of the input; ``out`` starts at zero."""

    def __init__(self, width: int):
        super().__init__()
        hidden = 8 * width // 3
        self.inp = nn.Linear(width, 2 * hidden)
        self.out = _zero_init(nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.inp(x).chunk(2, -1)
        return self.out(nn.functional.silu(a) * b)


class AdapterBlock(nn.Module):
    """``x += sum_e w_e XAttn_e(LN(x), F_e)``, then ``x += SA(LN(x))`` and ``x += SwiGLU(LN(x))`` (pre-norm)."""

    def __init__(self, width: int, expert_dims: Sequence[int], text_dim: int, heads: int, top_k: int):
        super().__init__()
        self.gate = MoVAGate(text_dim, width, len(expert_dims), top_k)
        self.norm = nn.LayerNorm(width)
        self.extractors = nn.ModuleList(ExpertExtractor(d, width, heads) for d in expert_dims)
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        _zero_init(self.self_attn.out_proj)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = SwiGLU(width)

    def forward(self, x: torch.Tensor, experts: Sequence[torch.Tensor | None], text: torch.Tensor,
                available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[N, L, C]``, routed experts' tokens (None: not run), ``available`` ``[N, E]`` -> (x, weights)."""
        weights = self.gate(text, x, available)
        query = self.norm(x)
        for e, (extract, tokens) in enumerate(zip(self.extractors, experts)):
            if tokens is None or not bool(weights[:, e].any()):  # an expert no image uses is never computed
                continue
            x = x + weights[:, e, None, None].to(x.dtype) * extract(query, tokens)
        h = self.self_norm(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x)), weights


class MoVAdapter(nn.Module):
    """The MoV-Adapter: ``blocks`` `AdapterBlock` s on the base expert's tokens, then ``(x + x0) / 2``.

    ``forward(features, available, text)``: ``features`` one ``[N, L_e, C_e]`` per vision expert (None for an
    expert that was not run; the base is required), ``available`` ``[N, E]`` bool over the routed (non-base)
    experts, ``text`` ``[N, text_dim]`` or None (zeros). Returns tokens ``[N, L_base, C_base]`` and the gate weights
    ``[blocks, N, E]``. A fresh adapter returns the base tokens bit for bit (zero-initialised output projections).
    """

    def __init__(self, in_dims: Sequence[int], base: int, text_dim: int, blocks: int, heads: int, top_k: int):
        super().__init__()
        self.base, self.text_dim = base, text_dim
        self.routed = [i for i in range(len(in_dims)) if i != base]
        self.blocks = nn.ModuleList(
            AdapterBlock(in_dims[base], [in_dims[i] for i in self.routed], text_dim, heads, top_k)
            for _ in range(blocks))

    def forward(self, features: Sequence[torch.Tensor | None], available: torch.Tensor,
                text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = features[self.base]
        if text is None:
            text = x0.new_zeros(x0.shape[0], self.text_dim)
        routed = [features[i] for i in self.routed]
        x, weights = x0, []
        for block in self.blocks:
            x, w = block(x, routed, text, available)
            weights.append(w)
        return (x + x0) / 2, torch.stack(weights)


@CONNECTORS.register("mova")
class MoVAConnector(nn.Module):
    """MoVA's connector: `MoVAdapter` on the base expert's tokens, area pooling, then LLaVA's MLP.

    Options (``connector.options``): ``base`` (0) the expert whose tokens are the queries; ``top_k``
    (min(3, experts - 1)) experts kept by the gate; ``blocks`` (3); ``heads`` (base width // 64, at least 1);
    ``tokens`` (None: the base count) LM tokens per image, a square; ``routing_tokens`` (``tokens``) image tokens
    in the routing pass; ``text_dim`` (LM width) width of the gate's text embedding; ``descriptions`` (one per
    expert), ``default_experts`` (letters; all) and ``max_selected`` (``top_k``) configure the `ExpertRouter`
    (``router``); ``routing_adapter`` (None) names the LM's LoRA task adapter (``lm.lora.mode: task``) that the
    routing pass uses -- MoVA's expert-routing LoRA -- while answers use the LM's active adapter.
    """

    multi_expert = True
    requires_multi_expert = True
    reads_question = True  # ZooModel passes each image's question context as ``text``

    def __init__(self, config: ConnectorConfig, in_dims: list[int], out_dim: int):
        super().__init__()
        n = len(in_dims)
        if n < 2:
            raise ConfigError(f"connector.kind: 'mova' needs at least 2 vision experts (a base and one to route), "
                              f"got {n}")
        options = connector_options(config, {
            "base": 0, "top_k": min(3, n - 1), "blocks": 3, "heads": None, "tokens": None, "routing_tokens": None,
            "text_dim": out_dim, "descriptions": [f"vision expert {i}" for i in range(n)],
            "default_experts": list(LETTERS[:n]), "max_selected": None, "routing_adapter": None})
        self.base = options["base"]
        if not 0 <= self.base < n:
            raise ConfigError(f"connector.options.base: expected an expert index 0-{n - 1}, got {self.base}")
        width = in_dims[self.base]
        if not 1 <= options["top_k"] <= n - 1:
            raise ConfigError(f"connector.options.top_k: expected 1-{n - 1} (routed experts), got {options['top_k']}")
        if options["blocks"] < 1:
            raise ConfigError(f"connector.options.blocks: expected >= 1, got {options['blocks']}")
        heads = options["heads"] or max(1, width // 64)
        if not isinstance(heads, int) or width % heads:
            raise ConfigError(f"connector.options.heads: {heads!r} does not divide the base expert's width {width}")
        for key in ("tokens", "routing_tokens"):
            check_square_option(options, key)
        self.tokens = options["tokens"]
        self.routing_tokens = options["routing_tokens"] or self.tokens
        descriptions = options["descriptions"]
        if len(descriptions) != n or not all(isinstance(d, str) for d in descriptions):
            raise ConfigError(f"connector.options.descriptions: expected one description (a string) per vision "
                              f"expert ({n}), got {descriptions!r}")
        if options["max_selected"] is not None and (not isinstance(options["max_selected"], int)
                                                    or options["max_selected"] < 1):
            raise ConfigError(f"connector.options.max_selected: expected an int >= 1, got {options['max_selected']!r}")
        try:
            self.router = ExpertRouter(descriptions, options["default_experts"],
                                       options["max_selected"] or options["top_k"])
        except ValueError as e:
            raise ConfigError(f"connector.options.default_experts: {e}") from e
        self.routing_adapter = options["routing_adapter"]
        if self.routing_adapter is not None and not isinstance(self.routing_adapter, str):
            raise ConfigError(f"connector.options.routing_adapter: expected the name of a LoRA task adapter, got "
                              f"{self.routing_adapter!r}")
        self.adapter = MoVAdapter(in_dims, self.base, options["text_dim"], options["blocks"], heads, options["top_k"])
        self.projector = MLPProjector(config, width, out_dim)
        self.num_experts = n

    @property
    def routed(self) -> list[int]:
        """Indices of the gated (non-base) experts, in ``vision`` order."""
        return self.adapter.routed

    def output_tokens(self, in_tokens: list[int]) -> int:
        """Tokens out per image: ``options.tokens``, else the base expert's count."""
        return self.tokens or in_tokens[self.base]

    def forward(self, features: Sequence[torch.Tensor | None], selected: Sequence[set[int]] | None = None,
                text: torch.Tensor | None = None, num_tokens: int | None = None) -> ConnectorOutput:
        """Per-expert tokens -> `ConnectorOutput` with tokens ``[N, tokens, out_dim]``.

        ``features``: one ``[N, L_e, C_e]`` per vision expert; an expert that was not run is None (its modules are
        not called). ``selected``: one set of expert indices per image (the coarse routing); None makes every given
        expert available. ``text``: ``[N, text_dim]`` question embeddings (None: zeros). ``num_tokens`` overrides
        ``options.tokens`` (the routing pass uses ``routing_tokens``). ``routing["gate_weights"]``
        ``[blocks, N, experts]`` holds each block's gate (0 for the base and unused experts).
        """
        if not isinstance(features, (list, tuple)) or len(features) != self.num_experts:
            raise ValueError(f"connector: mova expects a list of {self.num_experts} per-expert token tensors (None for "
                             f"an expert not run), got {type(features).__name__}")
        if features[self.base] is None:
            raise ValueError(f"connector: the features of the base expert vision[{self.base}] are required")
        n_images = features[self.base].shape[0]
        device = features[self.base].device
        given = torch.tensor([features[i] is not None for i in self.routed], device=device)
        available = given.expand(n_images, -1)
        if selected is not None:
            if len(selected) != n_images:
                raise ValueError(f"selected: expected one expert set per image ({n_images}), got {len(selected)}")
            bad = [(i, e) for i, s in enumerate(selected) for e in s if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"selected[{bad[0][0]}]: expert {bad[0][1]} is not in 0-{self.num_experts - 1}")
            available = torch.tensor([[e in s for e in self.routed] for s in selected], device=device)
            missing = (available & ~given).nonzero()
            if len(missing):
                image, e = missing[0].tolist()
                raise ValueError(f"selected[{image}]: expert {self.routed[e]} is selected but its features were not "
                                 "given (None)")
        x, weights = self.adapter(features, available, text)
        target = num_tokens or self.tokens
        if target is not None:
            side = square_grid(x.shape[1], f"vision[{self.base}] (the mova base expert) tokens")
            if target > x.shape[1]:
                raise ValueError(f"connector.options.tokens: {target} tokens is more than the base expert's "
                                 f"{x.shape[1]}")
            x = avg_pool_tokens(x, side, math.isqrt(target))
        gate = weights.new_zeros(weights.shape[0], n_images, self.num_experts)
        gate[..., self.routed] = weights
        return ConnectorOutput(self.projector(x).tokens, routing={"gate_weights": gate})


# ---------------------------------------------------------------------------------------------------- two passes

def question_embedding(model, questions: Sequence[str]) -> torch.Tensor:
    """``[N, d_lm]``: the gate's text for one question per image, `ZooModel.question_context` of each question in
    the model's prompt template -- what the gate reads when the model trains on or answers that prompt."""
    ids, mask = model.collate_prompts([model.encode_prompt(q) for q in questions], padding_side="right")
    return model.question_context(ids.to(model.device), mask.to(model.device))


class MoVAInference:
    """MoVA's two passes on a `ZooModel` with a ``mova`` connector and sequence-fused experts.

    Pass 1 (`route`): only the base expert runs; the adapter with no routed expert, pooled to
    ``options.routing_tokens``, fills the image block of the routing prompt; the LM answers greedily and
    `ExpertRouter.parse` gives one expert set per image. Pass 2 (`answer`): the base expert runs on every image and
    each picked expert only on the images that picked it; experts no image picked never run.

    ``condition_on_question``: feed `question_embedding` to the gate (as ``ZooModel`` does in training); False
    gives it zeros.
    Generation is ``ZooModel.generate`` on the image blocks computed here (greedy, KV cache).
    """

    def __init__(self, model, condition_on_question: bool = True):
        if not isinstance(model.connector, MoVAConnector):
            raise ValueError(f"connector.kind: MoVAInference needs a 'mova' connector, got "
                             f"{type(model.connector).__name__}")
        if not isinstance(model.vision, FusedVision) or model.vision.fusion.mode != "sequence":
            raise ValueError("fusion.mode: MoVAInference needs several vision experts fused by sequence")
        self.model = model
        self.condition_on_question = condition_on_question
        adapter = model.connector.routing_adapter
        lora = model.config.lm.lora
        if adapter is not None and (lora is None or lora.mode != "task" or adapter not in lora.task_names):
            known = lora.task_names if lora is not None and lora.mode == "task" else "none (no lm.lora of mode task)"
            raise ValueError(f"connector.options.routing_adapter: {adapter!r} is not a LoRA task adapter of the LM; "
                             f"its task adapters: {known}")

    @property
    def connector(self) -> MoVAConnector:
        """The model's `MoVAConnector`."""
        return self.model.connector

    @property
    def router(self) -> ExpertRouter:
        """The connector's `ExpertRouter` (its ``fallbacks`` counts unparsable routing answers)."""
        return self.model.connector.router

    def run_experts(self, pixel_values: dict[str, torch.Tensor],
                    selected: Sequence[set[int]] | None) -> list[torch.Tensor | None]:
        """Per-expert tokens, running only what ``selected`` needs: the base on all images, expert ``e`` only on the
        images whose set holds ``e`` (zeros on the other rows, which the gate masks), None for an expert no image
        picked. ``selected`` None runs every expert on every image."""
        vision, connector = self.model.vision, self.connector
        n_images = len(pixel_values[str(connector.base)])
        param = next(connector.parameters())
        features: list[torch.Tensor | None] = []
        for e in range(len(vision.experts)):
            rows = list(range(n_images)) if selected is None or e == connector.base else \
                [i for i, s in enumerate(selected) if e in s]
            if not rows:
                features.append(None)
                continue
            tokens = vision.expert_tokens(e, pixel_values[str(e)][rows]).to(param.device, param.dtype)
            if len(rows) < n_images:
                full = tokens.new_zeros((n_images, *tokens.shape[1:]))
                full[rows] = tokens
                tokens = full
            features.append(tokens)
        return features

    def encode(self, pixel_values: dict[str, torch.Tensor], selected: Sequence[set[int]] | None = None,
               questions: Sequence[str] | None = None, num_tokens: int | None = None) -> ConnectorOutput:
        """Image tokens ``[N, tokens, d_lm]`` with only the experts ``selected`` needs run (`run_experts`)."""
        text = question_embedding(self.model, questions) if self.condition_on_question and questions else None
        return self.connector(self.run_experts(pixel_values, selected), selected, text, num_tokens)

    @torch.no_grad()
    def route(self, pixel_values: dict[str, torch.Tensor], questions: Sequence[str],
              max_new_tokens: int = 8) -> list[set[int]]:
        """Pass 1: one expert set per image, chosen by the LM from the routing prompt (only the base expert runs)."""
        none = [set() for _ in questions]
        image = self.encode(pixel_values, none, questions, self.connector.routing_tokens).tokens
        task = self.routing_task(len(questions))
        return self.router.route(questions, lambda prompts: self.generate(image, prompts, max_new_tokens, task))

    def routing_task(self, n: int) -> list[str] | None:
        """Task tags of ``n`` routing samples: the routing adapter (``options.routing_adapter``), or None."""
        adapter = self.connector.routing_adapter
        return None if adapter is None else [adapter] * n

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 8,
                 task: list[str] | None = None) -> list[str]:
        """Greedy answers to ``questions`` (in the model's prompt template), one image block ``image_embeds[i]``
        ``[N, L, d_lm]`` per question; ``task``: LoRA task tags (None: the LM's active adapter)."""
        model = self.model
        ids, mask = model.collate_prompts([model.encode_prompt(q) for q in questions])
        new = model.generate(None, ids.to(model.device), mask.to(model.device), max_new_tokens,
                             image_embeds=image_embeds, task=task)
        return [s.strip() for s in model.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str],
               max_new_tokens: int = 8) -> tuple[list[str], list[set[int]]]:
        """Both passes for one question per image: ``(answers, expert set per image)``."""
        if len(images) != len(questions):
            raise ValueError(f"answer(): {len(images)} images but {len(questions)} questions")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            pixels = map_pixels(model.vision.preprocess(images), lambda t: t.to(model.device))
            selected = self.route(pixels, questions, max_new_tokens)
            answers = self.generate(self.encode(pixels, selected, questions).tokens, questions, max_new_tokens)
        finally:
            model.train(was_training)
        return answers, selected

    def routing_example(self, question: str, labels: Iterable[str | int]) -> tuple[list[int], list[int]]:
        """Loss-ready token ids of one routing sample: ``(input_ids, labels)`` of the routing prompt followed by
        the target answer (`ExpertRouter.training_pair`), labels -100 except on the answer and its EOS."""
        prompt, target = self.router.training_pair(question, labels)
        prompt_ids, answer_ids = self.model.encode_prompt(prompt), self.model.encode_answer(target)
        return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids

    def routing_loss(self, pixel_values: dict[str, torch.Tensor], questions: Sequence[str],
                     labels: Sequence[Iterable[str | int]]) -> torch.Tensor:
        """Cross-entropy of the routing answers given the routing-pass image tokens (base expert only, pooled to
        ``routing_tokens``): the loss of the routing LoRA (``options.routing_adapter``; the whole trainable LM
        without one). One question and one label list per image."""
        model = self.model
        if not len(questions) == len(labels):
            raise ValueError(f"labels: expected one label list per question ({len(questions)}), got {len(labels)}")
        examples = [self.routing_example(q, lab) for q, lab in zip(questions, labels)]
        ids, mask = model.collate_prompts([ids for ids, _ in examples], padding_side="right")
        targets, _ = model.collate_prompts([lab for _, lab in examples], padding_side="right")
        targets = targets.masked_fill(mask == 0, -100)
        image = self.encode(pixel_values, [set() for _ in questions], questions, self.connector.routing_tokens)
        sp = model.splice(ids.to(model.device), image.tokens, mask.to(model.device), targets.to(model.device))
        with model._lm_context(sp.image_mask, sp.attention_mask, self.routing_task(len(questions))):
            return model.lm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                            position_ids=sp.position_ids, labels=sp.labels, use_cache=False).loss
