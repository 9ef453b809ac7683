"""Benchmark: training throughput of a profile's model on this GPU, synthetic tokens.

Builds the model and optimizers exactly as the train stage does (`pgolf_core.train`),
compiles it, warms up both loop states (so neither recompiles while timed), then times
full optimizer steps of the profile's global batch with the recurrence off and on. It
sets no process-wide switch the trainer does not (float32 matmuls keep PyTorch's default
precision, no TF32, as in training): an A/B is a train key of the profile, `--set KEY=VALUE`.

FLOPs per token (stated, for MFU): 6 * (matmul weights on the token's path, counting a
looped layer once per pass, plus the d x V output head) + 6 * L_virtual * T * d for
causal attention (QK^T and AV, forward + backward, half the square). MFU = that x
tokens/s / peak dense bf16 (989e12 on H100 SXM and H200).

`tokens_per_second_run_average` is the rate of a whole run of the profile's schedule, the
loop switching on at `loop_start_frac`: the figure the reference's "715 K averaged over a
run with looping on for its second half" is (issue #4; `--profile
profiles/pr1477_8xh100.yaml` measures that system itself).

    python -m bench.train_throughput --profile profiles/record_8xh100.yaml
    python -m bench.train_throughput --profile profiles/cpu.yaml --device cpu --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.header import RESULTS, header
from pgolf_core import config
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT, layer_sequence
from pgolf_core.optim import build_optimizers
from pgolf_core.graphs import compiled_graphs
from pgolf_core.train import compile_model, train_step

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def flops_per_token(model: GPT, looping: bool, seq_len: int) -> float:
    cfg = model.cfg
    encoder, decoder = layer_sequence(cfg, looping)
    per_layer = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.blocks]
    path = sum(per_layer[i] for i in encoder + decoder) + cfg.model_dim * cfg.vocab_size
    attention = (len(encoder) + len(decoder)) * seq_len * cfg.model_dim
    return 6.0 * path + 6.0 * attention


def run_average(unlooped: float, looped: float, loop_start_frac: float, schedule: str) -> float:
    """Tokens/s over a run whose loop switches on at `loop_start_frac` of it. Of the wall
    clock ("wallclock" schedule): each rate holds for its share of the time, a
    time-weighted mean. Of the steps ("steps"): each for its share of the tokens, a
    harmonic mean."""
    f = min(max(loop_start_frac, 0.0), 1.0)
    if schedule == "wallclock":
        return f * unlooped + (1 - f) * looped
    return 1.0 / (f / unlooped + (1 - f) / looped)


def time_steps(step, steps: int, device) -> float:
    """Seconds per step over `steps` steps (synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def allocator_counts(device) -> dict:
    """Cumulative caching-allocator events: driver allocations/frees and alloc retries (each
    retry frees cached blocks and synchronises)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def write_trace(step, path: Path, steps: int = 2) -> None:
    """Kernel time table (self device time, top 60) of `steps` steps, for finding where a step goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop state")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loop state (compilation)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train key of the profile (A/B runs), e.g. --set runtime.compile_tune_kernels=true")
    parser.add_argument("--doc-len", type=int, default=0,
                        help="mean document length: BOS tokens at that rate (0: uniform random tokens)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"),
                        help="where a GPU run writes its JSON")
    parser.add_argument("--trace", default=None, help="write profiler tables of 2 steps per loop state (NAME_unlooped.txt, NAME_looped.txt)")
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    cfg = config.build_section("train", config.merge_nested(overrides.get("train", {}), config.parse_assignments(args.set)))
    vocab = config.build_section("tokenize", overrides.get("tokenize", {})).vocab_size
    device = torch.device(args.device)
    # --set runtime.flash_attn=false: SDPA; runtime.fused_mlp=true / runtime.fused_ce=true: the Triton MLP / loss
    kernels = resolve_kernels(device, cfg.runtime)
    torch.manual_seed(0)
    model = GPT(cfg.model.with_vocab(vocab), kernels).to(device)
    step_model = model if args.no_compile or not cfg.runtime.compile else compile_model(model, cfg.runtime)
    optimizers = build_optimizers(model, cfg.optimizer, torch.bfloat16 if device.type == "cuda" else torch.float32)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    rows = cfg.batch_tokens // cfg.seq_len
    x = torch.randint(0, vocab, (rows, cfg.seq_len), device=device)
    y = torch.randint(0, vocab, (rows, cfg.seq_len), device=device)
    if args.doc_len:  # documents of geometric length for `doc_mask` (FineWeb's are about a thousand tokens)
        bos = model.cfg.bos_id
        x = torch.where(torch.rand(x.shape, device=device) < 1 / args.doc_len, bos, x)

    def step():
        train_step(step_model, optimizers, x, y, cfg, autocast, looping=looping)

    figures = {}
    for looping in ([False, True] if cfg.model.num_loops else [False]):
        for _ in range(args.warmup):
            step()
    graphs_before_timing = compiled_graphs()
    for looping in ([False, True] if cfg.model.num_loops else [False]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = allocator_counts(device)
        seconds = time_steps(step, args.steps, device)
        figures[looping] = {"seconds": seconds, "tokens_per_second": cfg.batch_tokens / seconds,
                            "flops_per_token": flops_per_token(model, looping, cfg.seq_len),
                            "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
                            # a steady step allocates nothing from the driver; churn here costs syncs
                            "allocator_during_timed_steps": {k: v - before[k] for k, v in allocator_counts(device).items()}}
        if args.trace:  # one table per loop state, to compare where the extra looped time goes
            trace = Path(args.trace)
            write_trace(step, trace.with_name(f"{trace.stem}_{'looped' if looping else 'unlooped'}{trace.suffix}"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    plain, looped = figures[False], figures.get(True, figures[False])
    result = {
        **header(device.type),
        "tokens_per_second": round(plain["tokens_per_second"]),
        "tokens_per_second_looped": round(looped["tokens_per_second"]),
        "tokens_per_second_run_average": round(run_average(
            plain["tokens_per_second"], looped["tokens_per_second"],
            cfg.schedule.loop_start_frac if cfg.model.num_loops else 1.0, cfg.schedule.mode)),
        "ms_per_step": round(1000 * plain["seconds"], 2),
        "ms_per_step_looped": round(1000 * looped["seconds"], 2),
        "mfu": round(plain["flops_per_token"] * plain["tokens_per_second"] / peak, 4) if peak else None,
        "mfu_looped": round(looped["flops_per_token"] * looped["tokens_per_second"] / peak, 4) if peak else None,
        "flops_per_token": plain["flops_per_token"],
        "peak_mem_mib": plain["peak_mem_mib"],
        "peak_mem_mib_looped": looped["peak_mem_mib"],
        "allocator_during_timed_steps": {"unlooped": plain["allocator_during_timed_steps"],
                                         "looped": looped["allocator_during_timed_steps"]},
        **kernels.describe(device, doc_mask=cfg.model.doc_mask, compiled=step_model is not model,
                           cap=cfg.model.logit_softcap),
        "compiled": step_model is not model,
        "graphs_compiled_after_warmup": compiled_graphs() - graphs_before_timing,  # one in a timed step is timed
        "compile_mode": cfg.runtime.compile_mode,
        "compile_tune_kernels": cfg.runtime.compile_tune_kernels,
        "compile_mix_order_reduction": cfg.runtime.compile_mix_order_reduction,
        "overrides": args.set,
        "doc_len": args.doc_len,
        "config": {"profile": args.profile, "batch_tokens": cfg.batch_tokens, "seq_len": cfg.seq_len,
                   "schedule": cfg.schedule.mode, "loop_start_frac": cfg.schedule.loop_start_frac,
                   "virtual_layers_looped": sum(map(len, layer_sequence(model.cfg, True))),
                   "micro_batch_seqs": cfg.micro_batch_seqs, "num_params": sum(p.numel() for p in model.parameters()),
                   "torch": torch.__version__},
    }
    print(json.dumps(result))
    if device.type == "cuda":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
