"""Compiling our Triton kernels for an H100 on a CPU, and reading what comes out.

The kernel tests (test_fused_mlp.py, test_fused_ce.py) cannot run the kernels on a GPU
here, but Triton compiles them ahead of time for sm_90 with the ptxas and cuobjdump it
ships: that is how a CPU machine learns that a tile spills, uses too much shared memory,
or takes a slow path (tanh from libdevice) before a GPU session does. The helpers lean
on Triton internals, pinned by the dev extra (triton==3.6): a moved internal fails loudly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

TRITON_BIN = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump


def compile_sm90(fn, signature: dict, constants: dict, attrs: dict, config):
    """A jit function compiled ahead of time for sm_90 with one autotuning configuration,
    whose kwargs join `constants` (Triton internals, pinned by the dev extra: this fails
    loudly if they move)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {**constants, **config.kwargs}
    signature = {name: "constexpr" if name in constants else kind for name, kind in signature.items()}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_for_h100(fn, args: dict, constants: dict, config):
    """`compile_sm90` as Triton's JIT would specialise `fn` for these launch arguments
    (a type string for pointers, the value for integers): pointers and integers divisible
    by 16 get that hint, and integers equal to 1 become constants."""
    constants = dict(constants)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args.get(name)
        if name in constants or name in config.kwargs or value == 1:
            signature[name] = "constexpr"
            constants.setdefault(name, value)
        else:
            signature[name] = value if isinstance(value, str) else "i32"
            if isinstance(value, str) or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_sm90(fn, signature, constants, attrs, config)


def ptxas_usage(kernel, workdir: Path) -> dict:
    """Registers and spill bytes (stores, loads) per thread of a compiled kernel (ptxas -v)."""
    ptx = workdir / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([str(TRITON_BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_stores": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "spill_loads": int(re.search(r"(\d+) bytes spill loads", report).group(1))}


def sass(cubin: bytes, workdir: Path) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) of each machine instruction (cuobjdump)."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    listing = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                             check=True).stdout
    return [(int(addr, 16), bool(pred), op, rest.strip()) for addr, pred, op, rest in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", listing)]


def path_counts(code: list[tuple[int, bool, str, str]], trips: int) -> dict | None:
    """Instructions and MUFU operations one thread executes, on the shortest and the longest
    path through the kernel's branches (a warp whose lanes agree, one that diverges), with
    each loop (a back edge) run `trips` times; None for nested loops."""
    index = {addr: i for i, (addr, *_) in enumerate(code)}
    target = [int(rest.split()[0], 16) if op == "BRA" else None for _, _, op, rest in code]
    end = next(i for i, (addr, *_) in enumerate(code) if target[i] == addr)  # the final branch to itself: padding
    times = [1] * end
    for i in range(end):
        if target[i] is not None and target[i] < code[i][0]:  # a loop's back edge
            body = range(index[target[i]], i + 1)
            if any(times[j] > 1 for j in body):
                return None
            for j in body:
                times[j] = trips
    is_mufu = [op.startswith("MUFU") for _, _, op, _ in code[:end]]
    skipped = set()  # what the shortest path leaves out
    for i in range(end):
        if target[i] is None or target[i] < code[i][0] or not code[i][1]:
            continue  # not a forward conditional branch (an else-jump is handled with its branch)
        t = index[target[i]]
        before = t - 1  # an if/else: the then-block ends with an unconditional jump over the else-block
        if target[before] is not None and not code[before][1] and target[before] > target[i]:
            then_block, else_block = range(i + 1, t), range(t, index[target[before]])
            skipped.update(max(then_block, else_block, key=lambda b: sum(times[j] for j in b)))
        else:
            skipped.update(range(i + 1, t))
    longest = sum(times), sum(n for n, m in zip(times, is_mufu) if m)
    left_out = sum(times[j] for j in skipped), sum(times[j] for j in skipped if is_mufu[j])
    return {"instructions": (longest[0] - left_out[0], longest[0]), "mufu": (longest[1] - left_out[1], longest[1])}
