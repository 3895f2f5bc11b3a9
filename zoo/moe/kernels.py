"""Grouped matrix multiply over expert segments: rows sorted by expert, one weight matrix per expert.

`grouped_matmul(x, w, counts)` computes, for every expert e, ``x[rows of e] @ w[e]``. Two implementations:

- ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``): one kernel call for all experts. Used wherever it
  runs: it must exist, pass a small self-test once per device type and dtype (CUDA needs sm80+ and bf16/fp16 in
  most builds; torch 2.14 also has a CPU kernel) and see 16-byte aligned rows and pointers.
- `SegmentMatmul`: one ``torch.mm`` per non-empty segment, forward and backward, writing into preallocated
  outputs (no per-expert ``where``, no zero-filled [E, d, f] gradients). The fallback everywhere else.

On this project's 2-core CPU the two measured within a few percent of each other, the torch kernel slightly ahead
(bench/moe.py prints both). ``GROUPED_MM`` selects: "auto" (the rules above), "native" (always the torch kernel),
"segments" (never).
"""

from __future__ import annotations

import torch

GROUPED_MM = "auto"
_NATIVE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _native_fn():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class SegmentMatmul(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e]`` for consecutive row segments of the given sizes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start:start + n], w[e], out=out[start:start + n])
            start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if n and grad_x is not None:
                torch.mm(grad[rows], w[e].t(), out=grad_x[rows])
            if grad_w is not None:
                if n:
                    torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += n
        return grad_x, grad_w, None


def _native_allowed(x: torch.Tensor, w: torch.Tensor) -> bool:
    fn = _native_fn()
    if fn is None or GROUPED_MM == "segments":
        return False
    if GROUPED_MM == "native":
        return True
    if w.dtype != x.dtype:
        return False
    if (x.shape[1] * x.element_size()) % 16 or (w.shape[2] * w.element_size()) % 16:
        return False
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    key = (x.device.type, x.dtype)
    if key not in _NATIVE_OK:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                _NATIVE_OK[key] = _self_test(fn, x.device, x.dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            _NATIVE_OK[key] = False
    return _NATIVE_OK[key]


def _self_test(fn, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the torch kernel give the right forward and weight gradient here (two groups of 16 ones)?"""
    a = torch.ones(32, 16, device=device, dtype=dtype, requires_grad=True)
    b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
    out = fn(a, b, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
    out.sum().backward()
    return bool(torch.all(out == 16)) and bool(torch.all(b.grad == 16))


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_list: list[int]) -> torch.Tensor:
    """[N, a] rows sorted by expert (``counts`` rows for expert e, in order) times w [E, a, b] -> [N, b]."""
    x = x.contiguous()
    if _native_allowed(x, w):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _native_fn()(x, w, offs=offsets)
    return SegmentMatmul.apply(x, w, counts_list)


class WeightedSwiGLU(torch.autograd.Function):
    """``silu(gate) * up * weight`` from ``h = [gate | up]`` [N, 2f] and per-row gates ``weight`` [N], in one
    autograd node: it keeps only ``h`` and ``weight`` for the backward (autograd's chain would keep three [N, f]
    intermediates) and writes the input gradient straight into one [N, 2f] tensor (no ``cat``)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        f = h.shape[1] // 2
        gate, up = h[:, :f], h[:, f:]
        out = torch.nn.functional.silu(gate)
        out.mul_(up).mul_(weight.unsqueeze(1))
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        f = h.shape[1] // 2
        gate, up = h[:, :f], h[:, f:]
        w = weight.unsqueeze(1)
        grad_h = torch.empty_like(h)
        act = torch.nn.functional.silu(gate)
        grad_up = torch.mul(grad, up)  # d/d(act) before the gate weight
        grad_w = torch.linalg.vecdot(grad_up, act) if ctx.needs_input_grad[1] else None
        torch.ops.aten.silu_backward.grad_input(grad_up.mul_(w), gate, grad_input=grad_h[:, :f])
        torch.mul(grad, act, out=grad_h[:, f:]).mul_(w)
        return grad_h, grad_w
