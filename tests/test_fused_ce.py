"""The Triton soft-capped cross-entropy (pgolf_core/fused_ce.py), run by Triton's
interpreter on the CPU: against a float64 reference, inside the model (eager and
compiled, under autocast), only where training asks for it, and compiled for an H100."""

import dataclasses
import math

import pytest
import torch
from kernel_checks import (interpreted_kernels, losses_and_grads, model_without_zero_weights, ptxas_report,
                           recorded_launches, rel)
from sm90 import compile_for_h100, path_counts, sass

from pgolf_core import dispatch, fused_ce
from pgolf_core.config import RuntimeConfig
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.loss import softcap_nll


@pytest.fixture
def launches(monkeypatch):
    """Triton's interpreter on; record each launch (forward or not)."""
    with recorded_launches(monkeypatch, fused_ce, lambda kw: "forward" in kw) as calls:
        yield calls


@pytest.fixture
def fused(launches):
    """The Triton loss, resolved for CPU tensors under the interpreter."""
    return interpreted_kernels(fused_ce=True)


@pytest.mark.parametrize("dtype, grad_tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("vocab", [50, 64])  # a ragged last chunk of 16, and none
@pytest.mark.parametrize("cap, scale", [(30.0, 20.0), (15.0, 3.0), (30.0, 400.0)])  # the last saturates the cap
def test_loss_and_gradient_match_float64(launches, dtype, grad_tol, vocab, cap, scale):
    torch.manual_seed(vocab)
    logits = (torch.randn(3, 7, vocab) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (3, 7))
    weights = torch.rand(3, 7) + 0.1  # a non-uniform upstream gradient
    logits64 = logits.detach().double().requires_grad_()  # the same rounded inputs, in float64
    expected = softcap_nll(logits64, targets, cap)
    (expected * weights.double()).sum().backward()
    nll = fused_ce.softcap_ce(logits, targets, cap)
    (nll * weights).sum().backward()
    assert nll.shape == targets.shape and nll.dtype == torch.float32 and logits.grad.dtype == dtype
    assert rel(nll, expected.detach()) < 1e-6
    assert rel(logits.grad, logits64.grad) < grad_tol
    assert launches == [True, False]


def test_caps_outside_the_bound_take_the_compiled_loss(launches, fused):
    """exp(s - cap) must stay a normal float32: larger caps (and no cap) are not for the
    kernels, and asking them directly is an error, not a wrong loss."""
    logits = torch.randn(4, 8, requires_grad=True)
    assert fused.loss_wanted(logits, 30.0) and not fused.loss_wanted(logits, 0.0)
    assert not fused.loss_wanted(logits, 50.0)
    with pytest.raises(ValueError, match="soft cap"):
        torch.ops.pgolf.softcap_ce(logits.detach(), torch.zeros(4, dtype=torch.long), 50.0)
    with torch.no_grad():
        assert not fused.loss_wanted(logits, 30.0)  # evaluation scores with loss.softcap_nll


def test_model_training_step_matches_the_compiled_loss(launches, fused, tiny_model_config):
    model = model_without_zero_weights(tiny_model_config, fused)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    loss, grads = losses_and_grads(model, idx, targets)
    assert launches == [True, False]
    with torch.no_grad():
        model(idx, targets)
    assert launches == [True, False]  # evaluation never runs the kernels
    plain_loss, plain_grads = losses_and_grads(model_without_zero_weights(tiny_model_config), idx, targets)
    assert launches == [True, False]  # nor does a model built without them
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    for name, grad in plain_grads.items():
        assert rel(grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("autocast, tol", [(None, 1e-4), (torch.float16, 1e-2)])
def test_compiled_model_runs_the_kernels_in_one_graph(launches, fused, tiny_model_config, autocast, tol):
    """Compiled with fullgraph (a graph break would raise), under autocast with the
    low-precision residual stream as the record trains; matches the eager step."""
    model = model_without_zero_weights(dataclasses.replace(tiny_model_config,
                                                           low_precision_residual=autocast is not None), fused)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        eager_loss, eager_grads = losses_and_grads(model, idx, targets)
        launches.clear()
        torch._dynamo.reset()
        loss, grads = losses_and_grads(torch.compile(model, fullgraph=True), idx, targets)
    assert launches == [True, False]
    assert torch.allclose(loss, eager_loss, rtol=tol / 10)
    for name, grad in eager_grads.items():
        assert rel(grads[name], grad) < tol, name


def test_switch_is_off_without_triton_and_off_the_device(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = resolve_kernels("cuda", RuntimeConfig(flash_attn=False, fused_ce=True))  # compiled Triton: CUDA only
    assert cuda.loss_active(torch.device("cuda"), 30.0) and not cuda.loss_active(torch.device("cpu"), 30.0)
    assert cuda.loss is fused_ce.softcap_ce and cuda.mlp is None and capsys.readouterr().out == ""
    monkeypatch.setattr(dispatch, "_installed", lambda module: False)
    missing = resolve_kernels("cuda", RuntimeConfig(flash_attn=False, fused_ce=True))
    assert not missing.loss_active(torch.device("cuda"), 30.0) and missing.loss is None
    assert capsys.readouterr().out == "kernels: fused_ce asked for, but triton is not installed: using the compiled loss\n"
    monkeypatch.undo()  # triton found again; the interpreter on, which runs CPU tensors only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = resolve_kernels("cuda", RuntimeConfig(flash_attn=False, fused_ce=True))
    assert interpreted.loss is None and "Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors, not cuda" \
        in capsys.readouterr().out


@pytest.mark.parametrize("forward", [True, False])
def test_every_config_compiles_for_hopper_without_spills(monkeypatch, tmp_path, forward):
    """The real kernels at the record's shapes (V = 8,192 bf16 logits per row), for every
    autotuned configuration: they compile for sm_90 and keep everything in registers, and
    their machine code has one path, three special-function operations per logit (two exp2
    and a reciprocal: tanh is not libdevice's) and fewer instructions than Inductor's
    kernels (34-44 and 42-52 per logit by path: the figures at the `train.runtime.fused_ce` switch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # compile for real, never a cached kernel
    tuner = fused_ce._kernels(False)[0 if forward else 1]
    if forward:
        args = dict(logits_ptr="*bf16", targets_ptr="*i64", nll_ptr="*fp32", lse_ptr="*fp32", stride_row=8192)
    else:
        args = dict(grad_ptr="*bf16", logits_ptr="*bf16", targets_ptr="*i64", lse_ptr="*fp32", grad_nll_ptr="*fp32",
                    stride_row=8192)
    meta = dict(V=8192, CAP=30.0, INV_CAP=1 / 30.0, LOG2E=math.log2(math.e))
    assert len(tuner.configs) >= 4
    for config in tuner.configs:
        kernel = compile_for_h100(tuner.fn, args, meta, config)
        assert "tanh" not in kernel.asm["ptx"] and ptxas_report(kernel, tmp_path)["spill_bytes"] == 0, config
        chunk = 8192 if forward else config.kwargs["BLOCK_V"]  # a program's logits: the row, or a chunk of it
        counts = path_counts(sass(kernel.asm["cubin"], tmp_path), trips=chunk // config.kwargs["BLOCK_V"])
        assert counts["instructions"][0] == counts["instructions"][1], config  # one path: no branches
        per_thread = chunk // (32 * config.num_warps)
        assert 3 * per_thread <= counts["mufu"][0] <= 3 * per_thread + 4, config  # + the target's logit and the log
        assert counts["instructions"][0] < (30 if forward else 35) * per_thread, config
