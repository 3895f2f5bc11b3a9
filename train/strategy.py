"""Training strategies by name (``train.strategy`` in a recipe) and gradient checkpointing.

``auto`` (one device, or whatever Lightning picks), ``ddp`` (data parallel; on CPU over gloo), ``fsdp`` (FSDP2
``fully_shard`` through Lightning's ``ModelParallelStrategy``, on CUDA and on CPU: `zoo.train.parallel`),
``deepspeed_stage_2`` / ``deepspeed_stage_3`` (ZeRO through Lightning, CUDA only; `zoo.train.deepspeed`).
``train.expert_parallel: N`` splits every MoE layer's routed experts over N ranks, with ``ddp`` or ``fsdp`` for the
rest of the model. Frozen parameters never reach the optimizer (`ZooLightningModule.configure_optimizers`); parts
whose parameters are all frozen stay whole on every rank under ``fsdp``.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta

from zoo.config import ConfigError
from zoo.model import ZooModel
from zoo.plan import frozen_parts

from .parallel import ZooParallelStrategy

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


def has_routing(model) -> bool:
    """Whether some parameters may get no gradient in a step (routed experts): DDP must then look for them."""
    return any("router" in name for name, _ in model.named_parameters())


def world_size(devices: int | str, num_nodes: int) -> int:
    """Processes of a run: ``devices`` per node times ``num_nodes`` (``devices`` must be a number to know it)."""
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"train.devices: a number of devices per node is needed here, got {devices!r}")
    if num_nodes < 1:
        raise ConfigError(f"train.num_nodes: must be >= 1, got {num_nodes}")
    return devices * num_nodes


def build_strategy(name: str, model: ZooModel, require_device: bool = True, *, expert_parallel: int = 1,
                   devices: int | str = 1, num_nodes: int = 1, timeout: float | None = None,
                   deepspeed_config: str | None = None, gradient_checkpointing: bool = False):
    """The Lightning strategy for ``name`` (one of `STRATEGIES`) with ``expert_parallel`` ranks per EP group over
    ``devices`` x ``num_nodes`` processes; ``timeout`` (seconds) bounds every collective. Errors name the field.
    ``gradient_checkpointing``: `ZooParallelStrategy` recomputes its units itself (``fsdp``, expert parallelism).
    ``require_device=False`` builds a DeepSpeed strategy even where it could not run (to inspect it)."""
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    wait = timedelta(seconds=timeout) if timeout is not None else None
    if expert_parallel != 1 or name == "fsdp":
        if name not in ("ddp", "fsdp"):
            raise ConfigError(f"train.expert_parallel: {expert_parallel} runs with strategy ddp or fsdp for the rest "
                              f"of the model, got train.strategy {name!r}")
        from zoo.moe.parallel import check_expert_parallel

        world = world_size(devices, num_nodes)
        check_expert_parallel(model, expert_parallel, world)
        return ZooParallelStrategy(world, expert_parallel, shard=name == "fsdp", timeout=wait,
                                   activation_checkpointing=gradient_checkpointing)
    if deepspeed_config is not None and not name.startswith("deepspeed"):
        raise ConfigError(f"train.deepspeed_config: only for the deepspeed_stage_2/3 strategies, got "
                          f"train.strategy {name!r}")
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=has_routing(model), **({"timeout": wait} if wait else {}))
    from .deepspeed import deepspeed_strategy

    return deepspeed_strategy(int(name[-1]), deepspeed_config, require_device, wait)


def enable_gradient_checkpointing(model: ZooModel) -> None:
    """Recompute the LM's decoder layers (and trainable vision experts that support it) in the backward pass."""
    lm = getattr(model, "hf", model.lm)  # a transformers-native model (zoo.families) checkpoints its own layers
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: the LM {type(lm).__name__} does not support it")
    from zoo.lm.sparse import recompute_context_fn

    kwargs = {"use_reentrant": False, "context_fn": recompute_context_fn(lm)}  # sparse layers' masks again
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for expert in model.vision.modules():
        if hasattr(expert, "set_grad_checkpointing") and any(p.requires_grad for p in expert.parameters()):
            expert.set_grad_checkpointing(True)


def deepspeed_installed() -> bool:
    """Whether the ``deepspeed`` extra is installed."""
    return importlib.util.find_spec("deepspeed") is not None


__all__ = ["STRATEGIES", "build_strategy", "deepspeed_installed", "enable_gradient_checkpointing", "frozen_parts",
           "has_routing", "world_size"]
