"""FSDP2 and expert parallelism on Lightning's `ModelParallelStrategy` (``train.strategy: fsdp``,
``train.expert_parallel: N``), on CUDA and on CPU over gloo.

`ZooParallelStrategy` is a small subclass of Lightning's strategy: Lightning launches the processes, builds the
process group and the data-parallel mesh, runs the loop; the zoo places its own model (`ZooParallelStrategy.
parallelize`, called from the module's ``configure_model``):

- expert parallelism (``expert_parallel`` = ep > 1): a second mesh ``(expert_dp, ep)``; every MoE layer keeps E/ep
  of its routed experts and exchanges tokens over its ``ep`` row (`zoo.moe.parallel`); the expert shards stay out of
  FSDP and their gradients are reduced over the ``expert_dp`` column (`ParallelTraining`);
- the rest of the model: ``fsdp`` shards it with ``fully_shard`` (one unit per LM decoder layer, per block of a
  trainable vision expert, the connector, and the root for what is left); ``ddp`` with expert parallelism replicates
  it (torch's FSDP-based ``replicate``). Parts whose parameters are all frozen stay whole on every rank and out of
  both (no gradients, no optimizer state).

Gradient clipping runs here (`clip_gradients`): the norm adds the shards of the FSDP gradients over all ranks and the
expert shards over their EP group. Checkpoints go through ``torch.distributed.checkpoint`` in safetensors files
(``HuggingFaceStorageWriter``: each rank writes its shards, offsets in the files' JSON metadata), so they reshard on
load (resume on another world size or EP degree) and nothing is unpickled; the rest of Lightning's checkpoint is the
zoo's ``state.json`` tree (`zoo.train.checkpoint`). `fit` trains a copy of the caller's model this way and loads the
trained weights back into the caller's model at the end (all experts gathered), so exports stay one safetensors file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from zoo.lm.sparse import decoder_layers
from zoo.model import ZooModel
from zoo.moe.parallel import (
    check_expert_parallel,
    expert_parameters,
    gather_experts,
    reduce_expert_gradients,
    shard_experts,
)
from zoo.plan import frozen_parts

from .checkpoint import load_tree, publish, staging_directory, write_tree

SHARDS = "shards"  # the torch.distributed.checkpoint files inside a checkpoint directory


def _vision_experts(model: ZooModel) -> list[nn.Module]:
    from zoo.encoders.fusion import FusedVision

    return list(model.vision.experts) if isinstance(model.vision, FusedVision) else [model.vision]


def vision_blocks(expert: nn.Module) -> list[nn.Module]:
    """The transformer (or ConvNeXt) blocks of a vision expert: the items of every block list whose items all have an
    ``.mlp``; the expert itself when it has none."""
    blocks = [block for m in expert.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)
              and all(hasattr(b, "mlp") for b in m) for block in m]
    return blocks or [expert]


def shard_units(model: ZooModel) -> list[nn.Module]:
    """FSDP units below the root: every block of a trainable vision expert, a trainable connector, every LM decoder
    layer (bottom-up order does not matter between them: none contains another)."""
    units = [b for e in _vision_experts(model) if any(p.requires_grad for p in e.parameters()) for b in vision_blocks(e)]
    if any(p.requires_grad for p in model.connector.parameters()):
        units.append(model.connector)
    return units + list(decoder_layers(model.lm))


class ZooParallelStrategy(ModelParallelStrategy):
    """Lightning's model-parallel strategy with the zoo's placement (module docstring). ``world_size`` = devices x
    nodes; ``shard``: FSDP2 for the non-expert parameters (``fsdp``), else replicated (``ddp``)."""

    def __init__(self, world_size: int, expert_parallel: int = 1, shard: bool = True,
                 timeout: timedelta | None = None, activation_checkpointing: bool = False):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         **({"timeout": timeout} if timeout is not None else {}))
        self.expert_parallel, self.shard = expert_parallel, shard
        self.activation_checkpointing = activation_checkpointing
        self.expert_mesh = None

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.expert_parallel > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.expert_mesh = init_device_mesh(self.root_device.type,
                                                (self.world_size // self.expert_parallel, self.expert_parallel),
                                                mesh_dim_names=("expert_dp", "ep"))

    @property
    def expert_group(self):
        """The EP group of this rank (None without expert parallelism)."""
        return self.expert_mesh["ep"].get_group() if self.expert_mesh is not None else None

    def parallelize(self, model: ZooModel) -> None:
        """Shard experts, then FSDP2 (or replicate) the rest of ``model``, in place (module docstring). With
        ``activation_checkpointing`` (``train.gradient_checkpointing``) every unit below the root recomputes its
        activations in the backward: torch's composable ``checkpoint`` on the unit itself, outside FSDP's hooks
        (transformers' and timm's own checkpointing re-enter the units' hooks during recomputation and fail)."""
        from torch.distributed._composable import checkpoint
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        ignored = {p for part in frozen_parts(model) for p in part.parameters()}
        if self.expert_mesh is not None:
            check_expert_parallel(model, self.expert_parallel, self.world_size)
            ep = self.expert_mesh["ep"]
            shard_experts(model, ep.get_group(), ep.size(), ep.get_local_rank())
            ignored |= set(expert_parameters(model).values())
        units = shard_units(model)
        if self.activation_checkpointing:
            from zoo.lm.sparse import recompute_context_fn

            for unit in units:
                checkpoint(unit, context_fn=recompute_context_fn(model.lm))
        if not self.shard:
            replicate(model, mesh=mesh, ignored_params=ignored)
            return
        for unit in units:
            if any(p not in ignored for p in unit.parameters()):
                fully_shard(unit, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)

    # -- checkpoints: torch.distributed.checkpoint in safetensors + the zoo's JSON tree -----------------------------
    def _expert_names(self) -> set[str]:
        return {f"model.{name}" for name in expert_parameters(self.lightning_module.model)}

    def _flat_tensors(self, model_state: dict, optimizer_states: list[dict]) -> dict[str, torch.Tensor]:
        """One flat mapping of every tensor to store; expert shards become DTensors over the EP mesh, so the files
        say which experts each rank held (a different EP degree or world size reads them back)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        experts = self._expert_names()

        def place(fqn: str, t: torch.Tensor) -> torch.Tensor:
            if fqn not in experts or self.expert_mesh is None or t.ndim == 0:
                return t
            shape = (t.shape[0] * self.expert_parallel, *t.shape[1:])
            return DTensor.from_local(t, self.expert_mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())

        flat, first = {}, {}
        for k, v in model_state.items():  # tied weights (an LM head sharing the embedding) are stored once
            local = v.to_local() if isinstance(v, DTensor) else v
            twin = first.setdefault((local.untyped_storage().data_ptr(), local.storage_offset(), local.shape), k)
            if twin == k:
                flat[f"model/{k}"] = place(k, v)
        for i, optimizer in enumerate(optimizer_states):
            for fqn, state in optimizer["state"].items():
                flat.update({f"optimizer{i}/{fqn}/{name}": place(fqn, v) for name, v in state.items()})
        return flat

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into ``filepath``'s staging directory; rank 0 adds the rest of the
        checkpoint (``state.json``, ``tensors.safetensors``) and renames it into place (a kill leaves the previous
        checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.is_global_zero:
            staging_directory(path)
        self.barrier()
        optimizers = checkpoint.pop("optimizer_states", [])
        flat = self._flat_tensors(checkpoint.pop("state_dict"), optimizers)
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
        if self.is_global_zero:
            from zoo.checkpoint import writing

            with writing(path):  # a full disk is one line naming the checkpoint
                write_tree({**checkpoint, "optimizer_param_groups": [o["param_groups"] for o in optimizers]}, tmp)
                publish(tmp, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint of `save_checkpoint` into the sharded model and optimizers (resharded to this run);
        returns the rest for Lightning (loops, schedulers, callbacks)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        rest = load_tree(path)
        model_state = get_model_state_dict(self.model)
        optimizer_states = [get_optimizer_state_dict(self.model, opt) for opt in self.optimizers]  # allocates
        flat = self._flat_tensors(model_state, optimizer_states)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
        stored = {k for k in model_state if f"model/{k}" in flat}
        set_model_state_dict(self.model, {k: _local_view(flat[f"model/{k}"], v) for k, v in model_state.items()
                                          if k in stored}, options=StateDictOptions(strict=False))
        for i, (opt, state) in enumerate(zip(self.optimizers, optimizer_states)):
            for fqn, values in state["state"].items():
                for name, v in values.items():
                    values[name] = _local_view(flat[f"optimizer{i}/{fqn}/{name}"], v)
            state["param_groups"] = rest["optimizer_param_groups"][i]
            set_optimizer_state_dict(self.model, opt, state)
        return rest


def _local_view(loaded: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A loaded value in the form of the live one: an expert shard wrapped as a DTensor for the files comes back as
    the rank's local tensor."""
    from torch.distributed.tensor import DTensor

    return loaded.to_local() if isinstance(loaded, DTensor) and not isinstance(like, DTensor) else loaded


def clip_gradients(model: nn.Module, max_norm: float, expert_group=None) -> torch.Tensor:
    """Scale every gradient so that their global 2-norm is at most ``max_norm`` (torch's ``clip_grad_norm_`` rule);
    returns the norm before clipping. Sharded DTensor gradients add their squares over all ranks, expert shards over
    their EP group, replicated ones count once."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_parameters(model).values()}
    sums = {"sharded": torch.zeros((), dtype=torch.float64), "whole": torch.zeros((), dtype=torch.float64),
            "experts": torch.zeros((), dtype=torch.float64)}
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        if isinstance(p.grad, DTensor):
            local, kind = p.grad.to_local(), "sharded" if any(x.is_shard() for x in p.grad.placements) else "whole"
        else:
            local, kind = p.grad, "experts" if id(p) in experts else "whole"
        sums[kind] += local.detach().double().square().sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(sums["sharded"])
        if expert_group is not None:
            dist.all_reduce(sums["experts"], group=expert_group)
    total = sum(sums.values()).sqrt()
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


class ParallelTraining(L.Callback):
    """Before each optimizer step of a `ZooParallelStrategy` run: expert gradients reduced over the expert-data-
    parallel group, then the gradients clipped to ``grad_clip`` (0: no clipping) over the whole sharded model."""

    def __init__(self, grad_clip: float):
        self.grad_clip = grad_clip

    def on_before_optimizer_step(self, trainer: L.Trainer, module, optimizer) -> None:
        strategy: ZooParallelStrategy = trainer.strategy
        if strategy.expert_mesh is not None:
            reduce_expert_gradients(module.model, strategy.expert_mesh["expert_dp"].get_group(), trainer.world_size)
        if self.grad_clip:
            clip_gradients(module.model, self.grad_clip, strategy.expert_group)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a model trained by `ZooParallelStrategy`, whole (FSDP shards and expert shards gathered), on
    the CPU, on every rank (a collective: all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in gather_experts(model, state).items()}


__all__ = ["ParallelTraining", "ZooParallelStrategy", "clip_gradients", "full_state_dict",
           "shard_units", "vision_blocks"]
