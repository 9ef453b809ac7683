"""GPTQ calibration: which inputs are collected, every looped pass counted, H against a
float64 computation written here, the file round trip, the training budget, and no
validation token ever read."""

import builtins

import numpy as np
import pytest
import torch

from pgolf_core import calibration, data
from params_helpers import train_config
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT
from pgolf_core.train import TrainResult, run_warnings, train

VOCAB = 64


def _shards(tmp_path, train_tokens=6000, val_token=VOCAB - 1):
    """Train shards that never hold `val_token`, a val shard made only of it."""
    rng = np.random.default_rng(0)
    data.write_split(tmp_path, "train", rng.integers(2, VOCAB - 1, train_tokens).astype(np.uint16), 4000)
    data.write_split(tmp_path, "val", np.full(500, val_token, dtype=np.uint16), 4000)
    return tmp_path


def _model(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                      **overrides)
    model = GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would make later layers' inputs trivial
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def test_looped_layers_accumulate_every_pass(tmp_path):
    model = _model(num_loops=2, loop_start=1, loop_end=2)
    stream = data.TokenStream(data.list_shards(_shards(tmp_path), "train"), VOCAB)
    cal = calibration.collect_hessians(model, stream, batches=3, seqs=2, seq_len=16, device=torch.device("cpu"),
                                       autocast_dtype=None)
    for layer, passes in ((0, 1), (1, 3), (2, 3), (3, 1)):
        for part in ("attn.q", "attn.out", "mlp.up", "mlp.down"):
            name = f"blocks.{layer}.{part}.weight"
            assert cal.calls[name] == 3 * passes and cal.rows[name] == 3 * passes * 2 * 16, name
    assert cal.calls[calibration.HEAD_WEIGHT] == 3 and cal.tokens == 3 * 2 * 16
    assert cal.hessians["blocks.1.attn.k.weight"] is cal.hessians["blocks.1.attn.q.weight"]
    assert cal.hessians["blocks.0.mlp.down.weight"].shape == (64, 64)
    assert not any(h.requires_grad for h in cal.hessians.values())


def test_first_attention_input_matches_float64(tmp_path):
    model = _model()
    stream = data.TokenStream(data.list_shards(_shards(tmp_path), "train"), VOCAB)
    tokens = torch.as_tensor(data.TokenStream(data.list_shards(tmp_path, "train"), VOCAB).next_batch(64)[:-1])
    cal = calibration.collect_hessians(model, stream, batches=1, seqs=4, seq_len=16, device=torch.device("cpu"),
                                       autocast_dtype=None)

    def rms(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + torch.finfo(torch.float32).eps)

    emb = model.tok_emb.weight.detach().double().numpy()[tokens.numpy()]
    x = rms(rms(emb))  # the embedding normalised, then the block's pre-norm
    want = x.T @ x / len(x)
    got = cal.hessians["blocks.0.attn.q.weight"].double().numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["mlp.down", "attn.q"])  # its input under autocast: bf16 already / float32
def test_autocast_hessian_sums_what_the_linear_map_multiplies(tmp_path, layer):
    """Under bf16 autocast the linear map multiplies bf16(x): H is the float32 sum of
    those products, against float64 on inputs captured by a hook of the test's own.
    The attention's input comes from a float32 norm, so there the rounding is the hook's."""
    model = _model(num_loops=1, loop_start=1, loop_end=1)
    stream = data.TokenStream(data.list_shards(_shards(tmp_path), "train"), VOCAB)
    seen = []
    module = model.blocks[1].get_submodule(layer)
    handle = module.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.bfloat16)))
    cal = calibration.collect_hessians(model, stream, batches=2, seqs=2, seq_len=16, device=torch.device("cpu"),
                                       autocast_dtype=torch.bfloat16)
    handle.remove()
    assert len(seen) == 4  # 2 batches x 2 passes of the looped layer
    x = torch.cat(seen).double().numpy()
    want = x.T @ x / len(x)
    got = cal.hessians[f"blocks.1.{layer}.weight"]
    assert got.dtype == torch.float32
    assert np.allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)


def test_gram_of_low_precision_inputs_accumulates_in_float32():
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros(24, 24)
    parts = [torch.randn(500, 24, generator=gen).mul(1 + 9 * torch.rand(24, generator=gen)).to(torch.bfloat16)
             for _ in range(3)]
    for x in parts:
        calibration.accumulate_gram(total, x)
    x = torch.cat(parts).double().numpy()
    want = x.T @ x
    assert total.dtype == torch.float32
    assert np.abs(total.double().numpy() - want).max() <= 1e-6 * np.abs(want).max()  # float32 sums, not bf16's 4e-3


def test_hessians_file_round_trip_keeps_aliases(tmp_path):
    model = _model()
    stream = data.TokenStream(data.list_shards(_shards(tmp_path / "s"), "train"), VOCAB)
    cal = calibration.collect_hessians(model, stream, 2, 2, 16, torch.device("cpu"), None)
    calibration.save_hessians(tmp_path / "h.safetensors", cal)
    loaded = calibration.load_hessians(tmp_path / "h.safetensors")
    assert set(loaded) == set(cal.hessians)
    for name, h in cal.hessians.items():
        assert torch.equal(loaded[name], h)
    first = (tmp_path / "h.safetensors").read_bytes()
    for _ in range(5):  # the same content, the same bytes (its metadata has several keys): DVC sees no change
        calibration.save_hessians(tmp_path / "h.safetensors", cal)
        assert (tmp_path / "h.safetensors").read_bytes() == first
    with pytest.raises(FileNotFoundError, match="train.calib_batches"):
        calibration.load_hessians(tmp_path / "missing.safetensors")


def test_calibration_reads_no_validation_shard(tmp_path, monkeypatch):
    shards = _shards(tmp_path)
    opened = []
    real_open, real_memmap, real_fromfile = builtins.open, np.memmap, np.fromfile
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(np, "memmap", lambda f, *a, **k: (opened.append(str(f)), real_memmap(f, *a, **k))[1])
    monkeypatch.setattr(np, "fromfile", lambda f, *a, **k: (opened.append(str(f)), real_fromfile(f, *a, **k))[1])
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    stream = data.TokenStream(data.list_shards(shards, "train"), VOCAB)
    calibration.collect_hessians(model, stream, batches=20, seqs=2, seq_len=32, device=torch.device("cpu"),
                                 autocast_dtype=None)  # wraps around the train stream several times
    assert opened and not any("_val_" in path for path in opened)
    assert all(int(x.max()) < VOCAB - 1 for x in seen)  # the val-only token never reaches the model


def _train_config(**overrides):
    return train_config(dict(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2, seq_len=16,
                             batch_tokens=64, micro_batch_seqs=4, iterations=4, val_every=2, val_tokens=64,
                             device="cpu", **overrides))


def test_calibration_follows_training_before_any_evaluation(tmp_path):
    cfg = _train_config()
    shards = _shards(tmp_path)
    model = GPT(ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2))
    events = []
    val = data.load_split(shards, "val")
    result = train(cfg, model, data.TokenStream(data.list_shards(shards, "train"), VOCAB), val,
                   np.ones(len(val), dtype=np.int64), torch.device("cpu"),
                   log=lambda step, values: events.append(("log", step, "val_bpb" in values)),
                   calibrate=lambda m: events.append(("calibrate", None, None)))
    first_cal = events.index(("calibrate", None, None))
    assert events.count(("calibrate", None, None)) == 1
    assert not any(kind == "log" and step == cfg.schedule.iterations and has_val for kind, step, has_val in events[:first_cal])
    assert events[first_cal + 1:] == [("log", cfg.schedule.iterations, True)]  # the saved weights, scored after it
    assert result.calib_seconds > 0 and result.within_budget


@pytest.mark.parametrize("calib_seconds, within", [(0.5, True), (10.5, False)])
def test_train_measures_calibration_against_the_cap(tmp_path, calib_seconds, within):
    """train() times the calibration on its clock and sets within_budget from train +
    calibration against max_wallclock_seconds (the clock here moves a millisecond per read
    and by `calib_seconds` in calibration)."""
    cfg = _train_config(max_wallclock_seconds=10.0, calib_reserve_seconds=1.0, mode="wallclock")
    shards = _shards(tmp_path)
    model = GPT(ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2))
    clock = [100.0]

    def now():
        clock[0] += 0.001
        return clock[0]

    def calibrate(m):
        clock[0] += calib_seconds

    val = data.load_split(shards, "val")
    result = train(cfg, model, data.TokenStream(data.list_shards(shards, "train"), VOCAB), val,
                   np.ones(len(val), dtype=np.int64), torch.device("cpu"), calibrate=calibrate, now=now)
    assert result.steps == cfg.schedule.iterations and result.train_seconds < 1.0
    assert result.calib_seconds == pytest.approx(calib_seconds, abs=0.01)
    assert result.train_plus_calib_seconds == result.train_seconds + result.calib_seconds
    assert result.within_budget is within


def test_train_plus_calibration_over_the_cap_is_a_broken_budget():
    cfg = _train_config(max_wallclock_seconds=10.0, calib_reserve_seconds=1.0, mode="wallclock")
    fields = dict(steps=4, train_seconds=8.9, tokens_per_second=1.0, tokens_per_second_per_gpu=1.0, ms_per_step=1.0,
                  val_bpb_prequant=1.0, final_train_loss=1.0, peak_mem_mib=1.0, world_size=1, seed=0,
                  stopped_by="wallclock", graphs_compiled_in_run=0, calib_seconds=0.5,
                  train_plus_calib_seconds=9.4, within_budget=True, resumed_from_step=0)
    assert run_warnings(cfg, TrainResult(**fields)) == []
    broken = TrainResult(**{**fields, "calib_seconds": 1.6, "train_plus_calib_seconds": 10.5, "within_budget": False})
    (warning,) = run_warnings(cfg, broken)
    assert "10.5 s > the 10 s budget" in warning and "calib_reserve_seconds=1.0" in warning
    with pytest.raises(ValueError, match="train.calib_batches=-1"):
        _train_config(calib_batches=-1)
