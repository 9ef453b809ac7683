"""Runs the configured evaluation modes, each from a fresh read of the artifact, and
times each as the budget counts it (`budget`).

Each mode starts from the artifact's weights: test-time training changes the model, and
a later mode must not score with a model an earlier one trained. Reading the artifact
again per mode is also what `eval_seconds_<mode>` must include. The warm-up (one
forward and, for TTT modes, one backward, weights untouched) runs on random tokens,
never on validation tokens: a warm-up on validation data would be training on it
before scoring (#1530 was questioned for that).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from pgolf_core import dist
from pgolf_core.bpb import bits_per_byte
from pgolf_core.config import EvaluateConfig
from pgolf_core.eval import budget
from pgolf_core.eval.lora import ttt_lora, ttt_phased
from pgolf_core.eval.sliding import Ledger, ScoreSums, score_windows
from pgolf_core.eval.ttt import ModeResult, ttt_sgd

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


def warm_up(model, mode: str, cfg: EvaluateConfig, device, autocast_dtype) -> None:
    """One forward (and backward for TTT modes) at the loop's shapes on random tokens;
    gradients are dropped, weights are not touched."""
    gen = torch.Generator().manual_seed(WARMUP_SEED)
    rows = cfg.batch_seqs if mode not in TTT_MODES else min(cfg.ttt_batch_seqs, cfg.batch_seqs)
    idx = torch.randint(0, model.cfg.vocab_size, (rows, cfg.seq_len + 1), generator=gen).to(device)
    train = mode in TTT_MODES
    with torch.set_grad_enabled(train), torch.autocast(device_type=device.type, dtype=autocast_dtype,
                                                        enabled=autocast_dtype is not None):
        nll = model(idx[:, :-1], idx[:, 1:])
    if train:
        nll.float().mean().backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(cfg: EvaluateConfig, load_model: Callable[[], torch.nn.Module], val_tokens: np.ndarray,
             val_bytes: np.ndarray, device, *, progress: bool = False) -> dict:
    """metrics/eval.json's figures for every mode of `cfg.modes` (DESIGN.md's names).
    `load_model()` reads the artifact and returns its model on `device`."""
    tokens, byte_counts = truncated(cfg, val_tokens, val_bytes)
    autocast = dist.autocast_dtype(device)
    metrics, timings = {}, {}
    for mode in cfg.modes:
        start = time.perf_counter()
        model = load_model()
        if cfg.warmup:
            warm_up(model, mode, cfg, device, autocast)
        loop_start = time.perf_counter()
        result = score_mode(mode, model, tokens, byte_counts, cfg, device=device, autocast_dtype=autocast,
                            progress=progress)
        end = time.perf_counter()
        total = result.sums
        timings[mode] = budget.ModeTiming(loop_start - start, end - loop_start, dist.world_size(), result.syncs,
                                          total.num_targets)
        metrics[f"val_bpb_{mode}"] = bits_per_byte(total.nll_nats, total.num_bytes)
        metrics[f"eval_seconds_{mode}"] = timings[mode].eval_seconds
        metrics[f"projected_8xh100_seconds_{mode}"] = budget.project_8xh100(timings[mode], cfg.sync_seconds)
        metrics["tokens_scored"] = total.num_targets
        if progress:
            print(f"evaluate: {mode} val_bpb {metrics[f'val_bpb_{mode}']:.4f} over {total.num_targets:,} targets / "
                  f"{total.num_bytes:,} bytes in {timings[mode].eval_seconds:.1f} s "
                  f"(loop {timings[mode].loop_seconds:.1f} s; 8xH100 projection "
                  f"{metrics[f'projected_8xh100_seconds_{mode}']:.0f} s)")
        del model
    final = cfg.final_mode
    metrics["eval_seconds"] = sum(t.eval_seconds for t in timings.values())
    return {"val_bpb": metrics[f"val_bpb_{final}"], "final_mode": final, **metrics,
            "eval_seconds_timed_as_records": timings[final].loop_seconds,
            "projected_8xh100_seconds": metrics[f"projected_8xh100_seconds_{final}"],
            "projection_model": budget.PROJECTION_MODEL}
