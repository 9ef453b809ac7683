"""The training loop, the same under one process and under torchrun: `train()` reads top
to bottom, and what it carries is owned by four small parts: `TrainingClock` (timed
seconds, the agreed clock, the cap and the wall-clock schedule's progress, on an injected
time source), `PeriodicValidation`, `SnapshotKeeper` (with `RunState`, what a snapshot
holds) and `RunLog` (progress bar, loss window, the caller's log).

Global batch and results do not depend on the number of processes: every process
advances over the same global span of the stream, reads only its own rows, and accumulates
micro-batches until its share is done; DDP averages the gradients. Timing follows
the speed-record discipline: the clock runs only around training steps (validation is
paused out), CUDA is synchronised before reading it, and with `compile` a few warm-up
steps run first and the model, optimizer and data state are then restored.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pgolf_core import dist
from pgolf_core.config import RuntimeConfig, ScheduleConfig, TrainConfig
from pgolf_core.data import TokenStream
from pgolf_core.eval.sliding import val_bpb
from pgolf_core.graphs import compiled_graphs
from pgolf_core.model import GPT
from pgolf_core.optim import apply_schedule, build_optimizers, lr_multiplier, muon_momentum
from pgolf_core.resume import Snapshot, Snapshots

COMPILE_WARMUP_STEPS = 3


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    tokens_per_second: float  # all processes together
    tokens_per_second_per_gpu: float  # per process: the figure the records quote (e.g. 808 K on 8xH100)
    ms_per_step: float
    val_bpb_prequant: float
    final_train_loss: float
    peak_mem_mib: float
    world_size: int
    seed: int
    stopped_by: str  # "iterations" or "wallclock"
    graphs_compiled_in_run: int  # torch.compile graphs built after the warm-up, inside the timed run (0 expected)
    calib_seconds: float  # GPTQ calibration after training, same launch: counts in the training budget
    train_plus_calib_seconds: float
    within_budget: bool  # train + calibration <= max_wallclock_seconds (true when there is no cap)
    resumed_from_step: int  # the snapshot's step this launch resumed from (0: started fresh)


def run_warnings(cfg: TrainConfig, result: TrainResult) -> list[str]:
    """What makes this run not the one its params describe."""
    warnings = []
    if cfg.schedule.mode == "steps" and result.stopped_by == "wallclock":
        warnings.append(f"the {cfg.schedule.max_wallclock_seconds:.0f} s wall-clock cap stopped a step-scheduled run at step "
                        f"{result.steps} of {cfg.schedule.iterations}: its metrics depend on this machine's speed and load")
    if not result.within_budget:
        warnings.append(f"train + calibration took {result.train_plus_calib_seconds:.1f} s > the "
                        f"{cfg.schedule.max_wallclock_seconds:.0f} s budget: calibration ({result.calib_seconds:.1f} s) "
                        f"overran train.schedule.calib_reserve_seconds={cfg.schedule.calib_reserve_seconds}; raise the reserve "
                        "or lower train.calib_batches")
    if result.graphs_compiled_in_run:
        warnings.append(f"torch.compile built {result.graphs_compiled_in_run} graph(s) inside the timed run "
                        "(a guard the warm-up missed): their compile time counted against the wall clock")
    return warnings


def ema_update(ema: list[torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """One EMA step after an optimizer step (TECHNIQUES.md §3.4): e <- decay * e + (1 - decay) * w
    for every state-dict tensor, kept in float32 whatever the weights' dtype. A function
    of its own so that a test can pin the formula."""
    torch._foreach_lerp_(ema, [v.float() for v in model.state_dict().values()], 1.0 - decay)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class TrainingClock:
    """The clock and the budget of timed training. Seconds run only between `resume()` and
    `pause()` (validation and snapshots are paused out); `agree(step)` syncs the device and
    takes the elapsed time all ranks agree on (their max), from which come the measured
    rate, whether the cap is near (then the clock is checked every step, so training stops
    at most one step late) or reached, and the wall-clock schedule's progress. "Near" leaves
    room for steps twice as slow as the latest ones before the next check: steps slow down
    between checks when the loop switches on (1.5x in the records), and a margin from the
    rate so far let a run pass its cap by more than a step. A resumed clock takes the
    snapshot's mean rate until its first check measures its own. The time source is
    injected: `time.perf_counter` in a run, a hand-driven counter in tests."""

    def __init__(self, schedule: ScheduleConfig, log_every: int, device: torch.device,
                 now: Callable[[], float] = time.perf_counter):
        self.schedule, self.log_every, self.device, self.now = schedule, log_every, device, now
        self.total, self.started = 0.0, None
        self.start_step = self.synced_step = 0
        self.elapsed_at_start = self.synced_elapsed = self.seconds_per_step = 0.0
        self.near_cap = False

    def start(self, step: int, elapsed: float) -> None:
        """Begin (or resume, from a snapshot) at `step` with `elapsed` seconds already trained."""
        self.total, self.start_step, self.synced_step = elapsed, step, step
        self.elapsed_at_start = self.synced_elapsed = elapsed
        self.seconds_per_step = elapsed / step if step else 0.0  # until a check measures this launch's rate
        self._check_near_cap(elapsed, self.seconds_per_step)
        self.resume()

    def resume(self) -> None:
        self.started = self.now()

    def pause(self) -> None:
        self.total, self.started = self.read(), None

    @contextlib.contextmanager
    def paused(self):
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def read(self) -> float:
        """This rank's own seconds so far (not synced: for timing only what it alone ran)."""
        return self.total + (self.now() - self.started if self.started is not None else 0.0)

    def agree(self, step: int) -> float:
        """The elapsed seconds all ranks agree on at `step` (a host sync)."""
        _sync(self.device)
        elapsed = float(dist.all_reduce_max(torch.tensor([self.read()], dtype=torch.float64)).item())
        latest = (elapsed - self.synced_elapsed) / (step - self.synced_step) if step > self.synced_step else 0.0
        self.synced_step, self.synced_elapsed = step, elapsed
        if step > self.start_step:
            self.seconds_per_step = (elapsed - self.elapsed_at_start) / (step - self.start_step)
        self._check_near_cap(elapsed, max(self.seconds_per_step, latest))
        return elapsed

    def _check_near_cap(self, elapsed: float, seconds_per_step: float) -> None:
        cap = self.schedule.max_wallclock_seconds > 0
        self.near_cap = cap and elapsed + 2 * self.log_every * seconds_per_step >= self.schedule.train_seconds_cap

    def over_cap(self) -> bool:
        """Whether the agreed clock has reached the training cap (the cap minus the calibration reserve)."""
        return self.schedule.max_wallclock_seconds > 0 and self.synced_elapsed >= self.schedule.train_seconds_cap

    def progress(self, step: int) -> float:
        """Fraction of training done at `step`: of the steps, or of the wall-clock budget."""
        if self.schedule.mode == "steps":
            return step / self.schedule.iterations
        return wallclock_progress(step, self.synced_step, self.synced_elapsed, self.seconds_per_step,
                                  self.schedule.train_seconds_cap)

    def time(self, work: Callable[[], None]) -> float:
        """Seconds `work` takes on the slowest rank, device synced on both sides."""
        _sync(self.device)
        start = self.now()
        work()
        _sync(self.device)
        return float(dist.all_reduce_max(torch.tensor([self.now() - start], dtype=torch.float64)).item())


class PeriodicValidation:
    """val_bpb of the weights being trained, every `val_every` steps on the first
    `val_tokens` validation tokens (non-overlapping windows of `seq_len`), and of the
    final weights on the whole split."""

    def __init__(self, cfg: TrainConfig, val_tokens: np.ndarray, val_bytes: np.ndarray, device: torch.device,
                 autocast_dtype):
        self.every, self.seq_len, self.batch_seqs = cfg.runtime.val_every, cfg.seq_len, cfg.micro_batch_seqs
        self.tokens, self.bytes, self.device, self.autocast_dtype = val_tokens, val_bytes, device, autocast_dtype
        self.end = cfg.runtime.val_tokens + 1 if cfg.runtime.val_tokens else len(val_tokens)

    def due(self, step: int) -> bool:
        return bool(self.every) and step > 0 and step % self.every == 0

    def score(self, model: GPT, looping: bool | None, whole: bool = False) -> float:
        end = len(self.tokens) if whole else self.end
        bpb, _ = val_bpb(model, self.tokens[:end], self.bytes[:end], window=self.seq_len, stride=self.seq_len,
                         batch_seqs=self.batch_seqs, device=self.device, autocast_dtype=self.autocast_dtype,
                         progress=whole and dist.is_main(), looping=looping)
        return bpb


class RunState:
    """What the loop carries from step to step besides the clock: model, optimizers, data
    position and EMA, and how they are snapshotted and restored."""

    def __init__(self, model: GPT, optimizers: list, stream: TokenStream, ema: list[torch.Tensor] | None):
        self.model, self.optimizers, self.stream, self.ema = model, optimizers, stream, ema

    def snapshot(self, snapshots: Snapshots, step: int, elapsed: float) -> Snapshot:
        return Snapshot(snapshots.fingerprint, step, elapsed, self.stream.state(), self.model.state_dict(),
                        [opt.state_dict() for opt in self.optimizers], self.ema)

    def restore(self, snapshot: Snapshot, device: torch.device) -> None:
        _load_state(self.model, self.optimizers, self.stream, snapshot.model, snapshot.optimizers,
                    snapshot.stream_position)
        if self.ema is not None:
            self.ema = [t.to(device) for t in snapshot.ema]

    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            ema_update(self.ema, self.model, decay)

    def load_ema(self) -> None:
        """Leave the EMA weights in the model: they are what the run saves and scores."""
        if self.ema is not None:
            self.model.load_state_dict(dict(zip(self.model.state_dict().keys(), self.ema)))


class SnapshotKeeper:
    """Resumable snapshots every `snapshot_every` steps (rank 0 writes, all wait, clock paused)."""

    def __init__(self, snapshots: Snapshots | None, every: int, iterations: int):
        self.snapshots, self.every, self.iterations = snapshots, every, iterations
        self.start_step = 0

    def resume(self, state: RunState, device: torch.device) -> tuple[int, float]:
        """(step, elapsed seconds) to start from: a snapshot of this run if one exists, else (0, 0)."""
        step, elapsed = 0, 0.0
        if self.snapshots is not None:
            snapshot, why = self.snapshots.load()
            if dist.is_main():
                print(f"train: {why}")
            if snapshot is not None:
                state.restore(snapshot, device)
                step, elapsed = snapshot.step, snapshot.elapsed
            ranks_agree_on_step(step)
        self.start_step = step
        return step, elapsed

    def due(self, step: int) -> bool:
        return self.snapshots is not None and self.every > 0 and step % self.every == 0 \
            and self.start_step < step < self.iterations

    def save(self, state: RunState, step: int, elapsed: float) -> None:
        if dist.is_main():
            self.snapshots.save(state.snapshot(self.snapshots, step, elapsed))
        dist.barrier()


def report_line(step: int, iterations: int, values: dict) -> str:
    """One report as the records' logs write it: `step:N/M name:value ...` (floats to 4
    decimals); the stage's log file and the shipped script's output share it."""
    shown = " ".join(f"{k}:{v:.4f}" if isinstance(v, float) else f"{k}:{v}" for k, v in values.items())
    return f"step:{step}/{iterations} {shown}"


class RunLog:
    """The progress bar, the window of step losses since the last report, and the
    caller's `log(step, metrics)`. Reading a loss is a host sync, so losses stay on the
    device until a report."""

    def __init__(self, cfg: TrainConfig, log: Callable[[int, dict], None] | None, start_step: int):
        self.cfg, self.log, self.window = cfg, log, []
        self.loss = float("nan")
        self.bar = tqdm(total=cfg.schedule.iterations, initial=start_step, desc="train", unit="step",
                        disable=not dist.is_main())

    def add(self, loss: torch.Tensor) -> None:
        self.window.append(loss.detach())
        self.bar.update(1)

    def report(self, step: int, elapsed: float, progress: float, looping: bool) -> None:
        """The mean loss of the window across ranks, with lr, throughput and loop state."""
        if not self.window:
            return
        loss = float(dist.all_reduce_sum(torch.stack(self.window).double().mean().cpu())) / dist.world_size()
        self.window, self.loss = [], loss
        if not np.isfinite(loss):
            raise FloatingPointError(f"train loss became {loss} by step {step}: lower the learning rates")
        tokens_per_second = step * self.cfg.batch_tokens / elapsed
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}")
        self.values(step, {"train_loss": loss, "lr_multiplier": lr_multiplier(step - 1, progress, self.cfg.schedule),
                           "tokens_per_second": tokens_per_second, "looping": float(looping)})

    def values(self, step: int, values: dict) -> None:
        if self.log:
            self.log(step, values)

    def close(self) -> None:
        self.bar.close()


def train(cfg: TrainConfig, model: GPT, stream: TokenStream, val_tokens: np.ndarray, val_bytes: np.ndarray,
          device: torch.device, log: Callable[[int, dict], None] | None = None,
          snapshots: Snapshots | None = None, calibrate: Callable[[GPT], None] | None = None,
          now: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train `model` in place, leave the EMA weights in it, and report. `val_bytes` are the
    byte counts per val position (`bpb.val_byte_counts`). Every `log_every` steps (and
    only then: it is the loop's one host sync) the ranks agree on the elapsed time, the
    cap is checked and `log(step, metrics)` receives loss, lr, throughput and the loop
    state; it also receives val_bpb every `val_every` steps (clock paused). With
    `snapshots`, the run resumes from a snapshot of itself if one exists, and saves one
    every `snapshot_every` steps (clock paused). `calibrate(model)` (GPTQ's Hessians) runs
    on the final weights right after training, before any evaluation, timed on its own:
    it reads training data, so its seconds count in the training budget. `now` is the
    time source of every figure in seconds."""
    world, rank = dist.world_size(), dist.rank()
    seqs_per_step = cfg.batch_tokens // cfg.seq_len
    if seqs_per_step % world:
        raise ValueError(f"train.batch_tokens={cfg.batch_tokens} gives {seqs_per_step} sequences per step, "
                         f"not divisible by {world} processes")
    first_row, end_row = rank * seqs_per_step // world, (rank + 1) * seqs_per_step // world
    autocast_dtype = dist.autocast_dtype(device)
    step_model = DistributedDataParallel(model) if world > 1 else model
    if cfg.runtime.compile:
        step_model = compile_model(step_model, cfg.runtime)
    optimizers = build_optimizers(model, cfg.optimizer, autocast_dtype or torch.float32)  # Newton-Schulz precision

    def looping_at(progress: float) -> bool:  # the recurrence runs from `loop_start_frac` of training on
        return model.cfg.num_loops > 0 and progress >= cfg.schedule.loop_start_frac

    def one_step(step: int, progress: float) -> torch.Tensor:
        apply_schedule(optimizers, lr_multiplier(step, progress, cfg.schedule), muon_momentum(step, cfg.optimizer))
        span = torch.as_tensor(stream.next_batch(cfg.batch_tokens, first_row * cfg.seq_len, end_row * cfg.seq_len))
        if device.type == "cuda":
            span = span.pin_memory()
        span = span.to(device, non_blocking=True)
        x, y = span[:-1].view(-1, cfg.seq_len), span[1:].view(-1, cfg.seq_len)
        return train_step(step_model, optimizers, x, y, cfg, autocast_dtype, looping=looping_at(progress))

    if cfg.runtime.compile:
        _warm_up_and_restore(model, optimizers, stream, one_step)
    graphs_before_run = compiled_graphs()
    ema = [v.detach().float().clone() for v in model.state_dict().values()] if cfg.optimizer.ema_decay else None
    state = RunState(model, optimizers, stream, ema)
    keeper = SnapshotKeeper(snapshots, cfg.runtime.snapshot_every, cfg.schedule.iterations)
    step, elapsed = keeper.resume(state, device)
    clock = TrainingClock(cfg.schedule, cfg.runtime.log_every, device, now)
    validation = PeriodicValidation(cfg, val_tokens, val_bytes, device, autocast_dtype)
    run_log = RunLog(cfg, log, step)
    clock.start(step, elapsed)
    progress = clock.progress(step - 1) if step else 0.0  # as the uninterrupted run had it at a resumed step
    while True:
        at_val, at_snapshot = validation.due(step), keeper.due(step)
        last = step >= cfg.schedule.iterations
        if step % cfg.runtime.log_every == 0 or at_val or at_snapshot or clock.near_cap or last:
            elapsed = clock.agree(step)
            run_log.report(step, elapsed, progress, looping_at(progress))
        done = last or clock.over_cap()
        if at_snapshot and not done:
            with clock.paused():
                keeper.save(state, step, clock.read())
        # With calibration to follow, no evaluation comes between the end of training and it.
        if log and (at_val or done) and not (done and calibrate is not None):
            with clock.paused():
                run_log.values(step, {"val_bpb": validation.score(model, looping_at(progress))})
        if done:
            break
        progress = clock.progress(step)
        run_log.add(one_step(step, progress))
        state.update_ema(cfg.optimizer.ema_decay)
        step += 1
    clock.pause()
    run_log.close()
    state.load_ema()
    calib_seconds = clock.time(lambda: calibrate(model)) if calibrate is not None else 0.0
    final_bpb = validation.score(model, looping=None, whole=True)  # the model as evaluation runs it
    if log and calibrate is not None:
        log(step, {"val_bpb": final_bpb})  # the saved (EMA) weights, scored after calibration
    budget = cfg.schedule.max_wallclock_seconds
    return TrainResult(
        steps=step, train_seconds=elapsed, tokens_per_second=step * cfg.batch_tokens / max(elapsed, 1e-9),
        tokens_per_second_per_gpu=step * cfg.batch_tokens / max(elapsed, 1e-9) / world,
        ms_per_step=1000 * elapsed / max(step, 1), val_bpb_prequant=final_bpb, final_train_loss=run_log.loss,
        peak_mem_mib=_peak_mem_mib(device), world_size=world, seed=cfg.seed,
        stopped_by="iterations" if step >= cfg.schedule.iterations else "wallclock",
        graphs_compiled_in_run=compiled_graphs() - graphs_before_run,
        calib_seconds=calib_seconds, train_plus_calib_seconds=elapsed + calib_seconds,
        within_budget=budget <= 0 or elapsed + calib_seconds <= budget, resumed_from_step=keeper.start_step,
    )


def train_step(step_model, optimizers, x, y, cfg: TrainConfig, autocast_dtype,
               looping: bool | None = None) -> torch.Tensor:
    """Forward/backward this rank's rows (x, y: (rows, seq_len) on the device) in
    micro-batches, then one optimizer step. Each micro loss is weighted by its share of
    the rows, so the returned sum is the rank's mean loss (a tensor: no host sync).
    `looping`: the model's recurrence on or off (`GPT.forward`). Under DDP the gradients
    are averaged in the last micro-batch's backward and the average is clipped, or, with
    `clip_before_all_reduce`, each rank's own gradient is clipped and then averaged."""
    rows = x.size(0)
    starts = list(range(0, rows, cfg.micro_batch_seqs))
    total = torch.zeros((), device=x.device)
    distributed = hasattr(step_model, "no_sync")
    local_clip = distributed and cfg.optimizer.clip_before_all_reduce
    for i, s in enumerate(starts):
        last = i == len(starts) - 1
        xb, yb = x[s : s + cfg.micro_batch_seqs], y[s : s + cfg.micro_batch_seqs]
        no_sync = step_model.no_sync() if distributed and (local_clip or not last) else contextlib.nullcontext()
        with no_sync, torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = step_model(xb, yb, looping=looping).mean() * (xb.size(0) / rows)
            loss.backward()
        total += loss.detach()
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    if cfg.optimizer.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
    if local_clip:
        dist.all_reduce_sum_([p.grad for p in params if p.grad is not None], mean=True)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total


def compile_model(module: torch.nn.Module, cfg: RuntimeConfig) -> torch.nn.Module:
    """torch.compile with the run's mode and Inductor options (`inductor_options`).
    `fullgraph` on one process: a graph break in the model raises instead of silently
    splitting the step. Under DDP it cannot be: dynamo leaves DDP's own forward out of the
    graph by design, compiles the model inside, and splits that graph at the gradient
    buckets so the all-reduce overlaps the backward. `dynamic=False`: a ragged last
    micro-batch gets its own static graph (built in the warm-up) instead of every graph
    turning dynamic, with slower kernels."""
    return torch.compile(module, options=inductor_options(cfg),
                         fullgraph=not isinstance(module, DistributedDataParallel), dynamic=False)


def inductor_options(cfg: RuntimeConfig) -> dict:
    """Inductor's options for the run's compiled model (Inductor patches its config with
    them while compiling that model only): the options of `compile_mode`, and two
    switches. `compile_tune_kernels`: coordinate-descent tuning of Inductor's generated
    kernels (the elementwise and reduction kernels are about half of the record step on
    an H100); a mode that sets it wins, as it did over the process-wide setting. With
    `compile_mix_order_reduction` off, a norm's backward and the per-channel weight
    gradients that sum over tokens are separate kernels: 2 % more bytes, but the fused
    ones spill on sm_90 in the record's backward (`RuntimeConfig.compile_mix_order_reduction`)."""
    from torch._inductor import config as inductor_config, list_mode_options

    options = {"coordinate_descent_tuning": cfg.compile_tune_kernels}
    if cfg.compile_mix_order_reduction != getattr(inductor_config.triton, "mix_order_reduction", True):
        options["triton.mix_order_reduction"] = cfg.compile_mix_order_reduction  # a torch without it raises
    return {**options, **list_mode_options(cfg.compile_mode, dynamic=False)}


def _warm_up_and_restore(model, optimizers, stream: TokenStream, one_step) -> None:
    """Run a few steps in each loop state so torch.compile builds every graph, then
    restore the initial model, optimizer and data state."""
    model_state = copy.deepcopy(model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    position = stream.state()
    for progress in (0.0, 1.0):  # both loop states, so the switch never recompiles mid-run
        for step in range(COMPILE_WARMUP_STEPS):
            one_step(step, progress)
    _load_state(model, optimizers, stream, model_state, opt_states, position)


def _load_state(model, optimizers, stream: TokenStream, model_state: dict, opt_states: list, position: int) -> None:
    """Put model, optimizers and data position back as saved (after the compile warm-up,
    or from a snapshot)."""
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, opt_states):
        opt.load_state_dict(state)
    stream.restore(position)


def wallclock_progress(step: int, synced_step: int, synced_elapsed: float, seconds_per_step: float,
                       cap: float) -> float:
    """Fraction of the wall-clock budget at `step`, from the last clock all ranks agreed on
    (at `synced_step`) plus the steps since at the measured rate. Built only from agreed
    values, so every rank gets the same learning rate and switches the loop on at the same
    step; reading each rank's own clock would let the replicas drift apart."""
    return min((synced_elapsed + (step - synced_step) * seconds_per_step) / cap, 1.0)


def ranks_agree_on_step(step: int) -> None:
    """Every rank must resume from the same snapshot. Across nodes, the snapshot folder
    must be on a filesystem all of them share; otherwise some ranks would start afresh."""
    high = dist.all_reduce_max(torch.tensor([float(step)], dtype=torch.float64)).item()
    low = -dist.all_reduce_max(torch.tensor([-float(step)], dtype=torch.float64)).item()
    if high != low:
        raise RuntimeError(f"ranks found different snapshots to resume (steps {low:.0f} to {high:.0f}): "
                           "put --snapshots on a filesystem every node shares")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
