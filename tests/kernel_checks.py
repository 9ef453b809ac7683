"""What the tests of our Triton kernels (pgolf_core.fused_mlp, pgolf_core.fused_ce) share:
compiling them for an H100 on a CPU-only machine (ptxas, shipped with Triton, checks
registers and spills), and comparing a model's training step with and without them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

from pgolf_core.model import GPT

H100_SHARED_MEMORY = 232_448  # bytes of shared memory one block may use on sm_90


def compile_for_h100(fn, args: dict, meta: dict, config):
    """Compile the jit function `fn` ahead of time for sm_90 as Triton's JIT would
    specialise it for these launch arguments: pointers and integers divisible by 16 get
    that hint, and integers equal to 1 become constants. Triton internals, pinned by the
    dev extra's triton==3.6.0: this fails loudly if they move."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {**meta, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args.get(name)
        if name in constants or value == 1:
            signature[name] = "constexpr"
            constants.setdefault(name, value)
        else:
            signature[name] = value if isinstance(value, str) else "i32"
            if isinstance(value, str) or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def ptxas_report(kernel, workdir: Path) -> dict:
    """registers and spill_bytes of a compiled kernel, from ptxas -v for sm_90a."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptx = workdir / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))
            + int(re.search(r"(\d+) bytes spill loads", report).group(1))}



def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of `x` against `ref`, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def losses_and_grads(model: GPT, idx, targets):
    """Mean training loss and every parameter's gradient, by name (compiled or not)."""
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets).mean()
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def model_without_zero_weights(cfg) -> GPT:
    """A seeded model whose zero-initialised output projections are made random, so that no
    gradient is zero in the comparisons."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2 and not weight.any():
                weight.normal_(std=0.1)
    return model
