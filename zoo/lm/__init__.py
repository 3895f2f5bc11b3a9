"""Language models (``zoo.lm``): transformers causal LMs by hub id, local dir or config dict."""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.config import ConfigError, LMConfig
from zoo.errors import MissingWeightsError
from zoo.hf import config_to_dict
from zoo.registry import Registry

LANGUAGE_MODELS: Registry = Registry("language model")


@LANGUAGE_MODELS.register("hf")
def build_hf_causal_lm(config: LMConfig, vocab_size: int | None = None) -> nn.Module:
    """Any transformers causal LM.

    ``pretrained`` loads ``name`` (hub id or dir; offline cache honoured); otherwise the architecture comes from
    ``config`` (a transformers config dict with ``model_type``) or, if that is empty, from ``name``'s config, with
    random weights. ``vocab_size`` (the tokenizer's length) fills the vocabulary when the config does not set it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if config.attn_implementation:
        extra["attn_implementation"] = config.attn_implementation
    if config.pretrained:
        if not config.name:
            raise ConfigError("lm.name: a hub id or local dir is required when lm.pretrained is true")
        try:
            return AutoModelForCausalLM.from_pretrained(config.name, **extra)
        except OSError as e:
            raise MissingWeightsError(f"lm.name: cannot load {config.name!r} from a local dir or the offline cache: "
                                      f"{e}") from e
    if config.config:
        kwargs = dict(config.config)
        model_type = kwargs.pop("model_type", None)
        if not model_type:
            raise ConfigError("lm.config.model_type: required (e.g. llama, qwen2, mistral, phi)")
        if vocab_size is not None:
            declared = kwargs.setdefault("vocab_size", vocab_size)
            if declared < vocab_size:
                raise ConfigError(f"lm.config.vocab_size: {declared} is smaller than the tokenizer "
                                  f"({vocab_size} tokens)")
        try:
            hf_config = AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"lm.config: transformers rejected the config: {e}") from e
    elif config.name:
        try:
            hf_config = AutoConfig.from_pretrained(config.name)
        except OSError as e:
            raise MissingWeightsError(f"lm.name: cannot read the config of {config.name!r} from a local dir or the "
                                      f"offline cache: {e}") from e
    else:
        raise ConfigError("lm: set lm.name (hub id or dir) or lm.config (a transformers config dict)")
    return AutoModelForCausalLM.from_config(hf_config, **extra)


def build_lm(config: LMConfig, vocab_size: int | None = None) -> nn.Module:
    """Build the language model named by ``config.kind``."""
    return LANGUAGE_MODELS.get(config.kind, field="lm.kind")(config, vocab_size)


def lm_config_dict(lm: nn.Module) -> dict[str, Any]:
    """The LM's transformers config as a plain dict that rebuilds the same architecture."""
    return config_to_dict(lm.config)
