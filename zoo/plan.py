"""Will it fit? Per-rank memory of a training run before renting the GPUs (``zoo params NAME --gpus N ...``).

`plan_memory` follows the zoo's placement rules tensor by tensor, so on the tiny twins its parameter, gradient and
optimizer bytes equal what each rank of a real run holds (``memory.json`` of `zoo.train.ranks.MemoryReport`; tested
exactly for ``ddp``, ``fsdp`` and expert parallelism):

- parts whose parameters are all frozen (`frozen_parts`) stay whole on every rank, without gradients or optimizer
  state; frozen parameters inside trainable parts have no gradient and no optimizer state either;
- routed experts under ``expert_parallel`` = ep: E/ep experts per rank (every MoE layer and MoE connector);
- ``ddp``: everything else whole; ``fsdp``: everything else cut on dim 0 like FSDP2 (``torch.chunk`` over the ranks:
  ceil(n / W) rows each, the last ranks fewer or none);
- AdamW keeps two fp32 moments per trainable element plus a 4-byte step per tensor; parameters and gradients keep
  the model's dtype (fp32 under ``32-true`` / ``*-mixed``; 2 bytes under ``bf16-true`` / ``16-true``);
- ``deepspeed_stage_2`` / ``_3``: DeepSpeed's ZeRO formula instead (16-bit parameters and gradients, an fp32 master
  copy and two fp32 moments, partitioned over the ranks; stage 3 also partitions the parameters), without its
  bucket and alignment padding: an estimate, not checked against DeepSpeed's buffers.

Activations are an estimate and printed as one: per LM decoder layer 34·s·b·h + 5·a·s²·b bytes (Korthikanti et al.,
2022: 16-bit activations, no recomputation; with gradient checkpointing 2·s·b·h per layer plus one layer's full
set), plus fp32 logits s·b·V·4; the vision tower is not counted. The all-to-all traffic of expert parallelism is
4·k·T·d·bytes per MoE layer and micro-batch (dispatch and combine, forward and backward), of which (ep - 1)/ep
leaves the rank.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from torch import nn

from zoo.config import ConfigError

GiB = 1024**3
PLAN_STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


def frozen_parts(model: nn.Module) -> list[nn.Module]:
    """The parts (``vision``, ``connector``, ``lm``) none of whose parameters train: kept whole on every rank."""
    return [module for _, module in model.named_children()
            if any(True for _ in module.parameters()) and not any(p.requires_grad for p in module.parameters())]


def apply_trainable(model: nn.Module, patterns: list[str]) -> None:
    """``requires_grad`` from part names (``vision``, ``connector``, ``lm``) or globs over parameter names
    (``lm.*.mlp.*``), as a recipe stage's ``trainable`` says; a pattern that matches nothing is an error."""
    globs = [p if any(c in p for c in "*?[") else f"{p}.*" for p in patterns]
    used = set()
    for name, param in model.named_parameters():
        hits = {g for g in globs if fnmatch.fnmatchcase(name, g)}
        used |= hits
        param.requires_grad_(bool(hits))
    unused = [p for p, g in zip(patterns, globs) if g not in used]
    if unused:
        raise ConfigError(f"--trainable: {unused} match no parameter (parts: vision, connector, lm; or globs over "
                          "parameter names such as lm.*.mlp.*)")


def fsdp_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 size ``rows`` that FSDP2 puts on ``rank`` of ``world`` (torch.chunk)."""
    chunk = math.ceil(rows / world) if rows else 0
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk)


@dataclass
class RankMemory:
    """Bytes one rank holds: parameters, gradients, optimizer states (exact for ddp/fsdp/EP), activations
    (estimate)."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def held(self) -> dict[str, int]:
        """What `zoo.train.ranks.held_bytes` measures (no activations)."""
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer}


@dataclass
class MemoryPlan:
    """The plan of one run: ``ranks`` (one `RankMemory` each), the all-to-all bytes per micro-batch and per rank,
    and whether the fullest rank fits in ``gpu_memory`` bytes."""

    name: str
    world_size: int
    strategy: str
    expert_parallel: int
    precision: str
    micro_batch: int
    seq_len: int
    gpu_memory: int
    ranks: list[RankMemory]
    all_to_all: int = 0
    moe_layers: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_memory

    def __str__(self) -> str:
        peak = self.peak
        rows = [("parameters", peak.parameters), ("gradients", peak.gradients),
                ("optimizer states (AdamW, fp32 moments)", peak.optimizer),
                ("activations (estimate, see zoo.plan)", peak.activations), ("total", peak.total)]
        lines = [f"{self.name} on {self.world_size} x {self.gpu_memory / GiB:g} GiB: {self.strategy}, expert_parallel "
                 f"{self.expert_parallel}, {self.precision}, micro-batch {self.micro_batch} x {self.seq_len} tokens",
                 f"{'per rank (the fullest)':<40} {'bytes':>18} {'GiB':>9}"]
        lines += [f"{label:<40} {value:>18,} {value / GiB:>9.2f}" for label, value in rows]
        if self.expert_parallel > 1:
            lines.append(f"{'all-to-all per micro-batch (sent)':<40} {self.all_to_all:>18,} {self.all_to_all / GiB:>9.2f}"
                         f"  ({self.moe_layers} MoE layers)")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict}: {peak.total / GiB:.1f} of {self.gpu_memory / GiB:g} GiB on the fullest rank")
        return "\n".join(lines + self.notes)


def _check(strategy: str, world: int, expert_parallel: int) -> None:
    if strategy not in PLAN_STRATEGIES:
        raise ConfigError(f"--strategy: expected one of {', '.join(PLAN_STRATEGIES)}, got {strategy!r}")
    if world < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {world}")
    if expert_parallel > 1 and strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"--expert-parallel: {expert_parallel} runs with strategy ddp or fsdp, got {strategy!r}")


def _activations(model: nn.Module, micro_batch: int, seq_len: int, checkpointing: bool) -> int:
    """The labelled activation estimate of the module docstring."""
    from zoo.lm.sparse import decoder_layers

    cfg = model.lm.config
    h, a, layers = cfg.hidden_size, cfg.num_attention_heads, len(decoder_layers(model.lm))
    s, b = seq_len, micro_batch
    full = 34 * s * b * h + 5 * a * s * s * b
    per_layers = (2 * s * b * h * layers + full) if checkpointing else full * layers
    return per_layers + s * b * cfg.vocab_size * 4


def _all_to_all(model: nn.Module, micro_batch: int, seq_len: int, expert_parallel: int, act_bytes: int
                ) -> tuple[int, int]:
    """(bytes sent per rank and micro-batch, number of MoE layers) under expert parallelism."""
    from zoo.moe.parallel import bank_config, expert_banks

    image_tokens = getattr(model, "num_image_tokens", seq_len)
    total, layers = 0, 0
    for name, bank in expert_banks(model).items():
        config = bank_config(model, name)
        k = config.top_k if config is not None else 1
        tokens = micro_batch * (image_tokens if name.startswith("connector") else seq_len)
        width_in = bank.w_in.shape[1]
        width_out = bank.w_out.shape[2]
        total += 2 * k * tokens * (width_in + width_out) * act_bytes  # forward dispatch + combine, then backward
        layers += 1
    return total * (expert_parallel - 1) // expert_parallel, layers


def plan_memory(model: nn.Module, world_size: int, strategy: str = "fsdp", expert_parallel: int = 1,
                precision: str = "bf16-mixed", micro_batch: int = 1, seq_len: int = 2048,
                gpu_memory_gib: float = 80.0, gradient_checkpointing: bool = False, name: str | None = None
                ) -> MemoryPlan:
    """Per-rank memory of training ``model`` (its ``requires_grad`` flags say what trains) on ``world_size`` ranks
    (module docstring). ``model`` may live on the meta device (a catalogue entry built by `zoo.params.build_on_meta`).
    """
    from zoo.moe.parallel import check_expert_parallel, expert_banks

    _check(strategy, world_size, expert_parallel)
    check_expert_parallel(model, expert_parallel, world_size)
    half = precision in ("bf16-true", "16-true")
    whole = {id(p) for part in frozen_parts(model) for p in part.parameters()}
    experts = {id(p) for bank in expert_banks(model).values() for p in bank.parameters()} if expert_parallel > 1 else set()
    ranks = [RankMemory() for _ in range(world_size)]
    zero = int(strategy[-1]) if strategy.startswith("deepspeed") else 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights are one tensor
            continue
        seen.add(id(p))
        size = 2 if half else p.element_size()
        n = p.numel()
        for r, rank in enumerate(ranks):
            if id(p) in whole:
                held = n
            elif id(p) in experts:
                held = n // expert_parallel
            elif strategy == "fsdp":
                held = fsdp_rows(p.shape[0], world_size, r) * (n // p.shape[0]) if p.ndim else n
            else:
                held = n
            if zero:  # DeepSpeed ZeRO: 16-bit weights, fp32 master + moments (estimate)
                part = math.ceil(n / world_size)
                rank.parameters += 2 * (part if zero == 3 and id(p) not in whole else n)
                if p.requires_grad:
                    rank.gradients += 2 * part
                    rank.optimizer += 12 * part
                continue
            rank.parameters += held * size
            if p.requires_grad:
                rank.gradients += held * size
                rank.optimizer += held * 8 + 4
    act_bytes = 4 if precision == "32-true" else 2
    activations = _activations(model, micro_batch, seq_len, gradient_checkpointing)
    for rank in ranks:
        rank.activations = activations
    a2a, layers = _all_to_all(model, micro_batch, seq_len, expert_parallel, act_bytes) if expert_parallel > 1 else (0, 0)
    plan = MemoryPlan(name or getattr(getattr(model, "config", None), "name", type(model).__name__), world_size,
                      strategy, expert_parallel, precision, micro_batch, seq_len, int(gpu_memory_gib * GiB), ranks,
                      a2a, layers)
    if zero:
        plan.notes.append("DeepSpeed rows: ZeRO formula without bucket/alignment padding (an estimate).")
    return plan


def plan_entry(name: str, gpus: int, gpu_memory_gib: float = 80.0, strategy: str = "fsdp", expert_parallel: int = 1,
               trainable: list[str] | None = None, **options) -> MemoryPlan:
    """`plan_memory` of a catalogue name / model YAML built on the meta device (no weights, no memory).
    ``trainable``: part names or parameter globs as in a recipe stage; default every part but the vision experts
    the config freezes. ``options``: ``precision``, ``micro_batch``, ``seq_len``, ``gradient_checkpointing``."""
    from zoo.params import build_on_meta

    model = build_on_meta(name)
    if trainable:
        frozen_by_config = [p for p in model.vision.parameters() if not p.requires_grad]
        apply_trainable(model, trainable)
        for p in frozen_by_config:
            p.requires_grad_(False)
    return plan_memory(model, gpus, strategy, expert_parallel, gpu_memory_gib=gpu_memory_gib, name=name, **options)


__all__ = ["MemoryPlan", "PLAN_STRATEGIES", "RankMemory", "apply_trainable", "frozen_parts", "fsdp_rows",
           "plan_entry", "plan_memory"]
