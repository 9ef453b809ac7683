"""Benchmark: the record MLP's forward + backward, plain against the fused Triton kernels.

At one record micro-batch (M = 48 x 2,048 tokens, D = 512, hidden 2,048, bf16 autocast,
LeakyReLU(0.5)^2), times forward + backward of the MLP compiled two ways: the plain
composition (cuBLAS matmuls and Inductor's elementwise kernels) and `fused_mlp`
(pgolf_core/fused_mlp.py). Also times each Triton kernel against the cuBLAS matmul it
replaces (same shape, no epilogue), which says whether a loss is the matmul or the
epilogue. Both paths are checked against a float64 reference on the same inputs.

The record step runs 8 micro-batches of 11 MLP passes (17 looped), so the step saving is
about 88 (136) times the per-pass saving; `predicted_step_saving_ms` states that.

    python -m bench.fused_mlp                                  # H100: times, errors, JSON
    python -m bench.fused_mlp --device cpu --check-only        # CPU: the checks, interpreted
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.header import RESULTS, header
from bench.timing import median_ms
from pgolf_core import fused_mlp

SLOPE = 0.5
PASSES_PER_STEP = {"unlooped": 8 * 11, "looped": 8 * 17}


def plain_mlp(x, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(x, w_up), SLOPE).square(), w_down)


def fused(x, w_up, w_down):
    return fused_mlp.fused_mlp(x, w_up, w_down, SLOPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48 * 2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-only", action="store_true", help="only the correctness checks (CPU: interpreted)")
    parser.add_argument("--out", default=str(RESULTS / "fused_mlp.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # Triton runs on the CPU only interpreted, and without bfloat16
        os.environ["TRITON_INTERPRET"] = "1"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    M, D, H = args.tokens, args.dim, args.hidden

    torch.manual_seed(0)
    x = torch.randn(M, D, device=device, requires_grad=True)
    w_up = (torch.randn(H, D, device=device) / D**0.5).requires_grad_()
    w_down = (torch.randn(D, H, device=device) / H**0.5).requires_grad_()
    grad_out = torch.randn(M, D, device=device)
    inputs = (x, w_up, w_down)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = fused_mlp.reference_mlp(*ref_inputs, SLOPE)
    y_ref.backward(grad_out.double())
    reference = [y_ref.detach(), *(t.grad for t in ref_inputs)]

    def step(fn):
        for t in inputs:
            t.grad = None
        with torch.autocast(device.type, dtype=dtype):
            y = fn(*inputs)
        y.backward(grad_out.to(y.dtype))
        return y.detach()

    compile_ = (lambda fn: torch.compile(fn)) if device.type == "cuda" else (lambda fn: fn)
    rows = {}
    for name, fn in (("plain", compile_(plain_mlp)), ("fused", compile_(fused))):
        outputs = [step(fn), *(t.grad for t in inputs)]
        rows[name] = {f"rel_error_{n}": float(f"{((t.double() - r).norm() / r.norm()).item():.2e}")
                      for n, t, r in zip(("y", "grad_x", "grad_w_up", "grad_w_down"), outputs, reference)}
        if args.check_only:
            continue
        for _ in range(3):
            step(fn)
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(lambda fn=fn: step(fn), args.repeats)
        rows[name].update(ms_fwd_bwd=round(ms, 3), tflops=round(12 * M * D * H / ms / 1e9, 1),
                          peak_mem_mib=round(torch.cuda.max_memory_allocated() / 2**20))
    result = {**header(device.type),
              "shape": {"tokens": M, "dim": D, "hidden": H}, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "paths": rows}
    if not args.check_only:
        result["kernels"] = kernel_times(x.detach().to(dtype), w_up.detach().to(dtype), w_down.detach().to(dtype),
                                         grad_out.to(dtype), args.repeats)
        saving = rows["plain"]["ms_fwd_bwd"] - rows["fused"]["ms_fwd_bwd"]
        result["predicted_step_saving_ms"] = {state: round(n * saving, 1) for state, n in PASSES_PER_STEP.items()}
    for name, row in rows.items():
        print(f"{name:8s} {row}")
    print(json.dumps(result))  # last line: the result
    if not args.check_only:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def kernel_times(x, w_up, w_down, dy, repeats: int) -> dict:
    """Each Triton kernel against the bare cuBLAS matmul of its shape, and the tile the
    autotuner chose for it."""
    h, _ = torch.ops.pgolf.mlp_up_act(x, w_up, SLOPE)
    M, D, H = x.size(0), x.size(1), w_up.size(0)
    flops = 2 * M * D * H
    pairs = {"up_act": (lambda: torch.ops.pgolf.mlp_up_act(x, w_up, SLOPE), lambda: x @ w_up.t()),
             "act_grad": (lambda: torch.ops.pgolf.mlp_act_grad(dy, w_down, h, SLOPE), lambda: dy @ w_down)}
    rows = {}
    for name, (triton_fn, cublas_fn) in pairs.items():
        for fn in (triton_fn, cublas_fn):
            fn()
        triton_ms, cublas_ms = median_ms(triton_fn, repeats), median_ms(cublas_fn, repeats)
        rows[name] = {"triton_ms": round(triton_ms, 3), "cublas_matmul_only_ms": round(cublas_ms, 3),
                      "triton_tflops": round(flops / triton_ms / 1e9, 1), "cublas_tflops": round(flops / cublas_ms / 1e9, 1)}
    tuner = fused_mlp._kernel(False)
    rows["chosen_tiles"] = {str(key): str(config) for key, config in tuner.cache.items()}
    return rows


if __name__ == "__main__":
    main()
