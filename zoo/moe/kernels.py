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


def swiglu_parts(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigmoid(gate), silu(gate), silu(gate) * up)`` of ``h = [gate | up]``: what the backward needs, with a
    single transcendental pass."""
    f = h.shape[1] // 2
    gate, up = h[:, :f], h[:, f:]
    sig = torch.sigmoid(gate)
    silu = gate * sig
    return sig, silu, silu * up


def swiglu_backward(h: torch.Tensor, sig: torch.Tensor, silu: torch.Tensor, grad: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """Gradient wrt ``h = [gate | up]`` of ``swiglu(h)`` given its output gradient ``grad`` [n, f], written into
    ``out`` [n, 2f]; ``sig``, ``silu`` from `swiglu_parts` (``sig`` is overwritten)."""
    f = h.shape[1] // 2
    torch.mul(grad, silu, out=out[:, f:])
    sig.addcmul_(silu, 1 - sig)  # d silu(g) / dg = sigmoid(g) + silu(g) (1 - sigmoid(g))
    torch.mul(grad, h[:, f:], out=out[:, :f]).mul_(sig)
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
        sig, silu, act = swiglu_parts(h)
        grad_w = torch.linalg.vecdot(grad, act) if ctx.needs_input_grad[1] else None
        return swiglu_backward(h, sig, silu, grad * weight.unsqueeze(1), torch.empty_like(h)), grad_w


BLOCK_ELEMENTS = 1 << 21  # rows per block of experts: about this many elements in its widest [rows, width] buffer


def expert_blocks(counts: list[int], width: int) -> list[tuple[int, int, int, int]]:
    """Consecutive experts grouped into blocks ``(first expert, end expert, first row, end row)`` of about
    ``BLOCK_ELEMENTS // width`` rows (at least one expert each), so that gathers, activations and the combine run
    once per block on a cache-sized buffer instead of once per expert (fine-grained experts have small segments)."""
    budget = max(1, BLOCK_ELEMENTS // width)
    blocks, first, row, rows = [], 0, 0, 0
    for e, n in enumerate(counts):
        if rows and rows + n > budget:
            blocks.append((first, e, row, row + rows))
            first, row, rows = e, row + rows, 0
        rows += n
    if counts:
        blocks.append((first, len(counts), row, row + rows))
    return blocks


def _segments(counts: list[int], first: int, end: int):
    """(expert, rows of its segment relative to the block start) for the non-empty experts of a block."""
    start = 0
    for e in range(first, end):
        if counts[e]:
            yield e, slice(start, start + counts[e])
        start += counts[e]


class ExpertSegments(torch.autograd.Function):
    """``y [T, c] = sum_s gate_s * expert_{e_s}(x[token_s])`` over slots sorted by expert, in one autograd node.

    ``apply(x [T, a], token [S], gate [S], counts (list of E ints), w_in [E, a, b], b_in [E, b] | None,
    w_out [E, f, c], b_out [E, c] | None, form, activation, act_fn)`` with b = 2f (swiglu) or f (mlp).
    Expert e's slots are ``counts[e]`` consecutive entries of ``token``/``gate``. The gate multiplies the
    activations, so it reaches the output bias too: ``gate * (act(x w_in + b_in) w_out + b_out)``.

    Work goes block by block (`expert_blocks`): one gather of the block's tokens, one matmul per expert and
    projection into block buffers, one activation, one ``index_add_`` back. Saved for the backward: x, the
    parameters and the pre-activations [S, b]; every other buffer is one block and is reused from block to block.
    SwiGLU with silu has a hand-written activation gradient; other activations differentiate through autograd.
    """

    @staticmethod
    def forward(ctx, x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn):
        y, pre = _segments_forward(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn, True)
        ctx.save_for_backward(x, token, gate, w_in, b_in, w_out, b_out, pre)
        ctx.counts, ctx.form, ctx.activation, ctx.act_fn = counts, form, activation, act_fn
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, token, gate, w_in, b_in, w_out, b_out, pre = ctx.saved_tensors
        counts, need = ctx.counts, ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_gate = torch.empty_like(gate) if need[2] else None
        grad_w_in = torch.empty_like(w_in) if need[4] else None
        grad_b_in = torch.empty_like(b_in) if need[5] else None
        grad_w_out = torch.empty_like(w_out) if need[6] else None
        grad_b_out = torch.empty_like(b_out) if need[7] else None
        for e in (e for e, n in enumerate(counts) if not n):  # experts without tokens get zero gradients
            for g in (grad_w_in, grad_w_out, grad_b_in, grad_b_out):
                if g is not None:
                    g[e].zero_()
        blocks = expert_blocks(counts, max(x.shape[1], pre.shape[1], w_out.shape[2]))
        largest = max((r1 - r0 for _, _, r0, r1 in blocks), default=0)
        rows_in, rows_out = x.new_empty(largest, x.shape[1]), x.new_empty(largest, w_out.shape[2])
        grad_pre, grad_act = pre.new_empty(largest, pre.shape[1]), x.new_empty(largest, w_out.shape[1])
        hand_swiglu = is_silu_swiglu(ctx.form, ctx.activation)
        for first, end, r0, r1 in blocks:
            m, tok, g_b, h = r1 - r0, token[r0:r1], gate[r0:r1].unsqueeze(1), pre[r0:r1]
            segments = list(_segments(counts, first, end))
            dy = torch.index_select(grad_y, 0, tok, out=rows_out[:m])
            if hand_swiglu:
                sig, silu_gate, act = swiglu_parts(h)
            else:
                act = activate(h, ctx.form, ctx.act_fn)
            gated = act * g_b if grad_w_out is not None else None
            da = grad_act[:m]  # wrt the gated activations
            for e, seg in segments:
                if gated is not None:
                    torch.mm(gated[seg].t(), dy[seg], out=grad_w_out[e])
                if grad_b_out is not None:
                    torch.mv(dy[seg].t(), gate[r0:r1][seg], out=grad_b_out[e])
                torch.mm(dy[seg], w_out[e].t(), out=da[seg])
            if grad_gate is not None:
                torch.linalg.vecdot(da, act, out=grad_gate[r0:r1])
                if b_out is not None:
                    for e, seg in segments:
                        grad_gate[r0:r1][seg] += dy[seg] @ b_out[e]
            da.mul_(g_b)
            if hand_swiglu:
                grad_h = swiglu_backward(h, sig, silu_gate, da, grad_pre[:m])
            else:
                grad_h = _activation_backward(h, da, ctx.form, ctx.act_fn)
            xb = torch.index_select(x, 0, tok, out=rows_in[:m]) if grad_w_in is not None else None
            for e, seg in segments:
                if grad_b_in is not None:
                    torch.sum(grad_h[seg], 0, out=grad_b_in[e])
                if xb is not None:
                    torch.mm(xb[seg].t(), grad_h[seg], out=grad_w_in[e])
                if grad_x is not None:  # overwrites the rows of xb this expert has used
                    torch.mm(grad_h[seg], w_in[e].t(), out=rows_in[:m][seg])
            if grad_x is not None:
                grad_x.index_add_(0, tok, rows_in[:m])
        return (grad_x, None, grad_gate, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None)


def expert_segments(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn) -> torch.Tensor:
    """`ExpertSegments` (same arguments); without an autograd node, and without keeping the pre-activations, when
    nothing needs a gradient (inference)."""
    tensors = (x, gate, w_in, b_in, w_out, b_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertSegments.apply(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn)
    return _segments_forward(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn, False)[0]


def _segments_forward(x, token, gate, counts, w_in, b_in, w_out, b_out, form, activation, act_fn, keep: bool):
    """The forward of `ExpertSegments` -> (y, pre-activations [S, b] if ``keep`` else None)."""
    blocks = expert_blocks(counts, max(x.shape[1], w_in.shape[2], w_out.shape[2]))
    largest = max((r1 - r0 for _, _, r0, r1 in blocks), default=0)
    y = x.new_zeros(x.shape[0], w_out.shape[2])
    pre = x.new_empty(token.shape[0] if keep else largest, w_in.shape[2])
    rows_in, rows_out = x.new_empty(largest, x.shape[1]), x.new_empty(largest, w_out.shape[2])
    hand_swiglu = is_silu_swiglu(form, activation)
    for first, end, r0, r1 in blocks:
        m, tok, g_b = r1 - r0, token[r0:r1], gate[r0:r1].unsqueeze(1)
        segments = list(_segments(counts, first, end))
        xb = torch.index_select(x, 0, tok, out=rows_in[:m])
        h = pre[r0:r1] if keep else pre[:m]
        for e, seg in segments:
            if b_in is None:
                torch.mm(xb[seg], w_in[e], out=h[seg])
            else:
                torch.addmm(b_in[e], xb[seg], w_in[e], out=h[seg])
        act = swiglu(h) if hand_swiglu else activate(h, form, act_fn)
        act.mul_(g_b)
        out = rows_out[:m]
        for e, seg in segments:
            torch.mm(act[seg], w_out[e], out=out[seg])
            if b_out is not None:
                out[seg].addcmul_(g_b[seg], b_out[e])
        y.index_add_(0, tok, out)
    return y, pre if keep else None
