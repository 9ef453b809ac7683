import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf_core import config, data, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.model import GPT
from pgolf_core.train import model_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, seq_len=32,
                  batch_tokens=512, micro_batch_seqs=4, iterations=6, val_every=3, val_tokens=512, ema_decay=0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_sp, embedded_docs):
    directory = tmp_path_factory.mktemp("shards")
    data.write_split(directory, "train", tokenizer.encode_documents(tiny_sp, embedded_docs[100:250]), 20_000)
    data.write_split(directory, "val", tokenizer.encode_documents(tiny_sp, embedded_docs[:10]), 10**6)
    return directory


def run_train(shards, tiny_sp, **overrides):
    cfg = config.build_section("train", {**TINY_TRAIN, **overrides})
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, tiny_sp.vocab_size()))
    stream = data.TokenStream(data.list_shards(shards, "train"), tiny_sp.vocab_size())
    logged = []
    val = data.load_split(shards, "val")
    result = train(cfg, model, stream, val, val_byte_counts(tiny_sp, shards, val),
                   torch.device("cpu"), log=lambda step, values: logged.append((step, values)))
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
    assert looping == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0] and model.looping  # steps 3, 4, 5 of 0..5 run looped


def test_calibration_reserve_comes_out_of_the_wallclock_cap(shards, tiny_sp):
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=1000.0,
                             calib_reserve_seconds=999.6, schedule="wallclock")
    assert result.stopped_by == "wallclock" and 0.4 <= result.train_seconds < 100


def test_wallclock_cap_stops_training(shards, tiny_sp):
    result, _, _ = run_train(shards, tiny_sp, iterations=10_000, max_wallclock_seconds=0.5, schedule="wallclock")
    assert result.stopped_by == "wallclock" and 0 < result.steps < 10_000 and result.train_seconds >= 0.5


def test_divergence_is_reported_with_its_step(shards, tiny_sp):
    with pytest.raises(FloatingPointError, match="by step"):
        run_train(shards, tiny_sp, embed_lr=1e30, scalar_lr=1e30, matrix_lr=1e30, grad_clip=0.0)


def test_seed_makes_runs_repeatable(shards, tiny_sp):
    _, _, a = run_train(shards, tiny_sp, iterations=3)
    _, _, b = run_train(shards, tiny_sp, iterations=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, shards, tiny_tokenizer_dir):
    """Same global batch on 1 and 2 processes (gloo): the loss curves agree."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "iterations": 5, "val_every": 0}}))
    curves = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = launcher + ["-m", "stages.train", "--params", str(params), "--shards", str(shards),
                          "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out / "model.safetensors"),
                          "--metrics", str(out / "metrics")]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=_env())
        with open(out / "metrics" / "plots" / "metrics" / "train_loss.tsv") as f:
            curves[nproc] = [float(row["train_loss"]) for row in csv.DictReader(f, delimiter="\t")]
    assert len(curves[1]) == len(curves[2]) == 5
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}
