"""Benchmark (CPU, no GPU needed): memory traffic of the compiled training step, as
Inductor's scheduler counts it.

Outside the matmuls and attention, the record step is bound by memory bandwidth (about
half of the H100 step time, bench/NOTES.md). This script compiles forward + backward of a
profile's model with Inductor on the CPU (bf16 autocast, the trainer's loss) and sums the
bytes every scheduled kernel reads and writes, per loop state. Compiled at two batch
sizes, each kernel's bytes are split into a per-token part and a fixed part (weights
cast, gradients). `fused` is Inductor's own kernels (norms, residual mixes, rotary,
gates, activation, loss); `extern` is the library calls (matmuls, attention).

A proxy, not a GPU measurement: the CPU backend fuses somewhat differently from the
Triton one. Use it to compare model-code variants (bytes per token before and after)
without a GPU, and to project the elementwise floor of a step:
per-token bytes x batch_tokens / HBM bandwidth.

With `--set fused_mlp=true` the MLP runs the fused kernels' custom ops, which Inductor
counts as library calls reading their inputs and writing their outputs, as the Triton
kernels do; torch ops compute their results here (Triton's interpreter is far too slow
at this size).

    python bench/graph_traffic.py --profile profiles/record_8xh100.yaml     # about 7 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf_core import config, fused_mlp  # noqa: E402
from pgolf_core import model as model_module  # noqa: E402
from pgolf_core.loss import softcap_nll  # noqa: E402
from pgolf_core.model import GPT  # noqa: E402
from pgolf_core.train import model_config  # noqa: E402

HBM_BYTES_PER_SECOND = 3.0e12  # what a streaming kernel reaches on an H100 SXM (3.35e12 peak)
GRAPHS = ("forward", "backward")


class KernelBytes:
    """Collects (kind, bytes, fx origins) of every scheduled kernel of each graph Inductor
    compiles. Hooks the scheduler's byte count (torch internals: fails loudly if they move)."""

    def __init__(self):
        from torch._inductor import compile_fx, graph

        torch._inductor.config.force_disable_caches = True  # a cached graph is never scheduled, so never counted
        self.graphs: list[list[tuple[str, int, str]]] = []
        count_bytes = graph.GraphLowering.count_bytes
        collector = self

        def counting(lowering):
            collector.graphs.append([self._row(node) for node in lowering.scheduler.nodes])
            return count_bytes(lowering)

        graph.GraphLowering.count_bytes = counting
        log = compile_fx.inductor_metrics_log  # count_bytes runs only when this log is on
        log.isEnabledFor = lambda level: True
        log.info = lambda *args, **kwargs: None

    @staticmethod
    def _row(node) -> tuple[str, int, str]:
        extern = type(node).__name__ == "ExternKernelSchedulerNode"
        origins = sorted({str(o.target).replace("aten.", "").replace(".default", "")
                          for n in node.get_nodes() if n.node is not None for o in n.node.origins})
        return ("extern" if extern else "fused", node.get_read_write_buffers_sizes(), " ".join(origins))


def _kernels_in_torch(a, b, stride_bk, stride_bn, h, out, slope, backward) -> None:
    """What `fused_mlp._launch` computes, in torch ops: same inputs, same outputs."""
    c = a @ torch.as_strided(b, (a.size(1), h.size(1)), (stride_bk, stride_bn))
    if backward:
        out.copy_(c * torch.where(h > 0, 2 * h, 2 * slope**2 * h))
    else:
        h.copy_(c)
        out.copy_(F.leaky_relu(c, slope).square())


def compiled_step_bytes(model: GPT, looping: bool, rows: int, seq_len: int, vocab: int,
                        collector: KernelBytes) -> list[list[tuple[str, int, str]]]:
    """Compile and run one forward + backward; returns the kernels of its two graphs."""
    torch._dynamo.reset()
    collector.graphs.clear()
    model.looping = looping
    step = torch.compile(model, fullgraph=True)
    x = torch.randint(0, vocab, (rows, seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(x, torch.roll(x, -1, 1)).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    if len(collector.graphs) != len(GRAPHS):
        raise RuntimeError(f"expected a forward and a backward graph, Inductor compiled {len(collector.graphs)}")
    return [list(g) for g in collector.graphs]


def _same_kernels(small: list, large: list) -> bool:
    """Whether two compilations scheduled the same kernels in the same order: same kind,
    and origins in common (a fused kernel's full origin set can differ with the size)."""
    return len(small) == len(large) and all(
        a[0] == b[0] and set(a[2].split()) & set(b[2].split()) for a, b in zip(small, large))


def per_token_split(small, large, tokens: tuple[int, int], top: int) -> dict:
    """Per-token and fixed bytes of each graph from the same kernels at two token counts."""
    result = {}
    for name, kernels_small, kernels_large in zip(GRAPHS, small, large):
        if not _same_kernels(kernels_small, kernels_large):
            raise RuntimeError(f"{name} graph differs between batch sizes: cannot pair its kernels")
        per_kind, fixed, groups, counts = collections.Counter(), 0.0, collections.Counter(), collections.Counter()
        for (kind, bytes_small, origins), (_, bytes_large, _) in zip(kernels_small, kernels_large):
            per_token = (bytes_large - bytes_small) / (tokens[1] - tokens[0])
            fixed += bytes_small - per_token * tokens[0]
            per_kind[kind] += per_token
            key = f"{kind}: {' '.join(origins.split()[:6])}"
            groups[key] += per_token
            counts[key] += 1
        result[name] = {
            "fused_bytes_per_token": round(per_kind["fused"]),
            "extern_bytes_per_token": round(per_kind["extern"]),
            "fixed_mbytes": round(fixed / 1e6, 1),
            "kernels": len(kernels_small),
            "top_fused": [{"bytes_per_token": round(b), "kernels": counts[k], "origins": k[len("fused: "):]}
                          for k, b in groups.most_common() if k.startswith("fused")][:top],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--seq-len", type=int, default=512, help="short rows keep CPU compilation quick")
    parser.add_argument("--rows", type=int, nargs=2, default=(2, 8), help="the two batch sizes of the fit")
    parser.add_argument("--loss", choices=("fused", "plain"), default="fused")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train key of the profile, e.g. --set low_precision_residual=true")
    parser.add_argument("--top", type=int, default=8, help="fused kernel groups listed per graph")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    if args.loss == "plain":
        model_module.fused_softcap_nll = softcap_nll
    cfg = config.build_section("train", {**overrides.get("train", {}), **config.parse_assignments(args.set)})
    vocab = config.build_section("tokenize", overrides.get("tokenize", {})).vocab_size
    if cfg.fused_mlp:  # the custom ops on CPU tensors, computed by torch (see the docstring)
        os.environ["TRITON_INTERPRET"] = "1"
        fused_mlp.use_fused_mlp(True)
        fused_mlp._launch = _kernels_in_torch
    torch.manual_seed(0)
    model = GPT(model_config(cfg, vocab))
    collector = KernelBytes()
    tokens = tuple(rows * args.seq_len for rows in args.rows)
    states = {}
    for looping in ([False, True] if cfg.num_loops else [False]):
        small, large = (compiled_step_bytes(model, looping, rows, args.seq_len, vocab, collector) for rows in args.rows)
        split = per_token_split(small, large, tokens, args.top)
        fused = sum(split[g]["fused_bytes_per_token"] for g in GRAPHS)
        states["looped" if looping else "unlooped"] = {
            "fused_bytes_per_token": fused,
            "extern_bytes_per_token": sum(split[g]["extern_bytes_per_token"] for g in GRAPHS),
            "fused_ms_per_step_at_hbm": round(1000 * fused * cfg.batch_tokens / HBM_BYTES_PER_SECOND, 1),
            **split,
        }
    result = {
        "device": "cpu (Inductor C++ backend: a proxy for the Triton kernels)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "loss": args.loss,
        "overrides": args.set,
        "hbm_bytes_per_second": HBM_BYTES_PER_SECOND,
        "config": {"profile": args.profile, "seq_len": args.seq_len, "rows": list(args.rows),
                   "batch_tokens": cfg.batch_tokens, "torch": torch.__version__},
        **states,
    }
    if "looped" in states:
        result["looped_over_unlooped_fused_bytes"] = round(
            states["looped"]["fused_bytes_per_token"] / states["unlooped"]["fused_bytes_per_token"], 3)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
