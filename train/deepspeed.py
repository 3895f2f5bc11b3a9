"""DeepSpeed for MoE-LLaVA users: ``train.strategy: deepspeed_stage_2 | deepspeed_stage_3`` through Lightning's
``DeepSpeedStrategy`` (CUDA only: Lightning refuses DeepSpeed on the CPU), optionally with the user's own DeepSpeed
JSON (``train.deepspeed_config``, e.g. MoE-LLaVA's ``scripts/zero2.json``).

The JSON is read strictly: not valid JSON, not an object, a ZeRO stage other than the strategy's, or an
``optimizer`` / ``scheduler`` section (the recipe sets both: AdamW from ``train.lr`` and ``train.weight_decay``,
warm-up + cosine) are errors naming the file and the field. Values ``"auto"`` (Hugging Face Trainer's placeholders in
MoE-LLaVA's files) are dropped wherever they occur: Lightning fills the batch size, gradient accumulation and
clipping from the recipe, and precision from ``train.precision`` (an ``fp16`` / ``bf16`` section whose ``enabled``
is ``"auto"`` goes with them); DeepSpeed's defaults cover the rest. Install with ``pip install -c constraints.txt
-e ".[deepspeed]"``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from zoo.config import ConfigError

OWNED_BY_RECIPE = {"optimizer": "AdamW from train.lr and train.weight_decay",
                   "scheduler": "warm-up + cosine from train.warmup_ratio and train.min_lr_ratio"}


def _drop_auto(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("enabled") == "auto":  # fp16 / bf16: precision comes from train.precision
            return None
        out = {k: _drop_auto(v) for k, v in value.items() if v != "auto"}
        return {k: v for k, v in out.items() if v is not None}
    return value


def read_deepspeed_config(path: str | Path, stage: int) -> dict[str, Any]:
    """The DeepSpeed config of ``path`` for ZeRO ``stage`` (module docstring); `ConfigError` naming
    ``train.deepspeed_config``, the file and the field."""
    path = Path(path)
    field = f"train.deepspeed_config: {path}"
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{field}: cannot be read ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{field} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: expected a JSON object, got {type(data).__name__}")
    for key, owner in OWNED_BY_RECIPE.items():
        if key in data:
            raise ConfigError(f"{field} sets '{key}', which the recipe sets too ({owner}); remove it from the file")
    config = _drop_auto(data)
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{field}: 'zero_optimization' must be an object, got {zero!r}")
    if zero.setdefault("stage", stage) != stage:
        raise ConfigError(f"{field}: zero_optimization.stage is {zero['stage']}, but train.strategy is "
                          f"'deepspeed_stage_{stage}'")
    return config


def deepspeed_strategy(stage: int, config_path: str | None, require_device: bool = True,
                       timeout: timedelta | None = None):
    """Lightning's ``DeepSpeedStrategy`` for ZeRO ``stage`` (with the user's JSON when given); errors when DeepSpeed is
    not installed or, with ``require_device``, when there is no CUDA device."""
    import importlib.util

    import torch

    name = f"deepspeed_stage_{stage}"
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.strategy: {name!r} needs DeepSpeed, which is not installed (pip install -c "
                          "constraints.txt -e '.[deepspeed]'); use 'ddp' or 'fsdp' instead")
    config = read_deepspeed_config(config_path, stage) if config_path else None
    if require_device and not torch.cuda.is_available():
        raise ConfigError(f"train.strategy: {name!r} runs on CUDA devices only (Lightning's DeepSpeed strategy "
                          "refuses the CPU); on CPU use 'fsdp' or 'ddp'")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, config=config, **({"timeout": timeout} if timeout else {}))


__all__ = ["deepspeed_strategy", "read_deepspeed_config"]
