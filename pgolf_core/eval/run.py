"""Runs the configured evaluation modes, each from a fresh read of the artifact, and
times each as the budget counts it (`budget`).

Each mode starts from the artifact's weights: test-time training changes the model, and
a later mode must not score with a model an earlier one trained. Reading the artifact
again per mode is also what `eval_seconds_<mode>` must include, and so is compiling it
(`evaluate.compile`: each mode compiles from empty caches, in memory and on disk, as a
run of that mode alone on a fresh machine would: `graphs.cold_compile`). The warm-up
runs each forward and backward the mode's loop runs, so that every graph exists before
the loop's timer starts, on random tokens and with no optimizer step (the weights stay
the artifact's), never on validation tokens: a warm-up on validation data would be
training on it before scoring (#1530 was questioned for that).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pgolf_core import dist
from pgolf_core.bpb import bits_per_byte
from pgolf_core.config import EvaluateConfig
from pgolf_core.eval import budget
from pgolf_core.eval.lora import ttt_lora, ttt_phased, warm_up_adapters
from pgolf_core.eval.sliding import Ledger, ScoreSums, score_windows, tail_select
from pgolf_core.eval.ttt import ModeResult, leading_block_params, ttt_sgd, varying_length, without_gradients
from pgolf_core.graphs import cold_compile, compiled_graphs

TTT_MODES = {"ttt_sgd": ttt_sgd, "ttt_lora": ttt_lora, "ttt_phased": ttt_phased}
WARMUP_SEED = 1234


def truncated(cfg: EvaluateConfig, tokens: np.ndarray, byte_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records' target set when `truncate_to_seq_len`: whole sequences plus one token."""
    if not cfg.truncate_to_seq_len:
        return tokens, byte_counts
    end = (len(tokens) - 1) // cfg.seq_len * cfg.seq_len + 1
    return tokens[:end], byte_counts[:end]


def score_mode(mode: str, model, tokens: np.ndarray, byte_counts: np.ndarray, cfg: EvaluateConfig, *, device,
               autocast_dtype: torch.dtype | None = None, ledger: Ledger | None = None,
               progress: bool = False) -> ModeResult:
    """One mode's sums over every target of `tokens` (all ranks reduced). `model` is changed
    by the TTT modes."""
    if mode in TTT_MODES:
        return TTT_MODES[mode](model, tokens, byte_counts, cfg, device=device, autocast_dtype=autocast_dtype,
                               ledger=ledger, progress=progress)
    stride = {"nonoverlap": cfg.seq_len, "sliding": cfg.stride}[mode]
    sums = score_windows(model, tokens, byte_counts, window=cfg.seq_len, stride=stride, batch_seqs=cfg.batch_seqs,
                         device=device, rank=dist.rank(), world_size=dist.world_size(), autocast_dtype=autocast_dtype,
                         progress=progress, ledger=ledger)
    total = ScoreSums.from_tensor(dist.all_reduce_sum(sums.as_tensor(device)).cpu())
    return ModeResult(total, 1)


def prepare(model, mode: str, cfg: EvaluateConfig, device, autocast_dtype, *,
            progress: bool = False) -> dict[str, float]:
    """Make a freshly read model ready for `mode`'s loop: compiled when `evaluate.compile`
    says so (static shapes but for the window length the TTT loops mark as varying), then
    warmed up when `evaluate.warmup` says so; returns `warm_up`'s seconds per kind of call
    (empty without a warm-up). With `progress` it says what it does and how long each
    part took: compiling the record's TTT graphs takes minutes with no other output."""
    if cfg.compile:  # inside `cold_compile`: this mode pays for all of its graphs
        model.compile(backend=cfg.compile_backend)
    if not cfg.warmup:
        return {}
    start, graphs_before = time.perf_counter(), compiled_graphs()
    if progress:
        compiling = f", compiling ({cfg.compile_backend})" if cfg.compile else ""
        print(f"evaluate: {mode}: warm-up on random tokens{compiling}", flush=True)
    seconds = warm_up(model, mode, cfg, device, autocast_dtype)
    if progress:
        built = f", {compiled_graphs() - graphs_before} graph(s) built" if cfg.compile else ""
        parts = ", ".join(f"{call} {s:.1f} s" for call, s in seconds.items())
        print(f"evaluate: {mode}: warm-up done in {time.perf_counter() - start:.1f} s ({parts}){built}", flush=True)
    return seconds


def warm_up(model, mode: str, cfg: EvaluateConfig, device, autocast_dtype) -> dict[str, float]:
    """Each call the mode's loop makes, at the loop's batch shapes on random tokens:
    scoring forwards without gradient (with a stride below the window, also the one whose
    head sees only the scored tail), the full-model SGD step's forward and backward
    (`ttt_sgd`, and `ttt_phased` unless `evaluate.compile_phases` is off and its phases run
    eager), the adapters' forward and backward (`ttt_lora`, `ttt_phased`); the loops keep their row counts fixed and mark the window length
    dynamic, so these are every graph they need. Gradients are dropped and nothing
    steps: the weights are untouched. Returns the seconds of each kind of call
    (`scoring`, `sgd_step`, `adapters`; compiled, mostly its graph's compile), which says
    what each graph costs the budget: `ttt_phased`'s SGD step trains on a few percent of
    the tokens its adapters see."""
    gen = torch.Generator().manual_seed(WARMUP_SEED)
    seconds: dict[str, float] = {}

    def random_tokens(rows: int) -> torch.Tensor:
        return torch.randint(0, model.cfg.vocab_size, (rows, cfg.seq_len + 1), generator=gen).to(device)

    @contextlib.contextmanager
    def timed(call: str):
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[call] = time.perf_counter() - start

    was_training = model.training
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if mode in ("nonoverlap", "sliding", "ttt_sgd"):
            model.eval()
            with timed("scoring"), torch.no_grad():
                idx = random_tokens(cfg.batch_seqs)[:, :-1]
                model(idx)
                if mode != "nonoverlap" and cfg.stride < cfg.seq_len:  # the windows that score a tail only
                    model(idx, select=tail_select(cfg.seq_len, cfg.stride, idx.size(0), device))
        if mode == "ttt_sgd" or (mode == "ttt_phased" and cfg.compile_phases):  # eager phases need no graph
            model.train()
            idx = random_tokens(math.ceil(cfg.ttt_batch_seqs / dist.world_size()))
            # frozen as the SGD step freezes them: which weights take gradients is part of its graph
            with timed("sgd_step"), without_gradients(leading_block_params(model, cfg.ttt_freeze_blocks)):
                model(varying_length(idx[:, :-1]), varying_length(idx[:, 1:])).float().mean().backward()
            model.zero_grad(set_to_none=True)
        if mode in ("ttt_lora", "ttt_phased"):
            model.eval()
            with timed("adapters"):
                warm_up_adapters(model, cfg, device, random_tokens(cfg.lora_batch_docs))
    model.train(was_training)
    return seconds


@dataclass(frozen=True)
class TimedMode:
    """One mode's run as `timed_mode` made it: its sums, its timing as the budget counts it,
    and the parts `bench.eval_speed` reports (the read within the setup, the warm-up per
    kind of call, graphs built inside the timed loop: 0 when the warm-up covered every
    shape)."""
    result: ModeResult
    timing: budget.ModeTiming
    load_seconds: float
    warmup_seconds_by_call: dict[str, float]
    graphs_compiled_in_loop: int


def timed_mode(mode: str, cfg: EvaluateConfig, load_model: Callable[[], torch.nn.Module], tokens: np.ndarray,
               byte_counts: np.ndarray, device, autocast_dtype, progress: bool) -> TimedMode:
    """One mode from a fresh read of the artifact: read, compiled cold, warmed up and
    scored. `evaluate` and `bench.eval_speed` both time a mode through it, so the
    benchmark's figures are the budget's."""
    with cold_compile(cfg.compile):
        start = time.perf_counter()
        model = load_model()
        loaded = time.perf_counter()
        warmup_by_call = prepare(model, mode, cfg, device, autocast_dtype, progress=progress)
        loop_start, graphs_before = time.perf_counter(), compiled_graphs()
        result = score_mode(mode, model, tokens, byte_counts, cfg, device=device, autocast_dtype=autocast_dtype,
                            progress=progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        graphs_in_loop = compiled_graphs() - graphs_before
    if cfg.compile and graphs_in_loop:
        print(f"WARNING: evaluate: {mode}: torch.compile built {graphs_in_loop} graph(s) "
              "inside the timed loop (a shape or state the warm-up did not cover)", flush=True)
    timing = budget.ModeTiming(loop_start - start, end - loop_start, dist.world_size(), result.syncs,
                               result.sums.num_targets, result.balance)
    return TimedMode(result, timing, loaded - start, warmup_by_call, graphs_in_loop)


def evaluate(cfg: EvaluateConfig, load_model: Callable[[], torch.nn.Module], val_tokens: np.ndarray,
             val_bytes: np.ndarray, device, *, progress: bool = False) -> dict:
    """metrics/eval.json's figures for every mode of `cfg.modes` (DESIGN.md's names).
    `load_model()` reads the artifact and returns its model on `device`."""
    tokens, byte_counts = truncated(cfg, val_tokens, val_bytes)
    autocast = dist.autocast_dtype(device)
    metrics, timings = {}, {}
    for mode in cfg.modes:
        run = timed_mode(mode, cfg, load_model, tokens, byte_counts, device, autocast, progress)
        result, timings[mode] = run.result, run.timing
        total = result.sums
        metrics[f"val_bpb_{mode}"] = bits_per_byte(total.nll_nats, total.num_bytes)
        metrics[f"eval_seconds_{mode}"] = timings[mode].eval_seconds
        metrics[f"projected_8xh100_seconds_{mode}"] = budget.project_8xh100(timings[mode], cfg.sync_seconds)
        metrics["tokens_scored"] = total.num_targets
        if progress:
            print(f"evaluate: {mode} val_bpb {metrics[f'val_bpb_{mode}']:.4f} over {total.num_targets:,} targets / "
                  f"{total.num_bytes:,} bytes in {timings[mode].eval_seconds:.1f} s "
                  f"(loop {timings[mode].loop_seconds:.1f} s; 8xH100 projection "
                  f"{metrics[f'projected_8xh100_seconds_{mode}']:.0f} s, balance {result.balance:.3f})")
    final = cfg.final_mode
    metrics["eval_seconds_all_modes"] = sum(t.eval_seconds for t in timings.values())  # diagnostic modes included
    return {"val_bpb": metrics[f"val_bpb_{final}"], "final_mode": final, **metrics,
            "eval_seconds": timings[final].eval_seconds,  # what the budget counts: the final mode alone
            "eval_seconds_timed_as_records": timings[final].loop_seconds,
            "projected_8xh100_seconds": metrics[f"projected_8xh100_seconds_{final}"],
            "projection_model": budget.PROJECTION_MODEL}
