"""Expert FFNs: stacked tensors for routed experts, plain modules for shared experts, readers for dense FFNs.

Two FFN forms cover the language and vision models the zoo adapts:

- ``swiglu``: ``down(act(gate x) * up x)`` (Llama, Mistral, Qwen2, Mixtral, DeepSeek). Stacked as
  ``w_in [E, d, 2f]`` (gate columns first, then up) and ``w_out [E, f, d]``.
- ``mlp``: ``fc2(act(fc1 x))`` (Phi, GPT-2, CLIP, ViT). Stacked as ``w_in [E, d, f]`` and ``w_out [E, f, d]``.

Optional biases ``b_in [E, 2f | f]`` and ``b_out [E, d]``. Weights are input-major, so a row block of tokens
multiplies ``w_in[e]`` directly. `read_ffn` reads any supported dense FFN module (by its attribute names) into a
`DenseFFN`; upcycling and ``from_modulelist`` build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from zoo.moe import kernels
from zoo.moe.kernels import WeightedSwiGLU, activate, expert_segments, grouped_matmul

# Probe order: the first transformers activation that reproduces a module's outputs names it.
_ACTIVATION_ORDER = (
    "silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "gelu_fast", "gelu_accurate", "relu2",
    "gelu_python", "tanh", "sigmoid", "mish", "hardswish", "relu6", "linear",
)


def activation_name(act) -> str:
    """The transformers ACT2FN name of an activation module or function, found by comparing outputs."""
    probe = torch.linspace(-6.0, 6.0, 193, device="cpu")  # on the CPU even inside a meta-device context
    with torch.no_grad():
        target = act(probe)
        outputs = {name: ACT2FN[name](probe) for name in _ACTIVATION_ORDER}
        for name, out in outputs.items():  # an exact match first (gelu_new and gelu_pytorch_tanh differ by ~1e-7)
            if torch.equal(out, target):
                return name
        for name, out in outputs.items():
            if torch.allclose(out, target, rtol=0, atol=1e-6):
                return name
    raise ValueError(f"activation {act!r} matches none of the transformers activations {list(_ACTIVATION_ORDER)}")


@dataclass
class DenseFFN:
    """A dense FFN as plain tensors: ``w_in [d, 2f | f]`` (swiglu: gate then up), ``w_out [f, d]``, optional biases."""

    form: str
    activation: str
    w_in: torch.Tensor
    w_out: torch.Tensor
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.w_out.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_out.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in + (self.b_in if self.b_in is not None else 0)
        h = activate(h, self.form, ACT2FN[self.activation])
        return h @ self.w_out + (self.b_out if self.b_out is not None else 0)

    def segments(self, m: int) -> list[DenseFFN]:
        """Split the intermediate dimension into ``m`` equal slices: the sum of the slices' outputs is the FFN's
        output (the output bias is shared out as ``b_out / m``). Fine-grained upcycling uses this."""
        f = self.intermediate_size
        if m < 1 or f % m:
            raise ValueError(f"granularity: {m} does not divide the FFN's intermediate size {f}")
        w = f // m
        parts = []
        for i in range(m):
            cols = torch.arange(i * w, (i + 1) * w)
            if self.form == "swiglu":
                cols_in = torch.cat([cols, cols + f])
            else:
                cols_in = cols
            parts.append(DenseFFN(
                self.form, self.activation, self.w_in[:, cols_in], self.w_out[cols],
                None if self.b_in is None else self.b_in[cols_in],
                None if self.b_out is None else self.b_out / m,
            ))
        return parts


def _linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [in, out], bias) of an nn.Linear or a GPT-2 style Conv1D (weight already [in, out])."""
    w = layer.weight.detach()
    if w.dim() != 2:
        raise ValueError(f"{type(layer).__name__}: not a linear layer (weight of shape {tuple(w.shape)})")
    if type(layer).__name__ == "Conv1D":
        return w, None if layer.bias is None else layer.bias.detach()
    return w.t(), None if getattr(layer, "bias", None) is None else layer.bias.detach()


def _module_activation(module: nn.Module, activation: str | None) -> str:
    if activation is not None:
        return activation
    for attr in ("act_fn", "activation_fn", "act", "activation", "gelu"):  # gelu: open_clip's MLP Sequential
        act = getattr(module, attr, None)
        if callable(act):
            return activation_name(act)
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    if isinstance(hidden_act, str):
        return hidden_act
    raise ValueError(f"{type(module).__name__}: cannot tell its activation; pass activation=<ACT2FN name>")


def read_ffn(module: nn.Module, activation: str | None = None) -> DenseFFN:
    """Read a dense FFN module into a `DenseFFN` by its layer names.

    Supported: ``gate_proj/up_proj/down_proj`` (Llama, Mistral, Qwen2, Gemma, DeepSeek MLPs, `ExpertMLP`),
    ``gate_up_proj/down_proj`` (Phi-3), ``w1/w3/w2`` (per-expert Mixtral), ``fc1/fc2`` (Phi, CLIP, SigLIP, timm
    ``Mlp``), ``c_fc/c_proj`` (GPT-2 Conv1D).
    """
    has = lambda *names: all(isinstance(getattr(module, n, None), nn.Module) for n in names)  # noqa: E731
    act = lambda: _module_activation(module, activation)  # noqa: E731
    if has("gate_proj", "up_proj", "down_proj"):
        (g, gb), (u, ub), (d, db) = (_linear_weight(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        b_in = None if gb is None and ub is None else torch.cat([_or_zeros(gb, g), _or_zeros(ub, u)])
        return DenseFFN("swiglu", act(), torch.cat([g, u], dim=1), d, b_in, db)
    if has("gate_up_proj", "down_proj"):
        (gu, gub), (d, db) = _linear_weight(module.gate_up_proj), _linear_weight(module.down_proj)
        return DenseFFN("swiglu", act(), gu, d, gub, db)
    if has("w1", "w2", "w3"):
        (g, gb), (d, db), (u, ub) = (_linear_weight(getattr(module, n)) for n in ("w1", "w2", "w3"))
        b_in = None if gb is None and ub is None else torch.cat([_or_zeros(gb, g), _or_zeros(ub, u)])
        return DenseFFN("swiglu", act(), torch.cat([g, u], dim=1), d, b_in, db)
    for first, second in (("fc1", "fc2"), ("c_fc", "c_proj")):
        if has(first, second):
            (a, ab), (b, bb) = _linear_weight(getattr(module, first)), _linear_weight(getattr(module, second))
            return DenseFFN("mlp", act(), a, b, ab, bb)
    children = ", ".join(name for name, _ in module.named_children()) or "none"
    raise ValueError(
        f"{type(module).__name__}: not a supported dense FFN (children: {children}); expected gate_proj/up_proj/"
        "down_proj, gate_up_proj/down_proj, w1/w2/w3, fc1/fc2 or c_fc/c_proj"
    )


def _or_zeros(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[1])


class ExpertMLP(nn.Module):
    """One FFN as nn.Linear layers: ``gate_proj/up_proj/down_proj`` (swiglu) or ``fc1/fc2`` (mlp).

    The unit of ``StackedExperts.to_modulelist`` and the fused shared-expert FFN.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, form: str = "swiglu", activation: str = "silu",
                 bias: bool = False, out_size: int | None = None):
        super().__init__()
        self.form, self.activation = form, activation
        out_size = out_size or hidden_size
        if form == "swiglu":
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.down_proj = nn.Linear(intermediate_size, out_size, bias=bias)
        elif form == "mlp":
            self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.fc2 = nn.Linear(intermediate_size, out_size, bias=bias)
        else:
            raise ValueError(f"expert_form: expected 'swiglu' or 'mlp', got {form!r}")
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "swiglu":
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act_fn(self.fc1(x)))

    @torch.no_grad()
    def load_dense(self, ffn: DenseFFN) -> ExpertMLP:
        """Copy a `DenseFFN`'s weights in (shapes must match)."""
        f = ffn.intermediate_size
        if self.form == "swiglu":
            pairs = [(self.gate_proj, ffn.w_in[:, :f], None if ffn.b_in is None else ffn.b_in[:f]),
                     (self.up_proj, ffn.w_in[:, f:], None if ffn.b_in is None else ffn.b_in[f:]),
                     (self.down_proj, ffn.w_out, ffn.b_out)]
        else:
            pairs = [(self.fc1, ffn.w_in, ffn.b_in), (self.fc2, ffn.w_out, ffn.b_out)]
        for layer, w, b in pairs:
            layer.weight.copy_(w.t())
            if layer.bias is not None:
                layer.bias.copy_(b if b is not None else torch.zeros_like(layer.bias))
        return self


class StackedExperts(nn.Module):
    """E expert FFNs stored as stacked tensors (see the module docstring for the layout).

    Routed slots reach the experts only through ``forward`` (`MoELayer`, `ModalityMoELayer` and the MoE connectors
    call it): wrappers that gather a module's parameters around its own forward (FSDP2 shard units, DeepSpeed ZeRO-3)
    then see every use of the stacked tensors. ``parallel`` (set by `zoo.moe.parallel.shard_experts`): this bank
    holds a contiguous shard of the layer's experts and exchanges slots with the other shards by all-to-all.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, form: str = "swiglu",
                 activation: str = "silu", bias: bool = False):
        super().__init__()
        if form not in ("swiglu", "mlp"):
            raise ValueError(f"expert_form: expected 'swiglu' or 'mlp', got {form!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.form, self.activation = form, activation
        width_in = 2 * intermediate_size if form == "swiglu" else intermediate_size
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.b_in = nn.Parameter(torch.empty(num_experts, width_in)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.act_fn = ACT2FN[activation]
        self.parallel = None  # an expert-parallel shard plan (zoo.moe.parallel) when the bank is split over ranks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b, fan_in in ((self.w_in, self.b_in, self.hidden_size), (self.w_out, self.b_out, self.intermediate_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size="
                f"{self.intermediate_size}, form={self.form}, activation={self.activation}, bias={self.b_in is not None}")

    def forward(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                dispatch) -> torch.Tensor:
        """``y [T, d] = sum_s weight_s * expert_{e_s}(x[token_s])`` over the kept slots (``token``, ``expert``,
        ``weight`` [S]; null-expert slots removed), computed by ``dispatch`` (a `zoo.moe.DISPATCHERS` backend) here,
        or, for an expert-parallel shard, by the experts of every rank of its group (``parallel``)."""
        if self.parallel is not None:
            return self.parallel(self, x, token, expert, weight, dispatch)
        return dispatch(self, x, token, expert, weight)

    # -- compute paths used by the dispatch backends ----------------------------------------------------------
    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` [n, d] -> [n, d]."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        h = activate(h, self.form, self.act_fn) @ self.w_out[e]
        return h + self.b_out[e] if self.b_out is not None else h

    def forward_grouped(self, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor,
                        gate: torch.Tensor) -> torch.Tensor:
        """Slots sorted by expert (``expert`` [S] ascending, ``counts`` [E]; ``token`` [S] and ``gate`` [S] in the
        same order) -> ``y [T, d] = sum_s gate_s * expert_{e_s}(x[token_s])`` for x [T, d].

        The gate multiplies the activations before the down projection, where they are narrower for swiglu
        experts. Kernels: `zoo.moe.kernels` (torch's grouped_mm where it pays, else `ExpertSegments`).
        """
        gate = gate.to(x.dtype)
        if not kernels.use_native(x, self.w_in):
            return expert_segments(x, token, gate, counts.tolist(), self.w_in, self.b_in, self.w_out, self.b_out,
                                   self.form, self.activation, self.act_fn)
        h = grouped_matmul(x.index_select(0, token), self.w_in, counts)
        if self.b_in is not None:
            h = h + self.b_in[expert]
        if kernels.is_silu_swiglu(self.form, self.activation):
            h = WeightedSwiGLU.apply(h, gate)
        else:
            h = activate(h, self.form, self.act_fn) * gate.unsqueeze(-1)
        out = grouped_matmul(h, self.w_out, counts)
        if self.b_out is not None:
            out = out + self.b_out[expert] * gate.unsqueeze(-1)
        y = torch.zeros(x.shape[0], out.shape[1], dtype=out.dtype, device=out.device)
        return y.index_add_(0, token, out)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Capacity buffers [E, C, d] -> [E, C, d] with one batched matmul per projection."""
        h = torch.bmm(x, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in.unsqueeze(1)
        h = torch.bmm(activate(h, self.form, self.act_fn), self.w_out)
        return h + self.b_out.unsqueeze(1) if self.b_out is not None else h

    # -- conversion ---------------------------------------------------------------------------------------------
    def expert(self, e: int) -> DenseFFN:
        """Expert ``e`` as a `DenseFFN` (views of the stacked tensors, detached)."""
        return DenseFFN(self.form, self.activation, self.w_in[e].detach(), self.w_out[e].detach(),
                        None if self.b_in is None else self.b_in[e].detach(),
                        None if self.b_out is None else self.b_out[e].detach())

    def to_modulelist(self) -> nn.ModuleList:
        """The experts as a ModuleList of `ExpertMLP` (copies)."""
        mods = nn.ModuleList()
        for e in range(self.num_experts):
            mlp = ExpertMLP(self.hidden_size, self.intermediate_size, self.form, self.activation, self.b_in is not None)
            mods.append(mlp.to(device=self.w_in.device, dtype=self.w_in.dtype).load_dense(self.expert(e)))
        return mods

    @classmethod
    def from_dense(cls, ffns: list[DenseFFN]) -> StackedExperts:
        """Stack dense FFNs of one form, width and activation (copies)."""
        first = ffns[0]
        for i, ffn in enumerate(ffns):
            same = (ffn.form, ffn.activation, ffn.w_in.shape, ffn.w_out.shape) == (
                first.form, first.activation, first.w_in.shape, first.w_out.shape)
            if not same:
                raise ValueError(f"experts[{i}]: form/activation/shape {ffn.form}/{ffn.activation}/"
                                 f"{tuple(ffn.w_in.shape)} differs from experts[0] {first.form}/{first.activation}/"
                                 f"{tuple(first.w_in.shape)}")
        bias = any(f.b_in is not None or f.b_out is not None for f in ffns)
        new = cls(len(ffns), first.hidden_size, first.intermediate_size, first.form, first.activation, bias)
        new.to(device=first.w_in.device, dtype=first.w_in.dtype)
        with torch.no_grad():
            new.w_in.copy_(torch.stack([f.w_in for f in ffns]))
            new.w_out.copy_(torch.stack([f.w_out for f in ffns]))
            if bias:
                new.b_in.copy_(torch.stack([_or_zeros(f.b_in, f.w_in) for f in ffns]))
                new.b_out.copy_(torch.stack([_or_zeros(f.b_out, f.w_out) for f in ffns]))
        return new

    @classmethod
    def from_modulelist(cls, modules, activation: str | None = None) -> StackedExperts:
        """Stack per-expert FFN modules (any form `read_ffn` supports)."""
        return cls.from_dense([read_ffn(m, activation) for m in modules])

