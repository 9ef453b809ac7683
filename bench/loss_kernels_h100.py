"""Benchmark (CPU, no GPU needed): the loss kernels of one record micro-batch on an H100,
three ways, read in their machine code.

The head and loss (rms_norm -> tied bf16 head -> soft cap -> per-token NLL, forward and
backward) at B=48, T=2048, D=512, V=8192, as Inductor compiles it for sm_90 with
`loss.softcap_nll` (plain) and `loss.fused_softcap_nll` (fused), and the two Triton
kernels of `fused_ce` (triton). Each kernel over the logits is compiled with each
configuration its autotuner may pick and read in SASS by bench/inductor_h100_kernels.py's
floor model: instructions and special-function (MUFU: exp2, reciprocal) operations per
logit, on the shortest path through the branches (a warp whose lanes agree) and the
longest (one that diverges: libdevice's tanh has two paths), and the floor of a launch,
the largest of its memory, issue and MUFU bounds. The configuration with the lowest floor
stands for the kernel.

Floors are estimates, not measurements: `bench/step_parts.py` times the three on a GPU.

    python bench/loss_kernels_h100.py      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.inductor_h100_kernels import (GRAPHS, KernelBytes, compile_for_h100, compile_step,  # noqa: E402
                                         hopper_resources, machine_floor)
from pgolf_core import fused_ce  # noqa: E402
from pgolf_core.loss import fused_softcap_nll, softcap_nll  # noqa: E402

B, T, D, V, CAP = 48, 2048, 512, 8192, 30.0


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


def best(configs: list[dict]) -> dict:
    """The configuration autotuning would pick if the floor model held, with every config."""
    pick = min(configs, key=lambda c: c["floor_ms"]["floor"][0])
    bounds = {"memory": pick["floor_ms"]["memory"], "issue": pick["floor_ms"]["issue"][0],
              "mufu": pick["floor_ms"]["mufu"][0]}
    return {"floor_ms": pick["floor_ms"]["floor"], "bound_by": max(bounds, key=bounds.get),
            "per_logit": pick["floor_ms"]["per_element"], "best_config": pick["config"], "configs": configs}


def inductor_kernels(loss_fn, workdir: Path) -> list[dict]:
    """Inductor's kernels over the logits (those with B*T*V elements), as compiled for the step."""
    graphs = compile_step(Head(loss_fn), B, T, KernelBytes())
    results = []
    for graph in GRAPHS:
        for name, source in graphs[graph]["kernels"].items():
            if math.prod(int(n) for n in re.findall(r"^\s*\w+numel = (\d+)$", source, flags=re.M)) < B * T * V:
                continue  # the norm, the weight cast and the embedding gradient: not the loss
            results.append({"graph": graph, "name": name, **best(hopper_resources(name, source, workdir))})
    return results


def triton_kernels(workdir: Path) -> list[dict]:
    """fused_ce's two kernels, compiled as the record's launch specialises them."""
    rows = B * T
    constants = dict(V=V, CAP=CAP, INV_CAP=1 / CAP, LOG2E=math.log2(math.e))
    forward, backward = fused_ce._kernels(False)
    args = {"forward": dict(logits_ptr="*bf16", targets_ptr="*i64", nll_ptr="*fp32", lse_ptr="*fp32", stride_row=V),
            "backward": dict(grad_ptr="*bf16", logits_ptr="*bf16", targets_ptr="*i64", lse_ptr="*fp32",
                             grad_nll_ptr="*fp32", stride_row=V)}
    nbytes = {"forward": rows * V * 2 + rows * 16, "backward": rows * V * 4 + rows * 16}  # + targets, lse, nll
    results = []
    for graph, tuner in (("forward", forward), ("backward", backward)):
        configs = []
        for config in tuner.configs:
            kernel = compile_for_h100(tuner.fn, args[graph], constants, config)
            chunk = V if graph == "forward" else config.kwargs["BLOCK_V"]  # a program's logits
            programs = rows * (1 if graph == "forward" else math.ceil(V / chunk))
            configs.append({"config": {**config.kwargs, "num_warps": config.num_warps},
                            "floor_ms": machine_floor(kernel, workdir, nbytes[graph], programs, config.num_warps,
                                                      trips=math.ceil(chunk / config.kwargs["BLOCK_V"]),
                                                      elements=rows * V)})
        results.append({"graph": graph, "name": tuner.fn.__name__, **best(configs)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss_kernels_h100.json"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile the Triton kernels for real
    import triton

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
        "floor_model": "as bench/inductor_h100_kernels.py's (floors, machine_floor)",
        "floor_ms_per_micro_batch": {name: {side: round(sum(k["floor_ms"][i] for k in kernels), 3)
                                            for i, side in enumerate(("shortest_path", "longest_path"))}
                                     for name, kernels in variants.items()},
        "variants": variants,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, kernels in variants.items():
        for k in kernels:
            floor = k["floor_ms"]
            print(f"{name:7s} {k['graph']:9s} floor {floor[0]:6.3f}-{floor[1]:6.3f} ms, "
                  f"bound by {k['bound_by']:6s} {k['best_config']}  {k['name'][:70]}")
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}))


if __name__ == "__main__":
    main()
