"""Decoding options of `ZooModel.generate`: greedy (the default, unchanged), sampling with temperature / top-p /
top-k / min-p and a seed, repetition penalty, stop strings, a token budget per sequence, token streaming.

Options are transformers' `GenerationConfig`; the logits processors are transformers' own
(`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
`MinPLogitsWarper`), applied in transformers' order. Stop strings are matched on the decoded text (transformers'
`StopStringCriteria` cannot read word-level tokenizers such as the demo models'), the rule `TextStream` and
`trim_at_stop` apply to the answer text, so generation and text agree. Processors run per sequence, on that sequence's
own tokens (its prompt without padding, then what it generated) and with its own seeded generator, so one batch can
mix requests with different options (the server's dynamic batching) and a sequence's tokens never depend on the
batch it ran in. The KV cache and the MoE routing context stay those of `ZooModel.generate`.

>>> config = sampling_config(temperature=0.7, top_p=0.9, stop=["."], max_new_tokens=32)
>>> new = model.generate(pixels, ids, mask, generation_config=config, seed=0)   # [B, <=32] new token ids
>>> model.generate(pixels, ids, mask, generation_config=[greedy, config], seed=[None, 7])  # options per sequence
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# the GenerationConfig fields generate() honours; any other field set to a non-default value is an error
SUPPORTED_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                    "stop_strings")
_IGNORED_FIELDS = {"transformers_version", "eos_token_id", "pad_token_id", "bos_token_id", "num_beams",
                   "num_return_sequences"}


def sampling_config(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    max_new_tokens: int | None = None, stop: str | Sequence[str] | None = None) -> GenerationConfig:
    """A `GenerationConfig` from OpenAI-style options: ``temperature`` 0 (the default) is greedy decoding, the
    limit of sampling as the temperature goes to 0; above 0 it samples. ``top_k`` 0 / ``top_p`` 1 switch those
    filters off; ``stop``: strings that end the answer (they are not part of it)."""
    stops = [stop] if isinstance(stop, str) else (list(stop) if stop else None)
    config = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                              stop_strings=stops)
    check_generation_config(config)
    return config


# what GenerationConfig.to_dict drops or adds for serialization only
_SERIALIZATION_FIELDS = {"_commit_hash", "_original_object_hash", "_mask_length", "transformers_version"}


@cache
def _default_fields() -> dict:
    return dict(vars(GenerationConfig()))


def set_fields(config: GenerationConfig) -> list[str]:
    """The fields of ``config`` that differ from a default `GenerationConfig`: the keys of transformers'
    ``to_diff_dict`` (but ``transformers_version``) without its deep copy of every field twice, which cost ~0.45 ms
    per config, i.e. per request on the server's engine thread."""
    defaults = _default_fields()
    return [name for name, value in vars(config).items()
            if name not in _SERIALIZATION_FIELDS and (name not in defaults or value != defaults[name])]


def check_generation_config(config: GenerationConfig, field: str = "generation_config") -> None:
    """Raise a ValueError naming ``<field>.<option>`` for an option out of range or one generate() does not do."""
    def bad(name: str, why: str):
        raise ValueError(f"{field}.{name}: {why}, got {getattr(config, name)!r}")

    for name in set_fields(config):
        if name not in SUPPORTED_FIELDS and name not in _IGNORED_FIELDS:
            raise ValueError(f"{field}.{name}: not supported by ZooModel.generate; supported: "
                             f"{', '.join(SUPPORTED_FIELDS)}")
    for name in ("num_beams", "num_return_sequences"):
        if getattr(config, name, None) not in (None, 1):
            bad(name, "one sequence per prompt only (no beam search)")
    t, p, k, m = config.temperature, config.top_p, config.top_k, config.min_p
    if t is not None and not (isinstance(t, (int, float)) and t >= 0):
        bad("temperature", "expected a number >= 0")
    if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
        bad("top_p", "expected 0 < top_p <= 1")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
        bad("top_k", "expected an integer >= 0 (0: off)")
    if m is not None and not (isinstance(m, (int, float)) and 0 <= m <= 1):
        bad("min_p", "expected 0 <= min_p <= 1")
    r = config.repetition_penalty
    if r is not None and not (isinstance(r, (int, float)) and r > 0):
        bad("repetition_penalty", "expected a number > 0 (1: off)")
    n = config.max_new_tokens
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        bad("max_new_tokens", "expected an integer >= 1")
    stops = config.stop_strings
    if stops is not None:
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            bad("stop_strings", "expected non-empty strings")


def samples(config: GenerationConfig) -> bool:
    """Whether ``config`` samples: ``do_sample`` with a temperature above 0 (temperature 0 is greedy)."""
    return bool(config.do_sample) and config.temperature != 0


def logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """transformers' processors for ``config``, in transformers' order: repetition penalty, then (when sampling)
    temperature, top-k, top-p, min-p. Empty for plain greedy decoding."""
    out = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        out.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)))
    if samples(config):
        if config.temperature not in (None, 1.0):
            out.append(TemperatureLogitsWarper(float(config.temperature)))
        if config.top_k not in (None, 0):
            out.append(TopKLogitsWarper(int(config.top_k)))
        if config.top_p not in (None, 1.0):
            out.append(TopPLogitsWarper(float(config.top_p)))
        if config.min_p not in (None, 0.0):
            out.append(MinPLogitsWarper(float(config.min_p)))
    return out


class SequenceDecoder:
    """The next-token choice and the stop rule of one sequence: its options, its own tokens (``prompt`` [t]: the
    real prompt ids, no padding) and its seeded generator (None: torch's global generator, as transformers)."""

    def __init__(self, config: GenerationConfig, prompt: torch.Tensor, tokenizer, max_new_tokens: int,
                 seed: int | None = None):
        self.processors = logits_processors(config)
        self.sample = samples(config)
        self.tokens = prompt.reshape(1, -1)
        self.prompt_length = self.tokens.shape[1]
        self.budget = config.max_new_tokens or max_new_tokens
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.tokenizer = tokenizer
        self.stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings or [])

    @property
    def greedy(self) -> bool:
        """Plain greedy: the argmax of the raw logits, as the vectorised path computes it."""
        return not self.sample and not self.processors

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (a 0-d long tensor) from this sequence's logits ``[V]``."""
        scores = self.processors(self.tokens, logits.unsqueeze(0).float()) if self.processors else logits.unsqueeze(0)
        if not self.sample:
            return scores[0].argmax(-1)
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=logits.device).manual_seed(int(self.seed))
        probs = scores[0].float().softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def append(self, token: torch.Tensor) -> bool:
        """Record the chosen token; True when the sequence ends here (a stop string, or the token budget)."""
        self.tokens = torch.cat([self.tokens, token.reshape(1, 1).to(self.tokens)], 1)
        new = self.tokens[0, self.prompt_length:]
        if self.stops and trim_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), self.stops)[1]:
            return True
        return len(new) >= self.budget


class BatchDecoding:
    """The token choice of one `generate` call over a left-padded batch (``input_ids``, ``attention_mask`` ``[B, T]``).

    Without options (``configs`` None) every sequence is greedy with the same budget: one vectorised argmax per
    step. Otherwise each sequence has a `SequenceDecoder` (``configs``: one config for all, or one per sequence;
    ``seeds`` likewise); greedy sequences still take the argmax of their raw logits, so they match the plain path.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, max_new_tokens: int,
                 configs: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 seeds: int | Sequence[int | None] | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        batch = input_ids.shape[0]
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.decoders: list[SequenceDecoder] | None = None
        self.steps = max_new_tokens
        if configs is None and seeds is None:
            return
        configs = per_sequence(configs if configs is not None else GenerationConfig(), batch, "generation_config")
        seeds = per_sequence(seeds, batch, "seed")
        for i, config in enumerate(configs):
            check_generation_config(config, f"generation_config[{i}]" if batch > 1 else "generation_config")
        self.decoders = [SequenceDecoder(config, input_ids[i][attention_mask[i].bool()], tokenizer, max_new_tokens,
                                         seed) for i, (config, seed) in enumerate(zip(configs, seeds))]
        self.steps = max(d.budget for d in self.decoders)

    def next_tokens(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """``[B]`` next tokens from the last position's logits ``[B, V]``; finished sequences get the pad id."""
        token = logits.argmax(-1)
        if self.decoders is not None:
            token = torch.stack([token[i] if d.greedy else d.choose(logits[i]) for i, d in enumerate(self.decoders)])
        return torch.where(done, torch.full_like(token, self.pad), token)

    def update_done(self, token: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """``done`` after ``token`` ``[B]``: EOS, and per sequence its stop strings or its token budget."""
        ended = done | (token == self.eos)
        if self.decoders is not None:
            stopped = [not bool(done[i]) and d.append(token[i]) for i, d in enumerate(self.decoders)]
            ended = ended | torch.tensor(stopped, device=done.device)
        return ended


def per_sequence(value, batch: int, name: str) -> list:
    """``value`` for each of ``batch`` sequences: a list of that length as is, anything else repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name}: {len(value)} values for a batch of {batch} sequences")
        return list(value)
    return [value] * batch


def trim_at_stop(text: str, stops: Sequence[str] | str | None) -> tuple[str, bool]:
    """``text`` cut before the first stop string it contains, and whether it contained one."""
    stops = [stops] if isinstance(stops, str) else (stops or [])
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextStream:
    """Incremental answer text of one generated sequence, as `ZooModel.answer` decodes it (special tokens skipped,
    outer whitespace stripped, cut before a stop string): `add` takes each new token id and returns the text that
    became final; the pieces join to `text`. Text that may still turn into a stop string, trailing whitespace and an
    incomplete UTF-8 character are held back until the next token or `finish`."""

    def __init__(self, tokenizer, stops: Sequence[str] | str | None = None):
        self.tokenizer = tokenizer
        self.stops = [stops] if isinstance(stops, str) else list(stops or [])
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """The whole answer so far (final once `finish` was called)."""
        return trim_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)[0].strip()

    def add(self, token: int) -> str:
        """Take one generated token id; returns the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut, self.stopped = trim_at_stop(decoded, self.stops)
        if not self.stopped:
            held = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if cut.endswith(s[:n])), default=0)
            cut = cut[: len(cut) - held]
            if cut.endswith("\ufffd"):  # an incomplete multi-byte character
                return ""
        return self._send(cut.rstrip())

    def finish(self) -> str:
        """The rest of the answer once generation ended."""
        return self._send(self.text)

    def _send(self, final: str) -> str:
        if not final.startswith(self.sent) or len(final) <= len(self.sent):
            return ""
        piece, self.sent = final[len(self.sent):], final
        return piece
