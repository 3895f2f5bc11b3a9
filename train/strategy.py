"""Training strategies by name (``train.strategy`` in a recipe) and gradient checkpointing.

``auto`` (one device, or whatever Lightning picks), ``ddp`` (data parallel; on CPU over gloo), ``fsdp`` (fully
sharded; parts whose parameters are all frozen are left out of the flat parameters and kept whole on every rank),
``deepspeed_stage_2`` / ``deepspeed_stage_3`` (ZeRO; only if DeepSpeed is installed; never needed to train on one
device or to run a model). Frozen parameters never reach the optimizer (`ZooLightningModule.configure_optimizers`).
"""

from __future__ import annotations

import importlib.util

from torch import nn

from zoo.config import ConfigError
from zoo.model import ZooModel

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


def frozen_parts(model: ZooModel) -> list[nn.Module]:
    """The parts (``vision``, ``connector``, ``lm``) none of whose parameters train."""
    return [module for _, module in model.named_children()
            if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())]


def has_routing(model: nn.Module) -> bool:
    """Whether some parameters may get no gradient in a step (routed experts): DDP must then look for them."""
    return any("router" in name for name, _ in model.named_parameters())


def build_strategy(name: str, model: ZooModel, require_device: bool = True):
    """The Lightning strategy for ``name`` (one of `STRATEGIES`); errors name the field and the choices.
    ``require_device=False`` builds a strategy even where it could not run (to inspect it)."""
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=has_routing(model))
    if name == "fsdp":
        import torch
        from lightning.pytorch.strategies import FSDPStrategy

        if require_device and not torch.cuda.is_available():
            raise ConfigError("train.strategy: 'fsdp' runs on CUDA devices only (Lightning's FSDP); on CPU use 'ddp'")

        decoder_layers = {type(m) for m in model.lm.modules() if type(m).__name__.endswith("DecoderLayer")}
        return FSDPStrategy(auto_wrap_policy=decoder_layers or None, use_orig_params=True,
                            ignored_modules=frozen_parts(model), state_dict_type="full")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.strategy: {name!r} needs DeepSpeed, which is not installed (pip install "
                          "deepspeed); use 'ddp' or 'fsdp' instead")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(name[-1]))


def enable_gradient_checkpointing(model: ZooModel) -> None:
    """Recompute the LM's decoder layers (and trainable vision experts that support it) in the backward pass."""
    lm = getattr(model, "hf", model.lm)  # a transformers-native model (zoo.families) checkpoints its own layers
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: the LM {type(lm).__name__} does not support it")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for expert in model.vision.modules():
        if hasattr(expert, "set_grad_checkpointing") and any(p.requires_grad for p in expert.parameters()):
            expert.set_grad_checkpointing(True)


__all__ = ["STRATEGIES", "build_strategy", "enable_gradient_checkpointing", "frozen_parts", "has_routing"]
