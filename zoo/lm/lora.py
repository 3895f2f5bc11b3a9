"""LoRA experts on a language model's linear layers, in place: plain LoRA, MoE over LoRAs, rank-wise experts and
task adapters, all as one gated low-rank update (the unification of SMoRA, arXiv 2501.15103):

    y = W0 x + s * B diag(g) A x        A: [R, d_in], B: [d_out, R], g: [R] per token, W0 frozen

| mode | ranks R | rank gates g | scale s |
|---|---|---|---|
| ``single`` (LoRA) | ``rank`` | 1 | alpha / rank |
| ``moe`` (MixLoRA, LLaVA-MoLE; LoRAMoE with ``dense_soft``) | ``n_experts * rank_per_expert`` | each expert's router gate, repeated over its ranks | alpha / rank_per_expert |
| ``rank_moe`` (SMoRA) | ``total_rank`` | router gate per rank, ``active_ranks`` non-zero | alpha / active_ranks |
| ``task`` (MemLoRA) | ``rank`` of the active adapter, or all adapters' ranks for per-sample tags | one-hot of the sample's task | alpha / rank |

``moe`` stores its experts stacked (A: [N, r_e, d_in], B: [N, d_out, r_e]); flattened expert-major they are the
A and B above, so N experts with gates g are one rank N*r_e LoRA with gates repeat(g, r_e). The update is computed
that way: A x for every rank (dense and cheap), masked by g, then B: no gather or dispatch, and a rank whose gate
is 0 gets exactly zero gradient. ``rank_moe`` is ``moe`` with rank-1 experts and scale alpha / active_ranks, so
with ``active_ranks == total_rank`` and ``gate="ones"`` it is exactly a plain LoRA of rank ``total_rank``.

Routers (`LoRARouter`) work in fp32: logits z = W_g x; the chosen experts are the top-k of z + b, where b is a
non-gradient bias buffer (zero unless ``balance="bias"``); gates come from the unbiased z only (softmax over the
chosen, i.e. the renormalised top-k probabilities; raw probabilities when ``renorm`` is False; 1 for
``gate="ones"``), so b steers selection but never the mixing weights (DeepSeek-V3's rule, used by SMoRA).

The VLM passes the padding mask (True at real tokens) and per-sample task tags through a shared `LoRAContext`;
padding tokens are not routed (they get W0 x only) and count in no loss or statistic. Each wrapped layer keeps
the unscaled aux losses (``lora_balance``: the Switch loss of `zoo.moe.losses.switch_balance`) and `RoutingStats`
of its last call; `gather_lora_aux_losses` and `gather_lora_routing_stats` collect them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import ConfigError, LoRAExpertConfig, from_dict
from zoo.lm.sparse import SparseContext
from zoo.moe import losses as L
from zoo.moe.layer import RoutingStats, TokenRouting


@dataclass
class LoRAContext(SparseContext):
    """Per-call inputs shared by all LoRA layers of one LM: ``padding`` ([B, T], True at real tokens; used when its
    shape matches a layer's input) and ``task`` (task mode: one tag per sample, [B] indices into ``task_names`` or
    a list of names; None uses each layer's active adapter). ``modality`` (from `SparseContext`) is unused here."""

    task: torch.Tensor | list[int] | list[str] | None = None


class LoRARouter(nn.Module):
    """Token -> experts (or ranks) of one LoRA layer: ``forward(x [T, d_in]) -> (gates [T, E], chosen [T, k],
    probs [T, E])``, all fp32. ``chosen[:, 0]`` is each token's first choice. See the module docstring for the rule.

    In training, the router counts how often each expert is chosen (``load``) until `update_bias` uses the count.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, gate: str = "softmax", renorm: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.gate, self.renorm = num_experts, top_k, gate, renorm
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        nn.init.normal_(self.weight, std=0.02)  # zoo.moe's router_init_std
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("load", torch.zeros(num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        chosen = (logits + self.bias).topk(self.top_k, dim=-1).indices
        if self.gate == "ones":
            picked = torch.ones_like(chosen, dtype=probs.dtype)
        else:
            picked = probs.gather(1, chosen)
            if self.renorm:
                picked = picked / picked.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, chosen, picked)
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(chosen.reshape(-1), minlength=self.num_experts).to(self.load.dtype)
        return gates, chosen, probs

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, gate={self.gate}, renorm={self.renorm}"

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Aux-loss-free balancing: b_j += gamma * sign(mean load - load_j) over the load counted since the last
        update (the last forward when called after every step); resets the count and returns the load used."""
        load = self.load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank moves its bias by the global load: biases stay equal
        if load.sum() > 0:
            self.bias += gamma * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


class LoRAExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``.base``, so its weights stay ``<name>.base.weight``) plus LoRA experts in
    the config's mode (see the module docstring): ``forward(x [..., d_in]) -> [..., d_out]``.

    Factors: ``lora_A`` / ``lora_B`` are [r, d_in] / [d_out, r] (single; rank_moe with r = total_rank),
    [N, r_e, d_in] / [N, d_out, r_e] (moe) or ParameterLists of [r, d_in] / [d_out, r], one per task in
    ``task_names`` order (task: separate parameters, so training one adapter leaves the others' optimiser state alone).
    B starts at zero and A as peft's kaiming-uniform(a=sqrt(5)), so a fresh layer returns W0 x exactly.
    After each call, ``last_aux`` holds the unscaled aux losses and ``last_stats`` the `RoutingStats` (routed modes).
    """

    def __init__(self, base: nn.Linear, config: LoRAExpertConfig, context: LoRAContext | None = None, name: str = ""):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.config = config
        self.context = context if context is not None else LoRAContext()
        self.name = name or "lora"
        self.mode = config.mode
        d_in, d_out = base.in_features, base.out_features
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.router: LoRARouter | None = None
        c = config
        if self.mode == "task":
            # a list (task_names order), not a dict: names like "update" or "train" would clash with Module attributes
            self.lora_A = nn.ParameterList([torch.empty(c.rank, d_in, **like) for _ in c.task_names])
            self.lora_B = nn.ParameterList([torch.empty(d_out, c.rank, **like) for _ in c.task_names])
            self.active = c.task_names[0]
            self.unit_rank, divisor = c.rank, c.rank
        elif self.mode == "moe":
            n, r = c.n_experts, c.rank_per_expert
            self.lora_A = nn.Parameter(torch.empty(n, r, d_in, **like))
            self.lora_B = nn.Parameter(torch.empty(n, d_out, r, **like))
            self.router = LoRARouter(d_in, n, n if c.dense_soft else c.top_k, c.gate, c.renorm)
            self.unit_rank, divisor = r, r
        else:
            r = c.rank if self.mode == "single" else c.total_rank
            self.lora_A = nn.Parameter(torch.empty(r, d_in, **like))
            self.lora_B = nn.Parameter(torch.empty(d_out, r, **like))
            if self.mode == "rank_moe":
                self.router = LoRARouter(d_in, r, c.active_ranks, c.gate, c.renorm)
            self.unit_rank, divisor = (r, r) if self.mode == "single" else (1, c.active_ranks)
        if self.router is not None:
            self.router.to(base.weight.device)  # fp32 whatever the base dtype
        self.scaling = config.alpha / divisor
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.merged = False
        self.register_buffer("original_weight", None, persistent=False)  # W0 while merged, restored by unmerge
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: RoutingStats | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """B = 0; A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), which is kaiming_uniform_(a=sqrt(5)) per [r, d_in] factor."""
        bound = 1.0 / math.sqrt(self.base.in_features)
        for a in self._params(self.lora_A):
            a.uniform_(-bound, bound)
        for b in self._params(self.lora_B):
            b.zero_()

    @staticmethod
    def _params(p: nn.Parameter | nn.ParameterList) -> list[nn.Parameter]:
        return list(p) if isinstance(p, nn.ParameterList) else [p]

    def factors(self, every_task: bool = False, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat factors (A [R, d_in], B [d_out, R]) the gates act on, experts (or tasks) expert-major. Task mode
        gives adapter ``task`` (default: the active one), or every adapter in ``task_names`` order when
        ``every_task``."""
        if self.mode == "moe":
            n, r, d_in = self.lora_A.shape
            return self.lora_A.reshape(n * r, d_in), self.lora_B.permute(1, 0, 2).reshape(-1, n * r)
        if self.mode == "task":
            if not every_task:
                i = self.task_index(self.active) if task is None else task
                return self.lora_A[i], self.lora_B[i]
            return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1)
        return self.lora_A, self.lora_B

    def delta(self, x: torch.Tensor, gates: torch.Tensor | None = None, task: int | None = None) -> torch.Tensor:
        """The LoRA update s * B diag(repeat(g, r_unit)) A dropout(x), [..., d_out] in the factors' dtype.

        ``gates`` [..., U] (broadcast against x's leading dims) weigh the units: experts (moe), ranks (rank_moe) or
        tasks (task: then every adapter is used); None means all-ones (single, or task adapter ``task``, default
        the active one).
        """
        a, b = self.factors(every_task=gates is not None, task=task)
        h = F.linear(self.dropout(x.to(a.dtype)), a)
        if gates is not None:
            g = gates.to(h.dtype)
            h = h * (g.repeat_interleave(self.unit_rank, dim=-1) if self.unit_rank > 1 else g)
        return F.linear(h, b) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        task, gates = self._task_choice(x) if self.mode == "task" else (None, None)
        if self.merged:  # single or task mode only
            if gates is not None or (task is not None and task != self.task_index(self.active)):
                raise RuntimeError(f"{self.name}: adapter {self.active!r} is merged; task tags naming other "
                                   "adapters need the unmerged adapters; call unmerge()")
            return y
        if self.router is not None:
            gates = self._routed_gates(x)
        return y + self.delta(x, gates, task).to(y.dtype)

    def _routed_gates(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        pad = self.context.padding
        rows = None
        if pad is not None and pad.shape == lead:  # other shapes (e.g. a KV-cache step) carry no padding
            rows = torch.nonzero(pad.reshape(-1)).squeeze(1)
            flat = flat[rows]
        gates, chosen, probs = self.router(flat)
        self.last_aux = {"lora_balance": L.switch_balance(probs, chosen[:, 0])} if self.config.balance == "aux" else {}
        with torch.no_grad():
            counts = torch.bincount(chosen.reshape(-1), minlength=self.router.num_experts)
            zero = counts.new_zeros(())
            token = torch.arange(flat.shape[0], device=flat.device) if rows is None else rows
            self.last_stats = RoutingStats(assigned=counts, kept=counts, dropped=zero, null=zero,
                                           tokens=int(flat.shape[0]), entropy=L.router_entropy(probs),
                                           token_routing=TokenRouting(tuple(lead), token.repeat_interleave(
                                               chosen.shape[1]), chosen.reshape(-1), gates.gather(1, chosen).reshape(-1)))
        if rows is not None:
            gates = gates.new_zeros(lead.numel(), gates.shape[1]).index_copy(0, rows, gates)
        return gates.reshape(*lead, -1)

    def _task_choice(self, x: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
        """``(task, gates)`` of this call's tags: one adapter for the whole batch (only it runs, so the others get
        no gradient at all), one-hot gates ``[B, 1.., n_tasks]`` for mixed tags, or (None, None) without tags."""
        tags = self.context.task
        if tags is None:
            return None, None
        names = self.config.task_names
        if not torch.is_tensor(tags):
            tags = torch.as_tensor([self.task_index(t) if isinstance(t, str) else int(t) for t in tags])
        tags = tags.to(device=x.device, dtype=torch.long)
        if x.dim() < 2 or tags.shape != x.shape[:1]:
            raise ValueError(f"{self.name}: task tags of shape {tuple(tags.shape)} do not match the batch of "
                             f"{tuple(x.shape[:1])} samples; expected one tag per sample")
        if tags.numel() and not 0 <= int(tags.min()) <= int(tags.max()) < len(names):
            raise ValueError(f"{self.name}: task tag out of range for the {len(names)} tasks {names}")
        if tags.numel() and bool((tags == tags[0]).all()):
            return int(tags[0]), None
        return None, F.one_hot(tags, len(names)).view(x.shape[0], *(1,) * (x.dim() - 2), len(names))

    def task_index(self, name: str) -> int:
        """The index of a task adapter by name; an unknown name is an error naming it and the known ones."""
        if self.mode != "task":
            raise ValueError(f"{self.name}: mode {self.mode!r} has no task adapters")
        if name not in self.config.task_names:
            raise ValueError(f"{self.name}: unknown task {name!r}; known: {', '.join(self.config.task_names)}")
        return self.config.task_names.index(name)

    def set_active(self, name: str) -> None:
        """Task mode: use adapter ``name`` for inputs without per-sample tags (not while merged)."""
        self.task_index(name)
        if self.merged and name != self.active:
            raise RuntimeError(f"{self.name}: adapter {self.active!r} is merged; unmerge() before switching to {name!r}")
        self.active = name

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into W0 (single, or task's active adapter); later calls cost one matmul. W0 is
        kept (one copy of the weight) so `unmerge` restores it bitwise. No-op if merged already.

        moe and rank_moe cannot merge: their gates depend on the input."""
        if self.mode in ("moe", "rank_moe"):
            raise RuntimeError(f"{self.name}: mode {self.mode!r} has input-dependent gates; it cannot be merged into W0")
        if self.merged:
            return
        a, b = self.factors()
        self.original_weight = self.base.weight.detach().clone()
        self.base.weight += (self.scaling * (b @ a)).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 exactly (the copy kept by `merge`); no-op if not merged."""
        if not self.merged:
            return
        self.base.weight.copy_(self.original_weight)
        self.original_weight = None
        self.merged = False

    def update_bias(self, gamma: float | None = None) -> torch.Tensor:
        """One aux-loss-free balancing step of the router (``gamma`` default: the config's ``bias_gamma``); returns
        the load per expert/rank it used. See `LoRARouter.update_bias`."""
        if self.router is None:
            raise ValueError(f"{self.name}: mode {self.mode!r} has no router")
        return self.router.update_bias(self.config.bias_gamma if gamma is None else gamma)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, ranks={self.lora_rank}, scaling={self.scaling:g}, merged={self.merged}"

    def active_parameters(self) -> int:
        """Parameters one token runs through (see `zoo.params`): W0, the router, and the chosen share of the
        factors: top_k of n_experts (moe; all with dense_soft), active_ranks of total_rank (rank_moe), one task's
        adapter (task), all of them (single)."""
        total = sum(p.numel() for p in self.parameters())
        factors = sum(p.numel() for p in self._params(self.lora_A) + self._params(self.lora_B))
        c = self.config
        share = {"moe": (c.n_experts if c.dense_soft else c.top_k, c.n_experts),
                 "rank_moe": (c.active_ranks, c.total_rank),
                 "task": (1, len(c.task_names or [None]))}.get(self.mode, (1, 1))
        return total - factors + factors * share[0] // share[1]

    @property
    def lora_rank(self) -> int:
        """Total rank R of the flat factors (all experts', ranks' or the active adapter's)."""
        return self.factors()[0].shape[0]


def _match_targets(lm: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose name is a target or ends in ``.target``; a target matching none is an error."""
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linears):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"lm.lora.targets: {target!r} matches no nn.Linear of {type(lm).__name__}; "
                              f"its linear layers end in {', '.join(suffixes) or 'nothing'}")
    return {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}


def apply_lora_experts(lm: nn.Module, cfg: LoRAExpertConfig | dict, context: LoRAContext | None = None
                       ) -> dict[str, LoRAExpertLinear]:
    """Wrap the LM's ``nn.Linear`` layers named by ``cfg.targets`` in `LoRAExpertLinear`, in place, and freeze every
    other parameter of the LM (only LoRA factors and routers train). ``cfg`` may be a mapping (errors then name
    ``lm.lora.<field>``). All layers share ``context`` (default: a new `LoRAContext`, kept as
    ``lm.zoo_lora_context`` for `lora_context`). Returns the wrapped layers by module name."""
    if isinstance(cfg, dict):
        cfg = from_dict(LoRAExpertConfig, cfg, path="lm.lora")
    if lora_modules(lm):
        raise ValueError(f"lm.lora: {type(lm).__name__} already has LoRA layers")
    chosen = _match_targets(lm, cfg.targets)
    context = context if context is not None else getattr(lm, "zoo_lora_context", None) or LoRAContext()
    lm.requires_grad_(False)
    out = {}
    for name, linear in chosen.items():
        parent, _, child = name.rpartition(".")
        wrapped = LoRAExpertLinear(linear, cfg, context, name=name)
        setattr(lm.get_submodule(parent) if parent else lm, child, wrapped)
        out[name] = wrapped
    lm.zoo_lora_context = context
    return out


def apply_peft_lora(lm: nn.Module, cfg: LoRAExpertConfig) -> nn.Module:
    """Plain LoRA (mode ``single``) through peft instead: ``peft.inject_adapter_in_model`` with
    ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)``, in place (adapter
    ``default``; peft freezes the base weights). Same target matching and errors as `apply_lora_experts`."""
    if cfg.mode != "single":
        raise ConfigError(f"lm.lora.mode: peft gives a plain LoRA (mode 'single'), got {cfg.mode!r}")
    _match_targets(lm, cfg.targets)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=cfg.dropout)
    return inject_adapter_in_model(config, lm)


def apply_lora(lm: nn.Module, cfg: LoRAExpertConfig | dict, context: LoRAContext | None = None
               ) -> dict[str, nn.Module]:
    """The LoRA of a model config on ``lm``, in place: peft's plain LoRA when ``cfg.uses_peft``, else
    `apply_lora_experts`. Either way only the LoRA factors (and routers) of the LM stay trainable. Returns the
    wrapped layers by module name."""
    if isinstance(cfg, dict):
        cfg = from_dict(LoRAExpertConfig, cfg, path="lm.lora")
    if not cfg.uses_peft:
        return apply_lora_experts(lm, cfg, context)
    lm.requires_grad_(False)
    apply_peft_lora(lm, cfg)
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}
    for layer in layers.values():
        for name, param in layer.named_parameters():
            param.requires_grad_(name.startswith(("lora_A", "lora_B")))
    return layers


def lora_modules(model: nn.Module) -> dict[str, LoRAExpertLinear]:
    """All `LoRAExpertLinear` layers of a model, by their module name in the LM."""
    return {m.name: m for m in model.modules() if isinstance(m, LoRAExpertLinear)}


def gather_lora_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Aux losses of the last forward by name (``lora_balance``), unscaled, AVERAGED over the layers that gave one:
    1.0 at uniform routing however many layers are wrapped, so ``aux_coef`` need not change with ``targets``."""
    values: dict[str, list[torch.Tensor]] = {}
    for layer in lora_modules(model).values():
        for name, value in layer.last_aux.items():
            values.setdefault(name, []).append(value)
    return {name: torch.stack(v).mean() for name, v in values.items()}


def gather_lora_routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """`RoutingStats` of the last forward per routed LoRA layer (tokens per expert or rank), by module name."""
    return {n: m.last_stats for n, m in lora_modules(model).items() if m.last_stats is not None}


def update_lora_biases(model: nn.Module, gamma: float | None = None) -> int:
    """Apply the aux-loss-free bias step to every LoRA layer with ``balance="bias"`` (call after each optimiser
    step); ``gamma`` default: each layer's ``bias_gamma``. Returns how many layers were updated."""
    layers = [m for m in lora_modules(model).values() if m.router is not None and m.config.balance == "bias"]
    for layer in layers:
        layer.update_bias(gamma)
    return len(layers)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its W0 (see `LoRAExpertLinear.merge`; routed modes raise); returns the count."""
    layers = lora_modules(model).values()
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Restore every merged LoRA layer's W0 bitwise; returns the count of LoRA layers."""
    layers = lora_modules(model).values()
    for layer in layers:
        layer.unmerge()
    return len(layers)


def set_lora_task(model: nn.Module, name: str) -> None:
    """Task mode: make adapter ``name`` active in every LoRA layer (unknown names are an error naming them)."""
    for layer in lora_modules(model).values():
        layer.set_active(name)


@contextlib.contextmanager
def lora_context(lm: nn.Module, padding: torch.Tensor | None = None,
                 task: torch.Tensor | list[int] | list[str] | None = None):
    """Set the padding mask ([B, T], True at real tokens) and per-sample task tags ([B]) of an LM's LoRA layers
    for the duration of one call (no-op for an LM without LoRA layers)."""
    ctx: LoRAContext | None = getattr(lm, "zoo_lora_context", None)
    if ctx is None:
        yield
        return
    previous = (ctx.padding, ctx.task)
    ctx.padding, ctx.task = padding, task
    try:
        yield
    finally:
        ctx.padding, ctx.task = previous
