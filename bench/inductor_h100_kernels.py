"""Benchmark (CPU, no GPU needed): the Triton kernels Inductor generates for a profile's
training step on an H100, and what ptxas makes of them.

Inductor writes CUDA code without running it, so this script lets it compile the step
for a pretend H100 (sm_90, 132 SMs): dynamo and AOT autograd trace the model on the CPU
as usual, and every forward and backward graph is then re-targeted to fake CUDA tensors
and lowered by Inductor's Triton backend. Nothing executes. For each graph it reports
what Inductor's scheduler counts (kernels, bytes per token, the library calls), and it
compiles every Triton kernel for sm_90 with each of its autotuning configurations, as
the GPU would: registers, spill bytes and shared memory from ptxas, which Triton ships.

What it is for: finding the kernels that cannot run at memory speed before a GPU
session does. The first run found Inductor's mix-order reductions in the record's
backward (a norm's backward fused with the per-channel weight gradients) at 255
registers, up to 948 bytes of spills per thread and about 180 KB of shared memory
(`train.compile_mix_order_reduction`, bench/NOTES.md).

Floors: each configuration's machine code (cuobjdump, which Triton ships) gives the
instructions and MUFU operations (exp2, reciprocal, ...) a thread executes, on the
shortest path through its branches and the longest, loops over a row counted row /
R0_BLOCK times. A launch can then run no faster than its bytes (Inductor's estimate) at
3.0 TB/s, its warp instructions at 4 per SM per clock, or its MUFU operations at 16
lanes per SM per clock (1.98 GHz, 132 SMs): its floor is the largest of the three. The
JSON sums the floors per graph and per step and names the kernels whose instructions,
not their bytes, set the floor. A model, not a measurement: it ignores occupancy, tails
and latency, and cannot see what spilling costs.

Limits: the kernels are those of this machine's torch (2.13), not the GPU machine's
(2.11), and their names differ (here RMSNorm appears decomposed, as
`..._div_expand_..._pow_...`, where the GPU's profiler says `_fused_rms_norm`). The
attention call is the CPU's SDPA op, a library call either way. It patches torch and
Triton internals (pinned by the dev extra): a moved internal fails loudly.

    python bench/inductor_h100_kernels.py --profile profiles/record_8xh100.yaml   # about 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf_core import config, fused_ce, fused_mlp  # noqa: E402
from pgolf_core import model as model_module  # noqa: E402
from pgolf_core.loss import softcap_nll  # noqa: E402
from pgolf_core.model import GPT  # noqa: E402
from pgolf_core.train import configure_inductor, model_config  # noqa: E402

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", gcnArchName="sm_90", major=9, minor=0, multi_processor_count=132,
    regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
    total_memory=80 * 2**30, shared_memory_per_block_optin=232_448, L2_cache_size=50 * 2**20)
CUDA = torch.device("cuda", 0)
GRAPHS = ("forward", "backward")
# The floor model: a kernel can run no faster than its bytes at this memory bandwidth (the
# one bench/NOTES.md uses), its warp instructions at 4 per SM per clock, or its MUFU
# operations (exp2, reciprocal, ...: 16 lanes per SM per clock) at the H100 SXM's boost clock.
CLOCK_HZ, MEMORY_BYTES_PER_S = 1.98e9, 3.0e12
ISSUE_PER_SM_CLOCK, MUFU_PER_SM_CLOCK = 4.0, 16 / 32  # warp instructions
TILED_GRIDS = ("Grid1D", "Grid2D", "Grid2DWithYZOverflow", "Grid3D")  # one program per block of each axis


TRITON_BIN = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump


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


class _BothGraphsCompiled(Exception):
    """Raised once the backward graph is compiled: nothing is meant to run."""


@contextlib.contextmanager
def pretend_h100():
    """Make this CPU-only torch generate (not run) Inductor's CUDA code for an H100."""
    from torch._dynamo import device_interface
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor.fx_passes import misc_patterns, reinplace
    from torch._inductor.runtime import triton_helpers
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    cuda_interface = device_interface.CudaInterface
    init_misc_patterns = misc_patterns._misc_patterns_init
    aten = torch.ops.aten
    patches = [
        # the device Inductor asks about
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: H100),
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (9, 0)),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(cuda_interface, "get_device_properties", staticmethod(lambda device=None: H100)),
        mock.patch.object(cuda_interface, "get_compute_capability", staticmethod(lambda device=None: 90)),
        mock.patch.object(cuda_interface, "is_available", staticmethod(lambda: True)),
        mock.patch.dict(device_interface.caching_worker_current_devices, {"cuda": 0}),
        mock.patch.dict(device_interface.caching_worker_device_properties, {"cuda": [H100]}),
        mock.patch("torch.utils._triton.triton_backend", lambda: make_backend(GPUTarget("cuda", 90, 32))),
        mock.patch.object(compile_fx_module, "_check_triton_bf16_support", lambda graph: None),
        mock.patch.object(torch._C, "_cuda_getCurrentRawStream", lambda *args: 0, create=True),
        mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None),
        # pattern tracing would run real CUDA ops: trace the (device-agnostic) patterns on the CPU
        mock.patch.object(misc_patterns, "_misc_patterns_init", lambda input_device=None: init_misc_patterns(torch.device("cpu"))),
        # ops whose fake-tensor path reaches a CUDA device guard, which this build lacks
        mock.patch.dict(torch._decomp.decomposition_table,
                        {aten._unsafe_masked_index_put_accumulate.default: _masked_index_put_accumulate}),
        mock.patch.object(reinplace, "_inplace_generalized_scatter", lambda inp, src, view_ops: inp),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _masked_index_put_accumulate(x, mask, indices, values):
    """The embedding backward's scatter, as torch decomposes it, without masked_fill(Scalar)."""
    indices = [None if i is None else i.clamp(min=-x.size(d), max=x.size(d) - 1) for d, i in enumerate(indices)]
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return torch.ops.aten._unsafe_index_put(x, indices, masked, accumulate=True)


def _on_cuda(value, fake_mode):
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, torch.Tensor):
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return FakeTensor(fake_mode, meta, CUDA)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cuda(v, fake_mode) for v in value)
    return value


def _retargeted(gm: torch.fx.GraphModule, fake_mode) -> torch.fx.GraphModule:
    """A copy of an AOT graph whose every value and factory call is on the (fake) GPU."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["val"] = _on_cuda(node.meta["val"], fake_mode)
        device = node.kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            node.kwargs = {**node.kwargs, "device": CUDA}
    gm.recompile()
    return gm


def compile_step(model: GPT, rows: int, seq_len: int, collector: KernelBytes) -> dict:
    """Inductor's H100 code for one training step (forward + loss + backward) of `model`:
    per graph, the wrapper source, the kernel sources and the scheduler's byte count."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    graphs: dict[str, dict] = {}

    def inner_compile(gm, example_inputs, **kwargs):
        name = "backward" if kwargs.get("is_backward") else "forward"
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        kernels = {}
        # kernels are collected, not compiled here: `hopper_resources` compiles them for sm_90
        with fake_mode, mock.patch("torch._inductor.async_compile.AsyncCompile.triton",
                                   lambda self, kname, source, device_str="cuda": kernels.setdefault(kname, source)), \
                mock.patch("torch._inductor.async_compile.AsyncCompile.wait", lambda self, scope: None):
            compiled = compile_fx_inner(_retargeted(gm, fake_mode), [_on_cuda(i, fake_mode) for i in example_inputs],
                                        **kwargs)
        graphs[name] = {"wrapper": compiled.source_code, "kernels": kernels, "scheduled": collector.graphs[-1]}
        if name == "backward":
            raise _BothGraphsCompiled
        return torch._functorch.aot_autograd.make_boxed_func(gm.forward)

    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=inner_compile))
    x = torch.randint(0, model.cfg.vocab_size, (rows, seq_len))
    with pretend_h100(), functorch_config.patch(force_non_lazy_backward_lowering=True), _kernel_bytes_in_metadata(), \
            torch._inductor.config.patch(compile_threads=1), torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            step(x, torch.roll(x, -1, 1)).mean()
        except Exception as error:  # dynamo wraps what the backend raises
            if not any(isinstance(e, _BothGraphsCompiled) for e in _causes(error)):
                raise
    if set(graphs) != set(GRAPHS):
        raise RuntimeError(f"expected a forward and a backward graph, Inductor compiled {sorted(graphs)}")
    return graphs


def _kernel_bytes_in_metadata():
    """Inductor's estimate of each kernel's bytes (the arguments it reads and writes) in its
    metadata, as `benchmark_kernel` would put it there without changing the code."""
    from torch._inductor.codegen.triton import TritonKernel

    meta = TritonKernel.inductor_meta_per_kernel

    def with_bytes(self):
        return {**meta(self), "kernel_num_gb": self.estimate_kernel_num_bytes() / 1e9}
    return mock.patch.object(TritonKernel, "inductor_meta_per_kernel", with_bytes)


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def hopper_resources(name: str, source: str, workdir: Path) -> list[dict]:
    """Compile one Inductor kernel for sm_90 with each of its autotuning configurations:
    registers, spill bytes and shared memory per configuration (ptxas -v), and the floor
    of a launch with that configuration (`launch_floor_ms`)."""
    from torch._inductor.runtime import triton_heuristics

    captured = []

    def capture(size_hints, configs, triton_meta, heuristic_type, filename=None, inductor_meta=None, **kwargs):
        return lambda fn: captured.append((fn, configs, triton_meta, inductor_meta)) or fn

    path = workdir / f"{name}.py"
    path.write_text(source)
    with pretend_h100(), mock.patch.object(triton_heuristics, "cached_autotune", capture):
        exec(compile(source, str(path), "exec"), {"__file__": str(path), "__name__": name})
    (fn, configs, meta, inductor_meta), = captured
    numels = {axis: int(n) for axis, n in re.findall(r"^\s*(\w+)numel = (\d+)$", source, flags=re.M)}
    attrs = meta["configs"][0] if meta.get("configs") else {}
    results = []
    for cfg in configs:
        kernel = compile_sm90(fn, meta["signature"], meta.get("constants", {}), attrs, cfg)
        usage = ptxas_usage(kernel, workdir)
        results.append({"config": {**cfg.kwargs, "num_warps": cfg.num_warps}, "registers": usage["registers"],
                        "spill_bytes": usage["spill_stores"], "shared_bytes": kernel.metadata.shared,
                        "floor_ms": launch_floor_ms(kernel, cfg, numels, inductor_meta, workdir)})
    return results


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


def floors(nbytes: float, warp_instructions: tuple | None, warp_mufu: tuple | None) -> dict:
    """ms bounded by memory, issue and MUFU on the shortest and the longest path, and the
    floor (the largest bound) of each path; memory alone where the instructions are unknown."""
    memory = nbytes / MEMORY_BYTES_PER_S * 1e3
    if warp_instructions is None:
        return {"memory": round(memory, 4), "issue": None, "mufu": None, "floor": [round(memory, 4)] * 2,
                "per_element": None}
    issue = [w / (H100.multi_processor_count * ISSUE_PER_SM_CLOCK * CLOCK_HZ) * 1e3 for w in warp_instructions]
    mufu = [w / (H100.multi_processor_count * MUFU_PER_SM_CLOCK * CLOCK_HZ) * 1e3 for w in warp_mufu]
    return {"memory": round(memory, 4), "issue": [round(x, 4) for x in issue], "mufu": [round(x, 4) for x in mufu],
            "floor": [round(max(memory, i, m), 4) for i, m in zip(issue, mufu)]}


def launch_floor_ms(kernel, cfg, numels: dict, inductor_meta: dict, workdir: Path) -> dict:
    """`machine_floor` of one launch of an Inductor kernel: its programs tile x (y, z), its
    loops over r0 run r0_numel / R0_BLOCK times. Memory alone for other grids."""
    nbytes = inductor_meta["kernel_num_gb"] * 1e9
    if inductor_meta.get("grid_type") not in TILED_GRIDS or not set(numels) <= {"x", "y", "z", "r0_"}:
        return floors(nbytes, None, None)
    row = numels.get("r0_", 1)
    programs = math.prod(math.ceil(n / cfg.kwargs.get(f"{axis.upper()}BLOCK", 1)) for axis, n in numels.items()
                         if axis != "r0_")
    return machine_floor(kernel, workdir, nbytes, programs, cfg.num_warps,
                         trips=math.ceil(row / cfg.kwargs.get("R0_BLOCK", row)), elements=math.prod(numels.values()))


def machine_floor(kernel, workdir: Path, nbytes: float, programs: int, num_warps: int, trips: int,
                  elements: int) -> dict:
    """`floors` of a launch of `programs` programs of a compiled kernel over `elements`
    elements, from its machine code, with instructions and MUFU operations per element."""
    counts = path_counts(sass(kernel.asm["cubin"], workdir), trips)
    if counts is None:
        return floors(nbytes, None, None)
    warps = programs * num_warps
    out = floors(nbytes, [warps * n for n in counts["instructions"]], [warps * n for n in counts["mufu"]])
    out["per_element"] = {k: [round(warps * 32 * n / elements, 2) for n in v] for k, v in counts.items()}
    return out


def graph_report(compiled: dict, tokens: int, workdir: Path) -> dict:
    launches = collections.Counter(re.findall(r"^\s*(triton_\w+)\.run\(", compiled["wrapper"], flags=re.M))
    per_kind = collections.Counter()
    for kind, nbytes, _ in compiled["scheduled"]:
        per_kind[kind] += nbytes
    kernels = []
    for name, source in compiled["kernels"].items():
        configs = hopper_resources(name, source, workdir)
        best = min(configs, key=lambda c: c["floor_ms"]["floor"][0])  # autotuning's pick, if the model held
        kernels.append({"name": name, "launches": launches[name], "mix_order": "RSPLIT_SIZE" in source,
                        "max_registers": max(c["registers"] for c in configs),
                        "min_spill_bytes": min(c["spill_bytes"] for c in configs), "floor_ms": best["floor_ms"],
                        "configs": configs})
    spilling = sorted((k for k in kernels if k["min_spill_bytes"]), key=lambda k: -k["min_spill_bytes"])

    def total(part) -> float:
        return round(sum(k["launches"] * part(k["floor_ms"]) for k in kernels), 2)

    def excess(k) -> float:  # ms per graph above the kernel's memory floor, on the shortest path
        return k["launches"] * (k["floor_ms"]["floor"][0] - k["floor_ms"]["memory"])

    over_memory = sorted((k for k in kernels if excess(k) > 0), key=excess, reverse=True)
    return {
        "fused_bytes_per_token": round(per_kind["fused"] / tokens),
        "extern_bytes_per_token": round(per_kind["extern"] / tokens),
        "kernels": len(kernels),
        "launches": sum(launches.values()),
        "mix_order_kernels": sum(k["mix_order"] for k in kernels),
        # autotuning picks among a kernel's configurations: only a spill in every one of them is certain
        "kernels_with_a_spilling_config": sum(any(c["spill_bytes"] for c in k["configs"]) for k in kernels),
        # more than half an SM's shared memory in every configuration: one block (of 2-8 warps) per SM
        "kernels_one_block_per_sm": sum(min(c["shared_bytes"] for c in k["configs"]) > H100.shared_memory_per_block_optin // 2
                                        for k in kernels),
        "kernels_spilling_in_every_config": spilling,
        # per micro-batch, summed over launches: memory alone, and the floor on each path
        "floor_ms": {"memory": total(lambda f: f["memory"]), "shortest_path": total(lambda f: f["floor"][0]),
                     "longest_path": total(lambda f: f["floor"][1])},
        "kernels_without_an_instruction_count": [k["name"] for k in kernels if k["floor_ms"]["issue"] is None],
        # where the graph's floor goes: the targets of the next fusion
        "largest_kernels": [{"name": k["name"], "launches": k["launches"],
                             "floor_ms": round(k["launches"] * k["floor_ms"]["floor"][0], 3)}
                            for k in sorted(kernels, key=lambda k: -k["launches"] * k["floor_ms"]["floor"][0])[:12]],
        "kernels_over_their_memory_floor": [
            {"name": k["name"], "launches": k["launches"], "floor_ms": k["floor_ms"], "excess_ms": round(excess(k), 3),
             "bound_by": "issue" if k["floor_ms"]["issue"][0] >= k["floor_ms"]["mufu"][0] else "mufu"}
            for k in over_memory[:10]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train key, e.g. --set compile_mix_order_reduction=false")
    parser.add_argument("--rows", type=int, default=0, help="sequences per micro-batch (default: the profile's)")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the profile's")
    parser.add_argument("--states", nargs="+", choices=("unlooped", "looped"), default=None,
                        help="loop states to compile (default: both if the profile loops)")
    parser.add_argument("--loss", choices=("fused", "plain"), default="fused",
                        help="the training loss: loss.fused_softcap_nll (the trainer's) or the plain composition")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.loss == "plain":  # what the trainer ran at c5166ca, the one GPU measurement to compare with
        model_module.fused_softcap_nll = softcap_nll

    overrides = config.read_profile(args.profile)
    cfg = config.build_section("train", {**overrides.get("train", {}), **config.parse_assignments(args.set)})
    vocab = config.build_section("tokenize", overrides.get("tokenize", {})).vocab_size
    rows, seq_len = args.rows or cfg.micro_batch_seqs, args.seq_len or cfg.seq_len
    states = args.states or (["unlooped", "looped"] if cfg.num_loops else ["unlooped"])
    configure_inductor(cfg)
    # the Triton MLP and loss, traced on the CPU as on the GPU: their kernels are library calls to Inductor either way
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        fused_mlp.use_fused_mlp(cfg.fused_mlp)
        fused_ce.use_fused_ce(cfg.fused_ce)
    torch.manual_seed(0)
    model = GPT(model_config(cfg, vocab))
    result = {
        "device": "none: Inductor's CUDA code for an H100 (sm_90), generated and compiled on the CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "overrides": args.set,
        "config": {"profile": args.profile, "rows": rows, "seq_len": seq_len, "torch": torch.__version__,
                   "mix_order_reduction": cfg.compile_mix_order_reduction, "fused_mlp": cfg.fused_mlp,
                   "fused_ce": cfg.fused_ce, "loss": args.loss},
        "floor_model": {"memory_bytes_per_s": MEMORY_BYTES_PER_S, "clock_hz": CLOCK_HZ, "sms": H100.multi_processor_count,
                        "issue_warp_instructions_per_sm_clock": ISSUE_PER_SM_CLOCK,
                        "mufu_warp_instructions_per_sm_clock": MUFU_PER_SM_CLOCK},
    }
    micro_batches = cfg.batch_tokens // (rows * seq_len)
    collector = KernelBytes()
    with tempfile.TemporaryDirectory() as workdir:
        for state in states:
            model.looping = state == "looped"
            compiled = compile_step(model, rows, seq_len, collector)
            result[state] = {name: graph_report(compiled[name], rows * seq_len, Path(workdir)) for name in GRAPHS}
    # Inductor's kernels of one optimizer step's forwards and backwards (no matmuls, attention or optimizer)
    result["floor_ms_per_step"] = {state: {part: round(micro_batches * sum(result[state][g]["floor_ms"][part] for g in GRAPHS), 1)
                                           for part in ("memory", "shortest_path", "longest_path")} for state in states}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
