"""Benchmark (CPU, no GPU needed): the loss kernels of one record micro-batch on an H100,
three ways, read in their machine code.

The head and loss (rms_norm -> tied bf16 head -> soft cap -> per-token NLL, forward and
backward) at B=48, T=2048, D=512, V=8192, as Inductor compiles it for sm_90 with
`loss.softcap_nll` (plain) and `loss.fused_softcap_nll` (fused), and the two Triton
kernels of `fused_ce` (triton). For each kernel over the logits and each configuration
its autotuner may pick, ptxas and cuobjdump (both ship with Triton) give registers,
spills and the SASS; from the SASS come instructions and special-function (MUFU:
exp2, reciprocal, ...) operations per logit, on the shortest path through the kernel's
branches (a warp whose lanes agree) and on the longest (a warp that diverges: libdevice's
tanh has two paths). Each kernel's time is then bounded on an H100 by memory (its bytes at
3.0 TB/s), instruction issue (132 SMs x 4 warp instructions per clock at 1.98 GHz) or
the MUFU units (16 lanes per SM per clock); the largest bound is its floor.

Loops over a row run row / block times (nested loops are not counted). Floors are
estimates, not measurements:
`bench/step_parts.py` times the three on a GPU.

    python bench/loss_kernels_h100.py      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.graph_traffic import KernelBytes  # noqa: E402
from bench.inductor_h100_kernels import compile_step, pretend_h100  # noqa: E402
from pgolf_core import fused_ce  # noqa: E402
from pgolf_core.loss import fused_softcap_nll, softcap_nll  # noqa: E402

B, T, D, V, CAP = 48, 2048, 512, 8192, 30.0
H100_SMS, CLOCK_HZ, MEMORY_BYTES_PER_S = 132, 1.98e9, 3.0e12
ISSUE_PER_SM_CLOCK, MUFU_PER_SM_CLOCK = 4.0, 16 / 32  # warp instructions per SM per clock
TRITON_BIN = None  # set in main: ptxas and cuobjdump


class Head(torch.nn.Module):
    """The record's output head and loss, for `compile_step` (which calls model(x, y))."""

    def __init__(self, loss_fn):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.cfg = types.SimpleNamespace(vocab_size=V)
        self.loss_fn = loss_fn

    def forward(self, idx, targets):
        logits = F.linear(F.rms_norm(self.embed(idx), (D,)), self.embed.weight)
        return self.loss_fn(logits, targets, CAP)


def sass(cubin: bytes, workdir: Path) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) of each instruction, from cuobjdump."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    listing = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                             check=True).stdout
    return [(int(addr, 16), bool(pred), op, rest.strip()) for addr, pred, op, rest in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", listing)]


def path_counts(code: list[tuple[int, bool, str, str]], trips: int) -> dict | None:
    """Instructions and MUFU operations a thread executes, on the shortest and the longest
    path through the kernel's branches, with each loop (a back edge; none nested) run
    `trips` times; None for nested loops."""
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


def floors(bytes_per_launch: float, logits: int, per_logit: dict, side: int) -> dict:
    """ms per launch bounded by memory, issue and MUFU (side 0: shortest path, 1: longest)."""
    issue_rate = H100_SMS * ISSUE_PER_SM_CLOCK * CLOCK_HZ * 32  # thread instructions per second
    mufu_rate = H100_SMS * MUFU_PER_SM_CLOCK * CLOCK_HZ * 32
    out = {"memory": bytes_per_launch / MEMORY_BYTES_PER_S * 1e3,
           "issue": logits * per_logit["instructions"][side] / issue_rate * 1e3,
           "mufu": logits * per_logit["mufu"][side] / mufu_rate * 1e3}
    return {k: round(v, 3) for k, v in out.items()}


def analyse(name: str, compiled_configs, elements_per_thread, trips, bytes_per_launch: float, workdir: Path) -> dict:
    """One kernel: per configuration, resources and counts per logit; and the floor of the
    configuration the autotuner would pick if it picked the lowest floor."""
    logits = B * T * V
    rows = []
    for config, kernel in compiled_configs:
        ptx = workdir / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(TRITON_BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        row = {"config": {**config.kwargs, "num_warps": config.num_warps},
               "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
               "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))}
        counts = path_counts(sass(kernel.asm["cubin"], workdir), trips(config))
        if counts is None:
            row["counted"] = False
        else:
            per_thread = elements_per_thread(config)
            per_logit = {k: tuple(round(c / per_thread, 2) for c in v) for k, v in counts.items()}
            row.update(counted=True, per_logit=per_logit,
                       floors_ms={"shortest_path": floors(bytes_per_launch, logits, per_logit, 0),
                                  "longest_path": floors(bytes_per_launch, logits, per_logit, 1)})
        rows.append(row)
    counted = [r for r in rows if r["counted"]]
    best = min(counted, key=lambda r: max(r["floors_ms"]["shortest_path"].values()))
    return {"name": name, "bytes_per_launch": round(bytes_per_launch), "configs": rows,
            "floor_ms": {side: max(best["floors_ms"][side].values()) for side in ("shortest_path", "longest_path")},
            "bound_by": max(best["floors_ms"]["shortest_path"], key=best["floors_ms"]["shortest_path"].get),
            "best_config": best["config"]}


def compile_configs(fn, configs, signature: dict, constants: dict, attrs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for config in configs:
        consts = {**constants, **config.kwargs}
        sig = {k: ("constexpr" if k in consts else v) for k, v in signature.items()}
        yield config, triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def inductor_kernels(loss_fn, workdir: Path) -> list[dict]:
    """Inductor's kernels over the logits (those whose reduction or elements span V)."""
    from torch._inductor.runtime import triton_heuristics

    torch._inductor.config.benchmark_kernel = True  # puts each kernel's bytes in its metadata
    graphs = compile_step(Head(loss_fn), B, T, KernelBytes())
    results = []
    for graph in ("forward", "backward"):
        for name, source in graphs[graph]["kernels"].items():
            captured = []

            def capture(size_hints, configs, triton_meta, heuristic_type, filename=None, inductor_meta=None, **kw):
                return lambda fn: captured.append((fn, configs, triton_meta, inductor_meta)) or fn

            path = workdir / f"{name}.py"
            path.write_text(source)
            with pretend_h100(), mock.patch.object(triton_heuristics, "cached_autotune", capture):
                exec(compile(source, str(path), "exec"), {"__file__": str(path), "__name__": name})
            (fn, configs, meta, inductor_meta), = captured
            numels = {k: int(v) for k, v in re.findall(r"^\s*(x|r0_)numel = (\d+)$", source, flags=re.M)}
            if numels.get("r0_", 1) * numels.get("x", 1) < B * T * V:
                continue  # the norm, the weight cast and the embedding gradient: not the loss
            attrs = meta["configs"][0] if meta.get("configs") else {}

            def per_thread(config, row=numels.get("r0_", 1)):  # a program takes whole rows
                return config.kwargs.get("XBLOCK", 1) * row / (32 * config.num_warps)

            def trips(config, row=numels.get("r0_", 1)):  # of the loops over a row
                return math.ceil(row / config.kwargs.get("R0_BLOCK", row))

            compiled = compile_configs(fn, configs, meta["signature"], meta.get("constants", {}), attrs)
            results.append({"graph": graph, **analyse(name, compiled, per_thread, trips,
                                                      inductor_meta["kernel_num_gb"] * 1e9, workdir)})
    return results


def triton_kernels(workdir: Path) -> list[dict]:
    """fused_ce's two kernels, with the arguments the record's launch gives them."""
    rows = B * T
    meta = dict(V=V, CAP=CAP, INV_CAP=1 / CAP, LOG2E=math.log2(math.e))
    forward, backward = fused_ce._kernels(False)
    launches = {
        "forward": (forward, dict(logits_ptr="*bf16", targets_ptr="*i64", nll_ptr="*fp32", lse_ptr="*fp32",
                                  stride_row="i32"), rows * V * 2 + rows * 16),
        "backward": (backward, dict(grad_ptr="*bf16", logits_ptr="*bf16", targets_ptr="*i64", lse_ptr="*fp32",
                                    grad_nll_ptr="*fp32", stride_row="i32"), rows * V * 4 + rows * 16),
    }
    results = []
    for graph, (tuner, pointer_args, nbytes) in launches.items():
        signature = {name: pointer_args.get(name, "constexpr") for name in tuner.fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(tuner.fn.arg_names) if name in pointer_args}
        compiled = compile_configs(tuner.fn, tuner.configs, signature, meta, attrs)
        chunk = (lambda c: V) if graph == "forward" else (lambda c: c.kwargs["BLOCK_V"])  # a program's logits
        results.append({"graph": graph, **analyse(tuner.fn.__name__, compiled, lambda c: chunk(c) / (32 * c.num_warps),
                                                  lambda c: math.ceil(chunk(c) / c.kwargs["BLOCK_V"]), nbytes, workdir)})
    return results


def main() -> None:
    global TRITON_BIN
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss_kernels_h100.json"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile the Triton kernels for real
    import triton

    TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, loss_fn in (("plain", softcap_nll), ("fused", fused_softcap_nll)):
            variants[name] = inductor_kernels(loss_fn, workdir)
        variants["triton"] = triton_kernels(workdir)
    result = {
        "device": "none: sm_90 machine code compiled on the CPU; floors are estimates for an H100",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"B": B, "T": T, "D": D, "V": V},
        "h100_model": {"sms": H100_SMS, "clock_hz": CLOCK_HZ, "memory_bytes_per_s": MEMORY_BYTES_PER_S,
                       "issue_warp_instructions_per_sm_clock": ISSUE_PER_SM_CLOCK,
                       "mufu_warp_instructions_per_sm_clock": MUFU_PER_SM_CLOCK},
        "floor_ms_per_micro_batch": {name: {side: round(sum(k["floor_ms"][side] for k in kernels), 3)
                                            for side in ("shortest_path", "longest_path")}
                                     for name, kernels in variants.items()},
        "variants": variants,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, kernels in variants.items():
        for k in kernels:
            floor = k["floor_ms"]
            print(f"{name:7s} {k['graph']:9s} floor {floor['shortest_path']:6.3f}-{floor['longest_path']:6.3f} ms, "
                  f"bound by {k['bound_by']:6s} {k['best_config']}  {k['name'][:70]}")
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}))


if __name__ == "__main__":
    main()
