"""The benchmark scripts' CPU smoke modes: a GPU session must not be the first to find a
script broken by a change elsewhere (their figures are measured on the GPU, not here)."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> dict:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["fused", "plain"])
def test_train_throughput_smoke_run_on_cpu(loss):
    result = run_script("bench/train_throughput.py", "--profile", "profiles/cpu.yaml", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--no-compile", "--loss", loss)
    assert result["device"] == "cpu" and result["loss"] == loss and result["attention_path"] == "sdpa"
    assert result["tokens_per_second"] > 0 and result["flops_per_token"] > 0 and result["graphs_compiled_after_warmup"] == 0


def test_train_throughput_applies_overrides():
    result = run_script("bench/train_throughput.py", "--profile", "profiles/cpu.yaml", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--no-compile", "--set", "num_layers=2", "--set", "mlp_mult=2")
    assert result["overrides"] == ["num_layers=2", "mlp_mult=2"]
    assert result["config"]["num_params"] < 400_000  # 0.36 M; the CPU profile's 4 x 128 model has 0.85 M


@pytest.mark.parametrize("schedule", ["wallclock", "steps"])
def test_train_throughput_averages_a_run_that_loops_from_loop_start_frac(schedule):
    """Wall-clock schedule: the looped rate holds for (1 - f) of the time; step schedule:
    for (1 - f) of the tokens. (The issue's 715 K reference is the first kind, f = 0.5.)"""
    result = run_script("bench/train_throughput.py", "--profile", "profiles/cpu.yaml", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--no-compile", "--set", "num_layers=2",
                        "--set", "num_loops=2", "--set", "loop_end=1", "--set", "loop_start_frac=0.25",
                        "--set", f"schedule={schedule}", "--set", "max_wallclock_seconds=600")
    unlooped, looped = result["tokens_per_second"], result["tokens_per_second_looped"]
    expected = 0.25 * unlooped + 0.75 * looped if schedule == "wallclock" else 1 / (0.25 / unlooped + 0.75 / looped)
    assert result["tokens_per_second_run_average"] == pytest.approx(expected, abs=1.0)
    assert result["config"]["virtual_layers_looped"] == 6 and result["config"]["schedule"] == schedule


def test_muon_shard_times_every_ranks_share_and_counts_the_gathered_bytes():
    """CPU profile, 3 processes: 8 matrices in each of 3 batches, so blocks of 3 (one
    padded); every process receives 2 blocks of 3 x (128x128 + 64x128 + 128x512) floats."""
    result = run_script("bench/muon_shard.py", "--profile", "profiles/cpu.yaml", "--device", "cpu", "--world", "3",
                        "--repeats", "1")
    assert result["batches"] == {"128x128": 8, "64x128": 8, "128x512": 8}
    assert len(result["ms_share_per_rank"]) == 3 and result["ms_share_max"] == max(result["ms_share_per_rank"])
    assert result["host_ms_whole"] > 0 and result["host_ms_share_max"] > 0
    assert result["kernel_ms_whole"] > 0 and result["kernel_ms_share_max"] > 0  # timings only: no speed claims here
    assert result["gather_bytes_received_per_process"] == 2 * 3 * (128 * 128 + 64 * 128 + 128 * 512) * 4
    assert result["rel_error_sharded_vs_whole"] < 1e-5  # float32: sub-batched matmuls round differently


def test_attention_kernels_checks_every_mask_form_against_its_reference():
    result = run_script("bench/attention_kernels.py", "--device", "cpu", "--check-only", "--batch", "2",
                        "--seq-len", "256", "--doc-len", "50")
    variants = result["variants"]
    for name in ("sdpa_documents_dense", "flex_causal_triton", "flex_documents_triton"):
        assert variants[name]["rel_error"] < 5e-3, (name, variants[name])  # bf16 inputs against float64
    assert result["pgolf_path"] == "sdpa" and result["pgolf_path_documents"] == "flex_attention_triton"


@pytest.mark.slow
def test_train_dev_run_smoke_run_on_cpu(tmp_path, embedded_docs):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in embedded_docs[:1000]))
    result = run_script("bench/train_dev_run.py", "--profile", "profiles/cpu.yaml", "--corpus", str(corpus),
                        "--workdir", str(tmp_path / "work"), "--device", "cpu", "--batch-tokens", "8192",
                        "--micro-batch-seqs", "16", "--steps", "4", "--val-every", "2")
    assert result["steps"] == 4 and result["loop_switch_step"] is None  # the CPU profile has no recurrence
    assert result["val_tokens"] > 0 and 0 < result["val_bpb_prequant"] < 20
    assert result["last_eval_before_ema"]["step"] == 4 and 0 < result["last_eval_before_ema"]["val_bpb"] < 20


@functools.cache
def inductor_h100_backward(*settings: str) -> dict:
    """Inductor's H100 code for a one-layer model big enough for mix-order reductions (at
    least 5 M elements per norm); every kernel compiles for sm_90 or the script fails.
    Cached: two tests share the run with mix-order reductions off."""
    result = run_script("bench/inductor_h100_kernels.py", "--profile", "profiles/cpu.yaml", "--rows", "16",
                        "--seq-len", "2048", "--set", "num_layers=1", "--set", "model_dim=256", "--set", "num_heads=4",
                        *(arg for setting in settings for arg in ("--set", setting)))
    assert result["unlooped"]["forward"]["kernels"] > 5 and result["unlooped"]["forward"]["mix_order_kernels"] == 0
    return result["unlooped"]["backward"]


@pytest.mark.slow
def test_inductor_h100_kernels_sees_the_mix_order_switch():
    """The switch decides whether the norm backward fuses the weight gradients."""
    fused = inductor_h100_backward("compile_mix_order_reduction=true")
    separate = inductor_h100_backward("compile_mix_order_reduction=false")
    assert fused["mix_order_kernels"] > 0 and separate["mix_order_kernels"] == 0
    assert separate["launches"] > fused["launches"]
    assert separate["fused_bytes_per_token"] > fused["fused_bytes_per_token"]  # the weight grads re-read their inputs
    assert separate["extern_bytes_per_token"] == fused["extern_bytes_per_token"] > 0


@pytest.mark.slow
def test_inductor_h100_kernels_floors_every_kernel_from_its_machine_code():
    """With mix-order reductions off every kernel's machine code is counted; a graph's floor
    is at least its memory floor, the longest path at least the shortest. Mix-order
    kernels (their own grid) count by memory alone, and are named."""
    backward = inductor_h100_backward("compile_mix_order_reduction=false")
    floor = backward["floor_ms"]
    assert backward["kernels_without_an_instruction_count"] == []
    assert 0 < floor["memory"] <= floor["shortest_path"] <= floor["longest_path"]
    mixed = inductor_h100_backward("compile_mix_order_reduction=true")
    assert len(mixed["kernels_without_an_instruction_count"]) == mixed["mix_order_kernels"] > 0


@pytest.mark.slow
def test_fused_mlp_custom_ops_replace_the_activation_kernel_on_the_gpu_path():
    """Inductor's CUDA lowering takes the fused MLP's custom ops as library calls with no
    copies around them: the activation's backward kernel goes (one launch fewer for the one
    layer) and Inductor's own kernels move fewer bytes."""
    plain = inductor_h100_backward("compile_mix_order_reduction=false")
    fused = inductor_h100_backward("compile_mix_order_reduction=false", "fused_mlp=true")
    assert fused["launches"] == plain["launches"] - 1
    hidden_pass = 2 * 4 * 256  # bf16 bytes per token of one pass over the MLP hidden (mlp_mult 4, model_dim 256)
    assert plain["fused_bytes_per_token"] - fused["fused_bytes_per_token"] >= 2 * hidden_pass
    assert fused["extern_bytes_per_token"] > plain["extern_bytes_per_token"]


@pytest.mark.slow
def test_triton_loss_takes_the_loss_kernels_out_of_inductors_graph():
    """With `fused_ce` the backward's loss kernel (read the logits, write their gradient)
    becomes a library call: one launch fewer, its bytes moved and none added (no copies
    around the custom ops)."""
    plain = inductor_h100_backward("compile_mix_order_reduction=false")
    fused = inductor_h100_backward("compile_mix_order_reduction=false", "fused_ce=true")
    assert fused["launches"] == plain["launches"] - 1
    logits_pass = 2 * 1024  # bf16 bytes per token of one pass over the logits (the CPU profile's vocabulary)
    moved = plain["fused_bytes_per_token"] - fused["fused_bytes_per_token"]
    assert moved >= 2 * logits_pass
    assert fused["extern_bytes_per_token"] - plain["extern_bytes_per_token"] == moved


def test_fused_mlp_bench_checks_both_paths_against_float64():
    result = run_script("bench/fused_mlp.py", "--device", "cpu", "--check-only", "--tokens", "96", "--dim", "32",
                        "--hidden", "48")
    for path in ("plain", "fused"):
        errors = result["paths"][path]
        assert set(errors) == {"rel_error_y", "rel_error_grad_x", "rel_error_grad_w_up", "rel_error_grad_w_down"}
        assert all(0 < e < 3e-3 for e in errors.values()), (path, errors)  # float16 against float64


def test_every_gpu_session_part_calls_a_script_with_flags_and_settings_it_takes(tmp_path):
    """Runs bench/gpu_session.sh with every part it defines, with `python3` and
    `nvidia-smi` replaced by stubs that log their arguments; then checks each logged
    command: the script exists, takes every flag given (its --help lists it), and every
    `--set KEY=VALUE` builds a valid train section on top of the profile. A typo there
    would otherwise cost a GPU call to find."""
    import re
    import shlex

    from pgolf_core import config

    session = (ROOT / "bench" / "gpu_session.sh").read_text()
    parts = re.findall(r"^(?:part|ab|dev) (\w+) ", session, flags=re.M)
    assert {"throughput", "fusedmlp", "fusedmlpstep", "devfusedmlp"} <= set(parts)
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for stub in ("python3", "nvidia-smi"):
        (bin_dir / stub).write_text(f'#!/bin/sh\n[ "$1" = "-c" ] || printf "%s\\n" "$*" >> {log}\n')
        (bin_dir / stub).chmod(0o755)
    run = subprocess.run(["bash", "bench/gpu_session.sh", *parts], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert run.returncode == 0, run.stderr
    commands = [shlex.split(line) for line in log.read_text().splitlines() if line.startswith("bench/")]
    assert len(commands) == len(parts)
    helps = {}
    for script, *args in commands:
        assert (ROOT / script).is_file(), script
        for flag in (a for a in args if a.startswith("--")):
            if script not in helps:
                helps[script] = run_help(script)
            assert flag in helps[script], (script, flag)
        settings = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        if "--profile" in args:
            profile = config.read_profile(ROOT / args[args.index("--profile") + 1])
            config.build_section("train", {**profile.get("train", {}), **config.parse_assignments(settings)})
        else:
            assert not settings, (script, settings)


def run_help(script: str) -> str:
    run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_sass_path_counts_follow_branches_and_loops():
    """A hand-made listing: an if/else (then 3 instructions, 2 of them MUFU; else 2), an
    if without else (1), a loop of 2 instructions run 4 times, then padding."""
    from bench.inductor_h100_kernels import path_counts

    listing = [(0x00, False, "LDG.E", "R0"), (0x10, True, "BRA", "0x50"),
               (0x20, False, "MUFU.EX2", "R1, R1"), (0x30, False, "MUFU.RCP", "R2, R2"), (0x40, False, "BRA", "0x70"),
               (0x50, False, "FFMA", "R1"), (0x60, False, "FFMA", "R2"),
               (0x70, True, "BRA", "0x90"), (0x80, False, "FMUL", "R3"),
               (0x90, False, "FADD", "R4"), (0xa0, True, "BRA", "0x90"),
               (0xb0, False, "EXIT", ""), (0xc0, False, "BRA", "0xc0"), (0xd0, False, "NOP", "")]
    counts = path_counts(listing, trips=4)
    assert counts == {"instructions": (14, 18), "mufu": (0, 2)}
    nested = listing[:11] + [(0xb0, True, "BRA", "0x00"), (0xc0, False, "EXIT", ""), (0xd0, False, "BRA", "0xd0")]
    assert path_counts(nested, trips=4) is None


@pytest.mark.slow
def test_loss_kernels_h100_ranks_the_three_losses(tmp_path):
    """The machine code of each loss for an H100, compiled on the CPU: the Triton kernels
    have no branches (one path), and by the floors the Triton loss beats Inductor's fused
    loss, which beats the plain one. No floor is below the memory floor of three passes
    over the bf16 logits (805 M values: 1.6 GB each, at 3 TB/s)."""
    floors = run_script("bench/loss_kernels_h100.py", "--out", str(tmp_path / "loss.json"))["floor_ms_per_micro_batch"]
    assert floors["triton"]["shortest_path"] == floors["triton"]["longest_path"]
    assert floors["triton"]["longest_path"] < floors["fused"]["shortest_path"] < floors["plain"]["shortest_path"]
    assert all(floor["shortest_path"] >= 3 * 2 * 48 * 2048 * 8192 / 3e12 * 1e3 for floor in floors.values())
