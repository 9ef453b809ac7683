import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf_core import calibration, data, resume
from pgolf_core.bpb import val_byte_counts
from pgolf_core.config import ScheduleConfig
from pgolf_core.graphs import compiled_graphs
from pgolf_core.model import GPT
from pgolf_core.train import TrainingClock, compile_model, inductor_options, run_warnings, train
from launch import torchrun
from params_helpers import nested, train_config

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, seq_len=32,
                  batch_tokens=512, micro_batch_seqs=4, iterations=6, val_every=3, val_tokens=512, ema_decay=0.5)


def run_train(shards, tiny_sp, snapshots=None, log=None, clock=None, **overrides):
    """Train the tiny model; with `clock` (the `step_clock` fixture) on its hand-driven time."""
    cfg = train_config({**TINY_TRAIN, **overrides})
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model.with_vocab(tiny_sp.vocab_size()))
    stream = data.TokenStream(data.list_shards(shards, "train"), tiny_sp.vocab_size())
    logged = []

    def record(step, values):
        logged.append((step, values))
        if log:
            log(step, values)
    val = data.load_split(shards, "val")
    timing = {} if clock is None else {"now": clock.now}
    if clock is not None:
        clock.drive(model, stream)
    result = train(cfg, model, stream, val, val_byte_counts(tiny_sp, shards, val),
                   torch.device("cpu"), log=record, snapshots=snapshots, **timing)
    return result, logged, model


def test_training_lowers_the_loss_and_reports(shards, tiny_sp):
    result, logged, _ = run_train(shards, tiny_sp, iterations=30, matrix_lr=0.05, embed_lr=0.1, val_every=10)
    losses = [v["train_loss"] for _, v in logged if "train_loss" in v]
    vals = [v["val_bpb"] for _, v in logged if "val_bpb" in v]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert len(vals) == 3 and vals[-1] < vals[0]  # at steps 10, 20 and the end
    assert result.steps == 30 and result.stopped_by == "iterations" and np.isfinite(result.val_bpb_prequant)
    assert result.tokens_per_second > 0 and result.world_size == 1


def test_recurrence_switches_on_at_its_fraction_of_training(shards, tiny_sp):
    _, logged, model = run_train(shards, tiny_sp, num_layers=3, unet_skips=True, num_loops=1, loop_start=1,
                                 loop_end=1, loop_start_frac=0.5, iterations=6, val_every=0)
    looping = [v["looping"] for _, v in logged if "looping" in v]
    assert looping == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # steps 3, 4, 5 of 0..5 run looped
    idx = torch.randint(0, tiny_sp.vocab_size(), (1, 8))
    with torch.no_grad():  # evaluation runs the model as it ended training: looped
        assert torch.equal(model(idx), model(idx, looping=True)) and not hasattr(model, "looping")


def test_calibration_reserve_comes_out_of_the_wallclock_cap(shards, tiny_sp):
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=1000.0,
                             calib_reserve_seconds=999.6, mode="wallclock")
    assert result.stopped_by == "wallclock" and 0.4 <= result.train_seconds < 100


@pytest.fixture
def step_clock():
    """A time source for the trainer (its injected `now`) that advances only when a
    training step reads its batch, by `seconds_for(steps_so_far)`; `looping` records the
    loop state each step's forward passes were given."""

    class StepClock:
        def __init__(self):
            self.time, self.looping, self.steps = 0.0, [], 0
            self.seconds_for = lambda steps: 1.0

        def now(self) -> float:
            return self.time

        def drive(self, model, stream):
            read = stream.next_batch

            def next_batch(*args, **kwargs):  # one read per training step
                self.steps += 1
                self.time += self.seconds_for(self.steps)
                return read(*args, **kwargs)
            stream.next_batch = next_batch

            def forward_looping(module, args, kwargs):
                if torch.is_grad_enabled() and len(self.looping) < self.steps:  # a step's first forward
                    self.looping.append(bool(kwargs.get("looping")))
            model.register_forward_pre_hook(forward_looping, with_kwargs=True)
    return StepClock()


def test_near_the_cap_the_clock_is_checked_every_step(shards, tiny_sp, step_clock):
    """A fake clock that advances 1 s per training step: with checks every 10 steps and a
    25 s cap, training stops at step 25, not at 30. Checks go per step from the check at
    step 10, whose 10 s + 2 x 10 steps x 1 s reaches the cap (room for steps twice as slow)."""
    result, logged, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=25.0, mode="wallclock",
                                  log_every=10, val_every=0, clock=step_clock)
    assert result.stopped_by == "wallclock" and result.steps == 25 and result.train_seconds == 25.0
    assert [step for step, values in logged if "train_loss" in values] == [10, *range(11, 26)]


def test_steps_that_slow_between_checks_stop_at_most_one_step_late(shards, tiny_sp, step_clock):
    """Steps of 1 s, then 2 s from step 81 (the loop switching on between two checks); cap
    95 s, checks every 10 steps. From the rate so far, the check at step 80 would expect
    step 90 at 90 s and skip to it (100 s); the margin for slower steps checks every step
    from 80 on, and training stops within one step of the cap."""
    step_clock.seconds_for = lambda steps: 1.0 if steps <= 80 else 2.0
    result, logged, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=95.0, mode="wallclock",
                                  log_every=10, val_every=0, clock=step_clock)
    assert 95.0 <= result.train_seconds <= 95.0 + 2.0 and result.steps == 88
    assert [step for step, values in logged if "train_loss" in values][-9:] == list(range(80, 89))


def test_wallclock_schedule_runs_on_the_agreed_clock(shards, tiny_sp, step_clock):
    """Progress (lr, loop switch) comes from the last all-reduced clock plus steps at the
    measured rate, never from a rank's own clock. Steps take 1 s, then 2 s from step 30;
    clock checks every 10 steps; cap 100 s. From the check at step 30 (30 s, 1 s/step) the
    loop switches on at step 35; a rank reading its own clock would switch at step 33."""
    import pgolf_core.train as train_module

    step_clock.seconds_for = lambda steps: 1.0 if steps <= 30 else 2.0
    looping = step_clock.looping
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=100.0, mode="wallclock",
                             log_every=10, val_every=0, num_layers=3, num_loops=1, loop_start=1, loop_end=1,
                             loop_start_frac=0.35, clock=step_clock)
    assert looping.index(True) == 35 and all(looping[35:])
    assert result.steps == 65 and result.train_seconds == 100.0  # 30 x 1 s + 35 x 2 s
    assert train_module.wallclock_progress(37, 30, 30.0, 1.0, 100.0) == 0.37
    assert train_module.wallclock_progress(130, 30, 30.0, 1.0, 100.0) == 1.0  # never past the end


def test_a_resumed_clock_measures_its_rate_from_the_resume_on():
    """After resuming at step 100 with 300 s already trained, steps of 2 s: the rate is
    2 s/step, not the 300 s carried over spread on the new steps, so the wall-clock
    schedule and the near-cap check go on as in the uninterrupted run."""
    seconds = [0.0]
    schedule = ScheduleConfig(mode="wallclock", max_wallclock_seconds=340.0)
    clock = TrainingClock(schedule, log_every=10, device=torch.device("cpu"), now=lambda: seconds[0])
    clock.start(100, 300.0)
    seconds[0] += 20.0  # 10 steps of 2 s
    assert clock.agree(110) == 320.0
    assert clock.seconds_per_step == 2.0
    assert clock.progress(112) == (320.0 + 2 * 2.0) / 340.0
    assert clock.near_cap and not clock.over_cap()  # 320 s + 10 steps x 2 s reaches the 340 s cap


def test_wallclock_cap_stops_training(shards, tiny_sp):
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=0.5, mode="wallclock")
    assert result.stopped_by == "wallclock" and 0 < result.steps < 10_000 and result.train_seconds >= 0.5


def test_a_step_scheduled_run_cut_by_the_cap_is_flagged(shards, tiny_sp, step_clock):
    """The cap still stops a `steps` run, and the run says it is not the one its params
    describe; a run that completes has nothing to say."""
    cfg = train_config({**TINY_TRAIN, "iterations": 10_000, "max_wallclock_seconds": 5.0})
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=5.0, val_every=0,
                             clock=step_clock)
    assert result.stopped_by == "wallclock" and result.steps == 5
    (warning,) = run_warnings(cfg, result)
    assert "stopped a step-scheduled run at step 5 of 10000" in warning
    complete, _, _ = run_train(shards, tiny_sp, iterations=3, val_every=0)
    assert run_warnings(train_config({**TINY_TRAIN, "iterations": 3}), complete) == []


@pytest.fixture
def eager_backend_compile(monkeypatch):
    """torch.compile with dynamo's own guards and graphs but no code generation (the
    `eager` backend): what decides a recompile, in seconds on a CPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, options=None, **settings: real_compile(
        module, backend="eager", **settings))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


LOOPED_RAGGED = dict(num_layers=3, unet_skips=True, num_loops=1, loop_start=1, loop_end=1, loop_start_frac=0.5,
                     micro_batch_seqs=6, iterations=6, val_every=0, compile=True)  # micro-batches of 6, 6 and 4


def test_the_warm_up_compiles_every_graph_the_run_needs(shards, tiny_sp, eager_backend_compile):
    """The loop switches on mid-run and the last micro-batch is shorter (two static
    shapes): the warm-up builds all four graphs, so none is built in the timed run."""
    before = compiled_graphs()
    result, logged, _ = run_train(shards, tiny_sp, **LOOPED_RAGGED)
    assert [v["looping"] for _, v in logged if "looping" in v] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert compiled_graphs() - before == 4 and result.graphs_compiled_in_run == 0


def test_a_graph_compiled_inside_the_run_is_counted_and_flagged(shards, tiny_sp, eager_backend_compile, monkeypatch):
    """A warm-up that never runs looped leaves the looped graphs to the timed run."""
    import pgolf_core.train as train_module

    monkeypatch.setattr(train_module, "_warm_up_and_restore",
                        lambda model, optimizers, stream, one_step: one_step(0, 0.0))
    result, _, _ = run_train(shards, tiny_sp, **LOOPED_RAGGED)
    assert result.graphs_compiled_in_run == 2  # looped: full and short micro-batch
    (warning,) = run_warnings(train_config({**TINY_TRAIN, **LOOPED_RAGGED}), result)
    assert "built 2 graph(s) inside the timed run" in warning


def test_divergence_is_reported_with_its_step(shards, tiny_sp):
    with pytest.raises(FloatingPointError, match="by step"):
        run_train(shards, tiny_sp, embed_lr=1e30, scalar_lr=1e30, matrix_lr=1e30, grad_clip=0.0)


def test_seed_makes_runs_repeatable(shards, tiny_sp):
    _, _, a = run_train(shards, tiny_sp, iterations=3)
    _, _, b = run_train(shards, tiny_sp, iterations=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def torchrun_train(tmp_path, name: str, nproc: int, train_params: dict, shards, tokenizer_dir, *extra: str,
                   env: dict | None = None):
    """Run the train stage under torchrun with these train params (and `env` added to the
    environment); (its output folder, its stdout, its loss curve). Fails with the run's
    stderr when it does."""
    out, params = tmp_path / name, tmp_path / f"{name}.yaml"
    params.write_text(yaml.safe_dump({"train": nested(train_params)}))
    cmd = [*torchrun(tmp_path, nproc),
           "-m", "stages.train", "--params", str(params), "--shards", str(shards), "--tokenizer", str(tokenizer_dir),
           "--out", str(out / "model.safetensors"), "--hessians", str(out / "hessians.safetensors"),
           "--metrics", str(out / "metrics"), "--train-log", str(out / "train.log"), *extra]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**_env(), **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "metrics" / "plots" / "metrics" / "train_loss.tsv") as f:
        curve = [float(row["train_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    return out, run.stdout, curve


CLIP_ORDER_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as td
from torch.nn.parallel import DistributedDataParallel
from pgolf_core.config import OptimizerConfig
from pgolf_core.train import train_step
from params_helpers import train_config

td.init_process_group("gloo")
rank, world = td.get_rank(), td.get_world_size()
torch.set_num_threads(1)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11, bias=False)

    def forward(self, x, y, looping=None):
        logits = self.out(torch.tanh(self.emb(x)))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


class Capture:  # an optimizer that keeps the gradients it is given
    def __init__(self, params):
        self.param_groups, self.grads = [{"params": params}], None

    def step(self):
        self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


torch.manual_seed(0)
start = Toy().double().state_dict()
g = torch.Generator().manual_seed(1)
X, Y = torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 11, (8, 5), generator=g)
rows = 8 // world
clip = 0.3


def plain_grads(r):  # rank r's mean loss over its rows, its gradient in float64 (no DDP, no micro-batches)
    model = Toy().double()
    model.load_state_dict(start)
    model(X[r * rows:(r + 1) * rows], Y[r * rows:(r + 1) * rows]).mean().backward()
    return [p.grad for p in model.parameters()]


def clipped(grads):
    norm = torch.sqrt(sum((q * q).sum() for q in grads))
    return [q * min(1.0, clip / (float(norm) + 1e-6)) for q in grads]


per_rank = [plain_grads(r) for r in range(world)]
mean = lambda lists: [sum(qs) / world for qs in zip(*lists)]
expected = {False: clipped(mean(per_rank)), True: mean([clipped(q) for q in per_rank])}
assert max((a - b).abs().max() for a, b in zip(expected[False], expected[True])) > 1e-3  # the orders differ here
for local in (False, True):
    cfg = train_config({"micro_batch_seqs": 3, "grad_clip": clip, "clip_before_all_reduce": local})
    model = Toy().double()
    model.load_state_dict(start)
    capture = Capture(list(model.parameters()))
    train_step(DistributedDataParallel(model), [capture], X[rank * rows:(rank + 1) * rows],
               Y[rank * rows:(rank + 1) * rows], cfg, None)  # 4 rows: micro-batches of 3 and 1
    error = max(float((a - b).abs().max()) for a, b in zip(capture.grads, expected[local]))
    if error > 1e-12:
        sys.exit(f"clip_before_all_reduce={local}: rank {rank} gradient off the float64 reference by {error}")
if rank == 0:
    print("both clip orders match their references")
td.destroy_process_group()
"""


def test_each_clip_order_under_two_processes_matches_a_float64_reference(tmp_path):
    """DDP averages then clips (04-08 and before); `clip_before_all_reduce` clips each
    rank's own gradient, then averages (the 04-10+ records): each equals its plain
    float64 reference, with micro-batches of 3 and 1 rows, and the two differ."""
    import os

    script = tmp_path / "clip_order.py"
    script.write_text(CLIP_ORDER_SCRIPT)
    run = subprocess.run([*torchrun(tmp_path, 2), str(script), str(ROOT / "tests")], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "both clip orders match their references" in run.stdout


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, shards, tiny_tokenizer_dir):
    """Same global batch on 1 and 2 processes (gloo): the loss curves agree. Both save
    snapshots on the way (rank 0 writes, all wait) and remove them once complete."""
    curves = {}
    for nproc in (1, 2):
        out, stdout, curves[nproc] = torchrun_train(
            tmp_path, f"run{nproc}", nproc, {**TINY_TRAIN, "iterations": 5, "val_every": 0, "snapshot_every": 2},
            shards, tiny_tokenizer_dir, "--snapshots", str(tmp_path / f"run{nproc}" / "snapshots"))
        assert "no snapshot at" in stdout and not (out / "snapshots" / resume.SNAPSHOT_FILE).exists()
        summary = json.loads((out / "metrics" / "metrics.json").read_text())
        assert summary["world_size"] == nproc
        assert summary["tokens_per_second_per_gpu"] == pytest.approx(summary["tokens_per_second"] / nproc)
        assert summary["calib_seconds"] > 0  # every rank collects its own; rank 0's are written
        assert "blocks.0.mlp.down.weight" in calibration.load_hessians(out / "hessians.safetensors")
    assert len(curves[1]) == len(curves[2]) == 5
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)


FEATURED = dict(num_layers=4, unet_skips=True, num_loops=1, loop_start=1, loop_end=2, loop_start_frac=0.5,
                parallel_mode="routed", parallel_start=2, smear_gate=True, xsa_last_n=4, qk_gain_init=5.0,
                rope_dims=8, attn_gate=True, resid_mix=True, ln_scale=True)


@pytest.mark.slow
@pytest.mark.parametrize("clip_before_all_reduce", [False, True])
def test_torchrun_compiled_two_processes_match_one_eager(tmp_path, shards, tiny_tokenizer_dir, clip_before_all_reduce):
    """The 8xH100 path in miniature: DDP + torch.compile (inductor, gloo) with the loop
    switching on mid-run and the sharded Muon, against one eager process; the loss curves
    agree, and the compiled run built no graph after its warm-up (fullgraph: no graph
    break either). With `clip_before_all_reduce` (the record profile's), DDP syncs nothing
    and the gradients are averaged after the backward; unclipped there, so that one
    process, which has no average to clip before, computes the same steps."""
    curves = {}
    clip = {"clip_before_all_reduce": True, "grad_clip": 0.0} if clip_before_all_reduce else {}
    for nproc, compile_ in ((1, False), (2, True)):
        out, stdout, curves[nproc] = torchrun_train(
            tmp_path, f"run{nproc}", nproc, {**TINY_TRAIN, **FEATURED, **clip, "iterations": 8, "val_every": 0,
                                             "compile": compile_, "muon_shard": compile_}, shards, tiny_tokenizer_dir)
        assert json.loads((out / "metrics" / "metrics.json").read_text())["graphs_compiled_in_run"] == 0
        assert "WARNING" not in stdout
    assert len(curves[1]) == len(curves[2]) == 8
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)


@pytest.mark.slow
def test_torchrun_compiled_fused_mlp_matches_one_eager_plain_mlp(tmp_path, shards, tiny_tokenizer_dir):
    """`train.runtime.fused_mlp` through the train stage: DDP + torch.compile on 2 processes with
    the fused Triton MLP (run by Triton's interpreter on the CPU) against one eager process
    with the plain MLP; the loss curves agree and the log says which MLP ran."""
    curves = {}
    for nproc, fused in ((1, False), (2, True)):
        _, stdout, curves[nproc] = torchrun_train(
            tmp_path, f"run{nproc}", nproc, {**TINY_TRAIN, **FEATURED, "mlp_activation": "leaky_relu2", "iterations": 6,
                                             "val_every": 0, "compile": fused, "fused_mlp": fused},
            shards, tiny_tokenizer_dir, env={"TRITON_INTERPRET": "1"})
        assert f"MLP {'fused' if fused else 'plain'}" in stdout
    assert len(curves[1]) == len(curves[2]) == 6
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)


def _env():
    """Runs start in the test's tmp folder, outside any git or DVC repo, so DVCLive never
    touches the project's repo (nor races another process working in it)."""
    import os

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


class Crash(Exception):
    pass


def crash_at(step_to_crash: int):
    def log(step, values):
        if step == step_to_crash and "train_loss" in values:
            raise Crash(step)
    return log


RESUMABLE = dict(iterations=9, snapshot_every=3, val_every=0, num_layers=2, unet_skips=True, num_loops=1,
                 loop_start=1, loop_end=1, loop_start_frac=0.5, muon_momentum_warmup_steps=5, warmdown_frac=0.5)


def test_a_crashed_run_resumes_from_its_snapshot_to_the_same_weights(shards, tiny_sp, tmp_path):
    straight_result, straight_log, straight = run_train(shards, tiny_sp, **RESUMABLE)
    assert straight_result.resumed_from_step == 0  # started fresh
    snapshots = resume.Snapshots(tmp_path, "run-a")
    with pytest.raises(Crash):  # dies at step 7, after the snapshot of step 6
        run_train(shards, tiny_sp, snapshots=snapshots, log=crash_at(7), **RESUMABLE)
    assert torch.load(snapshots.path, weights_only=True)["step"] == 6
    resumed_result, resumed_log, resumed = run_train(shards, tiny_sp, snapshots=snapshots, **RESUMABLE)
    assert resumed_result.resumed_from_step == 6 and resumed_result.steps == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # EMA weights, bit for bit
    losses = lambda log, first: [(s, v["train_loss"]) for s, v in log if "train_loss" in v and s > first]  # noqa: E731
    assert losses(resumed_log, 6) == losses(straight_log, 6)  # steps 7, 8, 9 identical


def test_a_crashed_wallclock_run_resumes_to_the_same_run_on_the_same_clock(shards, tiny_sp, tmp_path, step_clock):
    """On a clock whose steps take 1 s in every launch, a wall-clock run that dies at step
    26 and resumes from its snapshot at 25 goes on with the same learning rates, the same
    loop state, the same validation score at the resumed step, the same stop (28 s cap)
    and the same weights: the resumed clock takes the snapshot's rate until it measures
    its own, and near-cap checking holds from the first step."""
    settings = dict(iterations=10_000, mode="wallclock", max_wallclock_seconds=28.0, log_every=10, snapshot_every=5,
                    val_every=5, warmdown_frac=0.5, num_layers=2, num_loops=1, loop_start=1, loop_end=1,
                    loop_start_frac=0.5)
    clock = type(step_clock)
    straight_result, straight_log, straight = run_train(shards, tiny_sp, clock=clock(), **settings)
    snapshots = resume.Snapshots(tmp_path, "run-w")
    with pytest.raises(Crash):
        run_train(shards, tiny_sp, snapshots=snapshots, log=crash_at(26), clock=clock(), **settings)
    resumed_clock = clock()
    resumed_result, resumed_log, resumed = run_train(shards, tiny_sp, snapshots=snapshots, clock=resumed_clock,
                                                     **settings)
    assert resumed_result.resumed_from_step == 25
    assert (resumed_result.steps, resumed_result.train_seconds) == (straight_result.steps, 28.0) == (28, 28.0)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    vals = lambda log: [(s, v["val_bpb"]) for s, v in log if "val_bpb" in v and s >= 25]  # noqa: E731
    assert vals(resumed_log)[0][0] == 25 and vals(resumed_log) == vals(straight_log)


def test_a_snapshot_of_another_run_is_not_resumed(shards, tiny_sp, tmp_path):
    with pytest.raises(Crash):
        run_train(shards, tiny_sp, snapshots=resume.Snapshots(tmp_path, "run-a"), log=crash_at(4), **RESUMABLE)
    _, logged, _ = run_train(shards, tiny_sp, snapshots=resume.Snapshots(tmp_path, "run-b"), **RESUMABLE)
    assert logged[0][0] == 1  # started from step 0
    snapshot, why = resume.Snapshots(tmp_path, "run-a").load()
    assert snapshot is None and "another run" in why  # run-b overwrote it with its own


def test_an_unreadable_snapshot_is_an_error_that_names_it(tmp_path):
    snapshots = resume.Snapshots(tmp_path, "run-a")
    snapshots.path.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match=r"snapshot\.pt is unreadable.*delete it"):
        snapshots.load()


def test_the_fingerprint_changes_with_settings_inputs_and_processes():
    cfg = train_config(TINY_TRAIN)
    base = resume.fingerprint(cfg, {"shards": "a"}, 1)
    assert base == resume.fingerprint(train_config(TINY_TRAIN), {"shards": "a"}, 1)
    assert base != resume.fingerprint(train_config({**TINY_TRAIN, "matrix_lr": 0.03}), {"shards": "a"}, 1)
    assert base != resume.fingerprint(cfg, {"shards": "b"}, 1)
    assert base != resume.fingerprint(cfg, {"shards": "a"}, 2)


def test_ranks_that_found_different_snapshots_refuse_to_start(monkeypatch):
    """A second rank (simulated) resumed from step 6: it contributes 6 to the max of the
    steps and -6 to the max of their negatives."""
    import pgolf_core.train as train_module

    def agree_with_a_rank_at(other_step: float):
        contributions = iter([other_step, -other_step])
        return lambda t: torch.maximum(t, torch.full_like(t, next(contributions)))
    monkeypatch.setattr(train_module.dist, "all_reduce_max", agree_with_a_rank_at(6.0))
    with pytest.raises(RuntimeError, match="steps 0 to 6.*filesystem every node shares"):
        train_module.ranks_agree_on_step(0)
    monkeypatch.setattr(train_module.dist, "all_reduce_max", agree_with_a_rank_at(6.0))
    train_module.ranks_agree_on_step(6)  # the same snapshot on both: passes


def test_compile_model_applies_the_configured_mode_and_kernel_tuning(monkeypatch):
    """The mode and switches reach torch.compile as Inductor options of that model; the
    process-wide Inductor config is left alone."""
    from torch._inductor import config as inductor_config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: calls.append(options) or module)
    # Not monkeypatched: undoing a patch deletes the option from Inductor's config module,
    # and every later compile in the process then fails. The run's options never touch it.
    tuning, autotune = inductor_config.coordinate_descent_tuning, inductor_config.max_autotune
    module = torch.nn.Linear(2, 2)
    assert compile_model(module, train_config({}).runtime) is module
    assert calls == [dict(options={"coordinate_descent_tuning": False}, fullgraph=True, dynamic=False)]  # a graph
    assert inductor_config.coordinate_descent_tuning is tuning  # break raises; shapes stay static
    compile_model(module, train_config({"compile_mode": "max-autotune-no-cudagraphs",
                                        "compile_tune_kernels": True}).runtime)
    assert calls[-1]["options"] == {"max_autotune": True, "coordinate_descent_tuning": True}  # the mode's own
    assert inductor_config.coordinate_descent_tuning is tuning and inductor_config.max_autotune is autotune
    tuned = inductor_options(train_config({"compile_tune_kernels": True}).runtime)
    assert tuned == {"coordinate_descent_tuning": True}


def test_compile_model_switches_inductors_mix_order_reductions(monkeypatch):
    from torch._inductor import config as inductor_config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: calls.append(options["options"]) or module)
    default = inductor_config.triton.mix_order_reduction  # read, not patched (see above)
    compile_model(torch.nn.Linear(2, 2), train_config({"compile_mix_order_reduction": False}).runtime)
    assert calls[-1]["triton.mix_order_reduction"] is False and inductor_config.triton.mix_order_reduction is default
    compile_model(torch.nn.Linear(2, 2), train_config({}).runtime)
    assert default is True and "triton.mix_order_reduction" not in calls[-1]  # Inductor's own default
    assert inductor_config.triton.mix_order_reduction is default


def test_inductor_takes_the_options_torch_compile_is_given():
    """Inductor's own check of option names and types, which torch.compile runs when it
    is called (before any tracing), for every option the run's switches can give. Through
    torch.compile itself: its private wrapper's signature differs between the GPU
    machine's torch 2.11 and CI's 2.13."""
    cfg = train_config({"compile_mode": "max-autotune-no-cudagraphs", "compile_tune_kernels": True,
                        "compile_mix_order_reduction": False}).runtime
    options = inductor_options(cfg)
    assert options["coordinate_descent_tuning"] is True and options["max_autotune"] is True
    torch.compile(torch.nn.Identity(), options=options)
    for wrong in ({**options, "coordinate_descent_tuning": "yes"}, {**options, "no_such_option": True}):
        with pytest.raises(RuntimeError, match="Unexpected"):  # the check this test relies on
            torch.compile(torch.nn.Identity(), options=wrong)
