"""The training loss, soft-capped cross-entropy, as two Triton kernels.

The 04-23 record's idea (TECHNIQUES.md §3.8): one pass over the pre-cap logits makes the
loss and keeps only a log-sum-exp per token; the backward pass recomputes the gradient
from the logits. Inductor makes the same passes of `loss.fused_softcap_nll` (one read of
the bf16 logits forward, one read and one write backward: the floor in bytes), but on an
H100 its forward is bound by instruction issue, not memory: libdevice's tanh and exp make
it 34 to 44 SASS instructions per logit (by branch path, in its best configuration), where
memory streams a logit in the time of about 22 (counted in sm_90 SASS, 2026-11-24). Here tanh is
one exp2 and one division, without branches (22 to 26 instructions per logit forward, 28
to 31 backward, by configuration):

    t = tanh(|u|) = (1 - e) / (1 + e),  e = exp(-2|u|) in (0, 1],  u = z / cap,

and the soft cap bounds the logits, so exp(s - cap) lies in (exp(-2 cap), 1] and the
log-sum-exp needs no running maximum (`loss.capped_logsumexp`).

Training only, like the fused MLP: a model runs `softcap_ce` only when built with it
(`dispatch.resolve_kernels` with `train.runtime.fused_ce`), and then only with autograd on
(`kernels.Kernels.loss_wanted`), so evaluation scores with `loss.softcap_nll`. The model
does not import this module (its code stays out of the artifact's evaluation code).
Kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests check them.
"""

from __future__ import annotations

import functools
import math
import types

import torch

from pgolf_core.loss import BOUNDED_LSE_MAX_CAP, lse_needs_no_maximum


def softcap_ce(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token NLL in nats, float32, of logits (..., V) soft-capped at `cap` (the
    values of `loss.softcap_nll`); the gradient reaches `logits` in its own dtype."""
    flat = logits.reshape(-1, logits.size(-1)).contiguous()
    return _SoftcapCE.apply(flat, targets.reshape(-1), float(cap)).view(targets.shape)


class _SoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        nll, lse = torch.ops.pgolf.softcap_ce(logits, targets, cap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap = cap
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.ops.pgolf.softcap_ce_grad(grad_nll.float().contiguous(), logits, targets, lse, ctx.cap)
        return grad, None, None


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
def softcap_ce_op(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, lse), float32 (N,), of logits (N, V) soft-capped at `cap`, targets (N,)."""
    nll = logits.new_empty(logits.size(0), dtype=torch.float32)
    lse = torch.empty_like(nll)
    _launch(logits, targets, cap, forward=(nll, lse))
    return nll, lse


@softcap_ce_op.register_fake
def _(logits, targets, cap):
    nll = logits.new_empty(logits.size(0), dtype=torch.float32)
    return nll, torch.empty_like(nll)


@torch.library.custom_op("pgolf::softcap_ce_grad", mutates_args=())
def softcap_ce_grad(grad_nll: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    cap: float) -> torch.Tensor:
    """d(sum grad_nll * nll)/d logits, (N, V) in the logits' dtype:
    grad_nll * (softmax(s) - onehot(target)) * (1 - (s / cap)^2), s the capped logits."""
    grad = torch.empty_like(logits)  # the logits' strides (rows of unit-stride columns)
    _launch(logits, targets, cap, backward=(grad_nll, lse, grad))
    return grad


@softcap_ce_grad.register_fake
def _(grad_nll, logits, targets, lse, cap):
    return torch.empty_like(logits)


def _launch(logits: torch.Tensor, targets: torch.Tensor, cap: float, forward=None, backward=None) -> None:
    """Run the forward kernel (one program per row) or the backward one (one per row and
    chunk of the vocabulary). CPU tensors run interpreted, with small chunks."""
    import triton

    if not lse_needs_no_maximum(cap):
        raise ValueError(f"fused cross-entropy needs a soft cap in (0, {BOUNDED_LSE_MAX_CAP}], got {cap}")
    interpreted = logits.device.type == "cpu"
    rows, vocab = logits.shape
    meta = dict(CAP=cap, INV_CAP=1.0 / cap, LOG2E=math.log2(math.e))
    if interpreted:
        meta["BLOCK_V"] = 16  # several chunks and a ragged last one, at the tests' vocabularies
    kernel_fwd, kernel_bwd = _kernels(interpreted)
    if forward is not None:
        nll, lse = forward
        kernel_fwd[(rows,)](logits, targets, nll, lse, vocab, logits.stride(0), **meta)
    else:
        grad_nll, lse, grad = backward
        grid = (rows, triton.cdiv(vocab, 16)) if interpreted else lambda c: (rows, triton.cdiv(vocab, c["BLOCK_V"]))
        kernel_bwd[grid](grad, logits, targets, lse, grad_nll, vocab, logits.stride(0), **meta)


def _configs(blocks_and_warps):
    import triton

    return [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in blocks_and_warps]


@functools.cache
def _kernels(interpreted: bool):
    """(forward, backward): compiled and autotuned, or run by Triton's interpreter. Built on
    first use, so importing this module does not import triton. Only builtins of
    triton.language (and a reduction combiner made in the same mode): its jit functions
    (tl.sum, tl.cdiv) work only in the mode triton was first imported in."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    make = InterpretedFunction if interpreted else JITFunction

    def add(a, b):
        return a + b

    def capped(z, CAP: tl.constexpr, INV_CAP: tl.constexpr, LOG2E: tl.constexpr):
        """(s, t): s = CAP * t, t = tanh(z / CAP), by one exp2 and one division."""
        u = z * INV_CAP
        e = tl.exp2(tl.abs(u) * (-2.0 * LOG2E))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        return CAP * t, t

    def softcap_ce_forward(logits_ptr, targets_ptr, nll_ptr, lse_ptr, V: tl.constexpr, stride_row, CAP: tl.constexpr,
                           INV_CAP: tl.constexpr, LOG2E: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride_row
        cols = tl.arange(0, BLOCK_V)
        total = tl.full((BLOCK_V,), 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            inside = start + cols < V
            z = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            s, _ = _capped(z, CAP, INV_CAP, LOG2E)
            total += tl.where(inside, tl.exp2((s - CAP) * LOG2E), 0.0)  # in (exp(-2 CAP), 1]: no maximum needed
        lse = CAP + tl.log(tl.reduce(total, 0, _add))
        target = tl.load(targets_ptr + row)
        tl.device_assert((target >= 0) & (target < V), "target out of the vocabulary")
        s_target, _ = _capped(tl.load(base + target).to(tl.float32), CAP, INV_CAP, LOG2E)
        tl.store(nll_ptr + row, lse - s_target)
        tl.store(lse_ptr + row, lse)

    def softcap_ce_backward(grad_ptr, logits_ptr, targets_ptr, lse_ptr, grad_nll_ptr, V: tl.constexpr, stride_row,
                            CAP: tl.constexpr, INV_CAP: tl.constexpr, LOG2E: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        inside = cols < V
        z = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        s, t = _capped(z, CAP, INV_CAP, LOG2E)
        p = tl.exp2((s - tl.load(lse_ptr + row)) * LOG2E)
        hit = tl.where(cols == tl.load(targets_ptr + row), 1.0, 0.0)
        grad = tl.load(grad_nll_ptr + row) * (p - hit) * (1.0 - t * t)
        tl.store(grad_ptr + row.to(tl.int64) * stride_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)

    # the kernels call their helpers as globals, and the interpreter wants triton.language
    # among a function's globals: all four share this scope
    scope = {**globals(), "tl": tl}

    def bind(fn):
        return make(types.FunctionType(fn.__code__, scope, fn.__name__, None, fn.__closure__))

    scope["_capped"], scope["_add"] = bind(capped), bind(add)
    forward, backward = bind(softcap_ce_forward), bind(softcap_ce_backward)
    if interpreted:
        return forward, backward
    # record rows: V = 8,192 bf16 logits, 16 KB; forward reads a row per program, backward a chunk
    forward = triton.autotune(configs=_configs([(8192, 8), (8192, 16), (4096, 8), (4096, 4), (2048, 4)]),
                              key=["V"])(forward)
    backward = triton.autotune(configs=_configs([(4096, 8), (2048, 8), (2048, 4), (1024, 4), (8192, 16)]),
                               key=["V"])(backward)
    return forward, backward
