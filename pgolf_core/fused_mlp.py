"""The MLP's up-projection and activation fused into one Triton matmul, for training.

The idea is the 04-10 record's (TECHNIQUES.md §3.8: with grouped all-reduces, about 3 %
faster). The plain MLP `down(leaky_relu(up(x), s)^2)` makes the 4x-wide hidden travel
through memory several times per layer pass:
- forward: cuBLAS writes h = x W_up^T, and an elementwise kernel reads h and writes a;
- backward: cuBLAS writes dA = dy W_down, and an elementwise kernel reads dA and h and
  writes dh (and often recomputes a from h for dW_down = dy^T a).
Here the forward matmul writes h and a straight from its accumulator, and the backward
matmul writes dh = dA * act'(h) from its own, reading h in its epilogue. Inductor counts
136 KB less traffic per token for the unlooped record step (-7 %). h and a are
kept for the backward, as Inductor keeps them for the plain MLP.

Both kernels round the accumulator to the activation dtype before the activation, as
the plain composition does (h and dA are rounded matmul outputs there), so the two paths
differ only by matmul summation order.

Training only: a model runs `fused_mlp` only when built with it (`dispatch.resolve_kernels`
with `train.runtime.fused_mlp`), and then only with autograd on (`kernels.Kernels.mlp_wanted`), so
evaluation and GPTQ calibration run the plain `MLP.forward`, whose hooks see the down
projection's input. The model does not import this module, so its code stays out of the
artifact's evaluation code.

The kernels run on CUDA tensors with Triton installed, and on CPU tensors under Triton's
interpreter (`TRITON_INTERPRET=1`), which is how the tests check them; numpy has no
bfloat16, so interpreted runs use float32 or float16.
"""

from __future__ import annotations

import functools

import torch

# The interpreter's cost is per program and per K step, not per element: 32 x 32 x 32
# tiles run a 128-token MLP forward and backward in 0.08 s against 0.31 s with 16 x 16 x 16
# (2 CPU cores), and the tests' ragged shapes still cover every partial tile and K tail.
INTERPRETED_TILE = 32


def reference_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """The plain math: down(leaky_relu(x W_up^T, slope)^2); slope 0 is relu^2."""
    h = torch.nn.functional.leaky_relu(x @ w_up.t(), slope)
    return h.square() @ w_down.t()


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """`reference_mlp` with the fused kernels: x (..., D), w_up (H, D), w_down (D, H).
    Under autocast everything runs in the autocast dtype, as the plain linears would."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x2 = x.reshape(-1, x.size(-1)).to(dtype)
    with torch.autocast(device, enabled=False):
        y = _FusedMLP.apply(x2, w_up.to(dtype), w_down.to(dtype), float(slope))
    return y.view(*x.shape[:-1], w_down.size(0))


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
        h, a = torch.ops.pgolf.mlp_up_act(x, w_up, slope)
        ctx.save_for_backward(x, w_up, w_down, h, a)
        ctx.slope = slope
        return a @ w_down.t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_up, w_down, h, a = ctx.saved_tensors
        dh = torch.ops.pgolf.mlp_act_grad(dy, w_down, h, ctx.slope)
        return dh @ w_up, dh.t() @ x, dy.t() @ a, None


@torch.library.custom_op("pgolf::mlp_up_act", mutates_args=())
def mlp_up_act(x: torch.Tensor, w_up: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, a): h = x W_up^T and a = leaky_relu(h, slope)^2, both (M, H), from one matmul."""
    h = x.new_empty(x.size(0), w_up.size(0))
    a = torch.empty_like(h)
    # B = W_up^T: element (k, n) of B is w_up[n, k]
    _launch(x, w_up, w_up.stride(1), w_up.stride(0), h, a, slope, backward=False)
    return h, a


@mlp_up_act.register_fake
def _(x, w_up, slope):
    h = x.new_empty(x.size(0), w_up.size(0))
    return h, torch.empty_like(h)


@torch.library.custom_op("pgolf::mlp_act_grad", mutates_args=())
def mlp_act_grad(dy: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    """dh = (dy W_down) * act'(h), (M, H): the gradient at the up-projection's output."""
    dh = torch.empty_like(h)
    _launch(dy, w_down, w_down.stride(0), w_down.stride(1), h, dh, slope, backward=True)
    return dh


@mlp_act_grad.register_fake
def _(dy, w_down, h, slope):
    return torch.empty_like(h)


def _launch(a: torch.Tensor, b: torch.Tensor, stride_bk: int, stride_bn: int, h: torch.Tensor,
            out: torch.Tensor, slope: float, backward: bool) -> None:
    """C = A B with A (M, K) and B (K, N) given by its strides, then the epilogue: forward
    writes h = C and out = act(C); backward reads h and writes out = C * act'(h). h and
    out are fresh contiguous (M, N) tensors. CPU tensors run interpreted."""
    import triton

    interpreted = a.device.type == "cpu"
    kernel = _kernel(interpreted)
    M, K = a.shape
    N = h.size(1)
    args = (a, b, h, out, M, N, K, a.stride(0), a.stride(1), stride_bk, stride_bn)
    meta = dict(SLOPE=slope, BACKWARD=backward)
    if interpreted:  # no autotuning in the interpreter: one tile, INTERPRETED_TILE square
        meta.update(BLOCK_M=INTERPRETED_TILE, BLOCK_N=INTERPRETED_TILE, BLOCK_K=INTERPRETED_TILE, GROUP_M=2)
    kernel[lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)](*args, **meta)


def _configs():
    """Tiles for the record's shapes on an H100 (M = 98,304 tokens, K = 512, N = 2,048):
    the usual bf16 choices for Hopper's wgmma; autotuned once per shape."""
    import triton

    tiles = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8),
             (64, 256, 64, 4, 4), (128, 256, 32, 4, 8), (128, 64, 64, 4, 4),
             (128, 256, 128, 2, 8), (128, 128, 128, 3, 8)]  # K = 512: 4 steps of 128
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in tiles]


@functools.cache
def _kernel(interpreted: bool):
    """The Triton kernel, compiled and autotuned, or run by Triton's interpreter (which
    reads its source at each call); built on first use, so importing this module does
    not import triton."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def matmul_act(a_ptr, b_ptr, h_ptr, out_ptr, M, N, K: tl.constexpr, stride_am, stride_ak, stride_bk,
                   stride_bn, SLOPE: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # tile order: GROUP_M row tiles sweep the columns together, so A's rows stay in L2
        pid = tl.program_id(0)
        # builtins only (no tl.cdiv, tl.zeros: those are jit functions, which the interpreter
        # and the compiler each take only in the mode triton was first imported in)
        tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        a_rows, b_cols = rm[:, None] < M, rn[None, :] < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k in range(0, K, BLOCK_K):
            if K % BLOCK_K == 0:
                a = tl.load(a_ptrs, mask=a_rows, other=0.0)
                b = tl.load(b_ptrs, mask=b_cols, other=0.0)
            else:
                a = tl.load(a_ptrs, mask=a_rows & ((k + rk)[None, :] < K), other=0.0)
                b = tl.load(b_ptrs, mask=b_cols & ((k + rk)[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
        inside = a_rows & b_cols
        c = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the rounded matmul output, as cuBLAS gives it
        if BACKWARD:
            h = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            slope_h = tl.where(h > 0, h, SLOPE * SLOPE * h)  # d/dh leaky_relu(h)^2 = 2h, or 2 s^2 h below 0
            tl.store(out_ptr + offsets, (2.0 * c * slope_h).to(out_ptr.dtype.element_ty), mask=inside)
        else:
            tl.store(h_ptr + offsets, c.to(h_ptr.dtype.element_ty), mask=inside)
            act = tl.where(c > 0, c, SLOPE * c)
            tl.store(out_ptr + offsets, (act * act).to(out_ptr.dtype.element_ty), mask=inside)

    if interpreted:
        return InterpretedFunction(matmul_act)
    return triton.autotune(configs=_configs(), key=["M", "N", "K", "BACKWARD"])(JITFunction(matmul_act))
