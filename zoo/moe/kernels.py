"""Expert kernels of the ``grouped`` dispatch: all experts on their token segments with few, small buffers.

Slots are sorted by expert: expert e owns ``counts[e]`` consecutive slots, each a (token, gate) pair. Two kernels
compute ``y[t] = sum over slots s of t: gate_s * expert_{e_s}(x[t])``:

- `ExpertSegments` (the default on the CPU, and the fallback everywhere): one autograd node for the whole expert
  bank. Per expert it gathers its tokens into a small reused buffer, runs the input projection, the activation
  (gate folded in) and the output projection, and adds the result into y; the backward walks the experts again
  by hand. It keeps only the input projection's output [S, width_in] for the backward and never materialises a
  [S, d] copy of the tokens, of the outputs or of their gradients: on a CPU those buffers were the difference
  to a dense FFN (every buffer above glibc's 32 MB mmap limit is freshly page-faulted on each step).
- `grouped_matmul` + `WeightedSwiGLU`: ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``), one kernel
  call per projection for all experts, over tokens gathered into [S, d]. Used on accelerators wherever the kernel
  runs: it must exist, pass a small self-test once per device type and dtype (CUDA needs sm80+ and bf16/fp16 in
  most builds) and see 16-byte aligned rows and pointers.

``GROUPED_MM`` selects: "auto" (torch's kernel off the CPU where the rules above allow, else `ExpertSegments`),
"native" (always torch's kernel; it also runs on the CPU in torch 2.14) or "segments" (always `ExpertSegments`).
bench/moe.py prints both kernels side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_MM = "auto"
_NATIVE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _native_fn():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def use_native(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Should ``x @ w[e]`` over expert segments run on torch's grouped_mm kernel (see ``GROUPED_MM``)?"""
    fn = _native_fn()
    if fn is None or GROUPED_MM == "segments":
        return False
    if GROUPED_MM == "native":
        return True
    if x.device.type == "cpu" or w.dtype != x.dtype:
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


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Torch's grouped kernel: [S, a] rows sorted by expert (``counts`` rows for expert e) times w [E, a, b]."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return _native_fn()(x.contiguous(), w, offs=offsets)


# -- activations ----------------------------------------------------------------------------------------------
def activate(h: torch.Tensor, form: str, act) -> torch.Tensor:
    """``act(gate) * up`` of ``h = [gate | up]`` (swiglu) or ``act(h)`` (mlp)."""
    if form == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def is_silu_swiglu(form: str, activation: str) -> bool:
    """Does the hand-written SwiGLU gradient apply (swiglu form with silu)?"""
    return form == "swiglu" and activation in ("silu", "swish")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]`` [n, 2f] -> [n, f]."""
    f = h.shape[1] // 2
    return F.silu(h[:, :f]).mul_(h[:, f:])


def swiglu_parts(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(silu(gate), silu(gate) * up)`` of ``h = [gate | up]``: what the backward needs."""
    f = h.shape[1] // 2
    silu = F.silu(h[:, :f])
    return silu, silu * h[:, f:]


def swiglu_backward(h: torch.Tensor, silu: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient wrt ``h = [gate | up]`` of ``swiglu(h)`` given its output gradient ``grad`` [n, f], written into
    ``out`` [n, 2f]; ``silu`` from `swiglu_parts`. Three elementwise passes (each one a parallel region)."""
    f = h.shape[1] // 2
    torch.mul(grad, silu, out=out[:, f:])
    torch.ops.aten.silu_backward.grad_input(grad * h[:, f:], h[:, :f], grad_input=out[:, :f])
    return out


def _activation_backward(h: torch.Tensor, grad: torch.Tensor, form: str, act) -> torch.Tensor:
    """Gradient wrt h of ``activate(h)`` given its output gradient (any activation, through autograd)."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        (grad_h,) = torch.autograd.grad(activate(h, form, act), h, grad)
    return grad_h


class WeightedSwiGLU(torch.autograd.Function):
    """``silu(gate) * up * weight`` from ``h = [gate | up]`` [N, 2f] and per-row gates ``weight`` [N], in one
    autograd node: it keeps only ``h`` and ``weight`` for the backward (autograd's chain would keep three [N, f]
    intermediates) and writes the input gradient straight into one [N, 2f] tensor (no ``cat``)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return swiglu(h).mul_(weight.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        silu, act = swiglu_parts(h)
        grad_w = torch.linalg.vecdot(grad, act) if ctx.needs_input_grad[1] else None
        return swiglu_backward(h, silu, grad * weight.unsqueeze(1), torch.empty_like(h)), grad_w


# Blocks of consecutive experts padded to a common length run as one batched matmul per projection: one parallel
# region per block and projection instead of one per expert (fine-grained experts make many small segments, and a
# shared or oversubscribed CPU pays for every region), at the price of some padding rows.
BLOCK_ELEMENTS = 1 << 22  # the widest per-block buffer [padded rows, width] holds at most about this many elements
BLOCK_COST_ROWS = 512  # one more block costs as much as this many padding rows (the block partition's trade-off)


@dataclass
class BlockLayout:
    """Slots sorted by expert laid out in padded blocks: block ``(first, end, capacity, row)`` holds experts
    ``first..end-1``, ``capacity`` rows each (an expert's slots first, then padding), from padded row ``row`` on.

    ``slot_row`` [S]: the padded row of each slot; ``token``, ``gate`` [R]: per padded row (0 on padding);
    ``padding`` [R - S]: the padding rows, counted from their block's first row, block after block
    (``padding_spans[b]`` delimits block b's). The forward zero-fills them after its gather and their gates are
    zero, so they add exact zeros to outputs and gradients.
    """

    blocks: list[tuple[int, int, int, int]]
    rows: int
    slot_row: torch.Tensor
    token: torch.Tensor
    gate: torch.Tensor
    padding: torch.Tensor
    padding_spans: list[tuple[int, int]]

    @classmethod
    def build(cls, counts: list[int], token: torch.Tensor, gate: torch.Tensor, width: int) -> BlockLayout:
        blocks = expert_blocks(counts, width)
        shift, pad_shift, pad_len, spans = [], [], [], []  # per expert: padded row - slot; padding index shifts
        slots = pads = 0
        for first, end, capacity, row in blocks:
            start = pads
            for j, e in enumerate(range(first, end)):
                shift.append(row + j * capacity - slots)
                pad_shift.append(j * capacity + counts[e] - pads)
                pad_len.append(capacity - counts[e])
                slots, pads = slots + counts[e], pads + capacity - counts[e]
            spans.append((start, pads))
        device = token.device
        slot_row = torch.arange(slots, device=device) + _repeat(shift, counts, slots, device)
        padding = torch.arange(pads, device=device) + _repeat(pad_shift, pad_len, pads, device)
        rows = slots + pads
        return cls(blocks, rows, slot_row, token.new_zeros(rows).index_copy_(0, slot_row, token),
                   gate.new_zeros(rows).index_copy_(0, slot_row, gate), padding, spans)


def _repeat(values: list[int], repeats: list[int], total: int, device: torch.device) -> torch.Tensor:
    """``values[i]`` repeated ``repeats[i]`` times, as a long tensor of length ``total`` on ``device``."""
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.long, device=device),
                                   torch.tensor(repeats, dtype=torch.long, device=device), output_size=total)


def expert_blocks(counts: list[int], width: int) -> list[tuple[int, int, int, int]]:
    """Consecutive experts grouped into blocks ``(first expert, end expert, capacity, first padded row)``, capacity
    being the block's largest segment: the partition with the fewest padded rows plus ``BLOCK_COST_ROWS`` per
    block (dynamic programming over the cut points), blocks within ``BLOCK_ELEMENTS // width`` padded rows unless
    a single expert needs more."""
    budget = max(1, BLOCK_ELEMENTS // width)
    best, cut = [0] + [math.inf] * len(counts), [0] * (len(counts) + 1)
    for end in range(1, len(counts) + 1):
        capacity = 0
        for first in range(end - 1, -1, -1):
            capacity = max(capacity, counts[first])
            rows = capacity * (end - first)
            if rows > budget and first < end - 1:
                break
            if best[first] + rows + BLOCK_COST_ROWS < best[end]:
                best[end], cut[end] = best[first] + rows + BLOCK_COST_ROWS, first
    spans, end = [], len(counts)
    while end:
        spans.append((cut[end], end))
        end = cut[end]
    blocks, row = [], 0
    for first, end in reversed(spans):
        capacity = max(counts[first:end])
        blocks.append((first, end, capacity, row))
        row += capacity * (end - first)
    return blocks


class ExpertSegments(torch.autograd.Function):
    """``y [T, c] = sum_s gate_s * expert_{e_s}(x[token_s])`` over slots sorted by expert, in one autograd node.

    ``apply(x [T, a], token [S], gate [S], counts (list of E ints), w_in [E, a, b], b_in [E, b] | None,
    w_out [E, f, c], b_out [E, c] | None, form, activation, act_fn)`` with b = 2f (swiglu) or f (mlp).
    Expert e's slots are ``counts[e]`` consecutive entries of ``token``/``gate``. The gate multiplies the
    activations, so it reaches the output bias too: ``gate * (act(x w_in + b_in) w_out + b_out)``.

    Work goes block by block (`BlockLayout`): one gather of the block's tokens, one batched matmul per
    projection, one activation, one ``index_add_`` back. Saved for the backward: x, the parameters, the layout and
    the padded pre-activations [R, b]; every other buffer is one block and is reused from block to block. SwiGLU
    with silu has a hand-written activation gradient; other activations differentiate through autograd.
    """

    @staticmethod
    def forward(ctx, x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn):
        layout = BlockLayout.build(counts, token, gate, _width(x, w_in, w_out))
        y, pre = _segments_forward(x, layout, w_in, b_in, w_out, b_out, form, activation, act_fn, keep=True)
        ctx.save_for_backward(x, w_in, b_in, w_out, b_out, pre, layout.slot_row, layout.token, layout.gate)
        ctx.blocks, ctx.form, ctx.activation, ctx.act_fn = layout.blocks, form, activation, act_fn
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w_in, b_in, w_out, b_out, pre, slot_row, token, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_gate = torch.empty_like(gate) if need[2] else None  # per padded row
        grad_w_in = torch.empty_like(w_in) if need[4] else None
        grad_b_in = torch.empty_like(b_in) if need[5] else None
        grad_w_out = torch.empty_like(w_out) if need[6] else None
        grad_b_out = torch.empty_like(b_out) if need[7] else None
        largest = max(((end - first) * c for first, end, c, _ in ctx.blocks), default=0)
        rows_in, rows_out = x.new_empty(largest, x.shape[1]), x.new_empty(largest, w_out.shape[2])
        grad_pre, grad_act = pre.new_empty(largest, pre.shape[1]), x.new_empty(largest, w_out.shape[1])
        hand_swiglu = is_silu_swiglu(ctx.form, ctx.activation)
        for first, end, capacity, r0 in ctx.blocks:
            k, m, experts = end - first, (end - first) * capacity, slice(first, end)
            if not m:  # experts without tokens (a block's capacity is its largest segment)
                for g in (grad_w_in, grad_b_in, grad_w_out, grad_b_out):
                    if g is not None:
                        g[experts].zero_()
                continue
            r1 = r0 + m
            tok, g_b, h = token[r0:r1], gate[r0:r1].unsqueeze(1), pre[r0:r1]
            # padding rows read token 0's gradient; their zero gates zero everything it reaches
            dy = torch.index_select(grad_y, 0, tok, out=rows_out[:m])
            if hand_swiglu:
                silu_gate, act = swiglu_parts(h)
            else:
                act = activate(h, ctx.form, ctx.act_fn)
            dy3 = dy.view(k, capacity, -1)
            if grad_w_out is not None:
                torch.bmm((act * g_b).view(k, capacity, -1).transpose(1, 2), dy3, out=grad_w_out[experts])
            if grad_b_out is not None:
                torch.bmm(g_b.view(k, 1, capacity), dy3, out=grad_b_out[experts].unsqueeze(1))
            da = torch.bmm(dy3, w_out[experts].transpose(1, 2), out=grad_act[:m].view(k, capacity, -1)).view(m, -1)
            if grad_gate is not None:  # da is the gradient wrt the gated activations
                torch.linalg.vecdot(da, act, out=grad_gate[r0:r1])
                if b_out is not None:
                    grad_gate[r0:r1] += torch.bmm(dy3, b_out[experts].unsqueeze(2)).view(m)
            da.mul_(g_b)
            if hand_swiglu:
                grad_h = swiglu_backward(h, silu_gate, da, grad_pre[:m])
            else:
                grad_h = _activation_backward(h, da, ctx.form, ctx.act_fn)
            grad_h3 = grad_h.view(k, capacity, -1)
            if grad_b_in is not None:
                torch.sum(grad_h3, 1, out=grad_b_in[experts])
            if grad_w_in is not None:
                xb = torch.index_select(x, 0, tok, out=rows_in[:m]).view(k, capacity, -1)
                torch.bmm(xb.transpose(1, 2), grad_h3, out=grad_w_in[experts])
            if grad_x is not None:
                dx = torch.bmm(grad_h3, w_in[experts].transpose(1, 2), out=rows_in[:m].view(k, capacity, -1))
                grad_x.index_add_(0, tok, dx.view(m, -1))
        grad_gate = grad_gate[slot_row] if grad_gate is not None else None
        return (grad_x, None, grad_gate, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None)


def _width(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> int:
    return max(x.shape[1], w_in.shape[2], w_out.shape[2])


def expert_segments(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn) -> torch.Tensor:
    """`ExpertSegments` (same arguments); without an autograd node, and without keeping the pre-activations, when
    nothing needs a gradient (inference)."""
    tensors = (x, gate, w_in, b_in, w_out, b_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertSegments.apply(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn)
    layout = BlockLayout.build(counts, token, gate, _width(x, w_in, w_out))
    return _segments_forward(x, layout, w_in, b_in, w_out, b_out, form, activation, act_fn, keep=False)[0]


def _segments_forward(x, layout: BlockLayout, w_in, b_in, w_out, b_out, form, activation, act_fn, keep: bool):
    """The forward of `ExpertSegments` -> (y, padded pre-activations [R, b] if ``keep`` else None)."""
    largest = max(((end - first) * c for first, end, c, _ in layout.blocks), default=0)
    y = x.new_zeros(x.shape[0], w_out.shape[2])
    pre = x.new_empty(layout.rows if keep else largest, w_in.shape[2])
    rows_in, rows_out = x.new_empty(largest, x.shape[1]), x.new_empty(largest, w_out.shape[2])
    hand_swiglu = is_silu_swiglu(form, activation)
    for (first, end, capacity, r0), (p0, p1) in zip(layout.blocks, layout.padding_spans):
        k, m, experts = end - first, (end - first) * capacity, slice(first, end)
        if not m:
            continue
        r1 = r0 + m
        tok, g_b = layout.token[r0:r1], layout.gate[r0:r1].unsqueeze(1)
        xb = torch.index_select(x, 0, tok, out=rows_in[:m]).index_fill_(0, layout.padding[p0:p1], 0)
        h = (pre[r0:r1] if keep else pre[:m]).view(k, capacity, -1)
        if b_in is None:
            torch.bmm(xb.view(k, capacity, -1), w_in[experts], out=h)
        else:
            torch.baddbmm(b_in[experts].unsqueeze(1), xb.view(k, capacity, -1), w_in[experts], out=h)
        h = h.view(m, -1)
        act = swiglu(h) if hand_swiglu else activate(h, form, act_fn)
        act.mul_(g_b)
        out = torch.bmm(act.view(k, capacity, -1), w_out[experts], out=rows_out[:m].view(k, capacity, -1))
        if b_out is not None:
            out.addcmul_(g_b.view(k, capacity, 1), b_out[experts].unsqueeze(1))
        y.index_add_(0, tok, out.view(m, -1))
    return y, pre if keep else None
