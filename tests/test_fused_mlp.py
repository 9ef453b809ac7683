"""The fused MLP kernels (pgolf_core/fused_mlp.py), run by Triton's interpreter on the CPU:
against a float64 reference, through autograd, inside the model (eager, compiled, under
autocast), and only where training asks for it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import (H100_SHARED_MEMORY, interpreted_kernels, losses_and_grads, model_without_zero_weights,
                           ptxas_report, recorded_launches, rel)
from sm90 import compile_for_h100

from pgolf_core import dispatch, fused_mlp
from pgolf_core.config import RuntimeConfig
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT


@pytest.fixture
def launches(monkeypatch):
    """Triton's interpreter on; count the kernel launches."""
    with recorded_launches(monkeypatch, fused_mlp, lambda kw: kw["backward"]) as calls:
        yield calls


@pytest.fixture
def fused(launches):
    """The fused MLP, resolved for CPU tensors under the interpreter."""
    return interpreted_kernels(fused_mlp=True)


KERNEL_SHAPES = [(70, 64, 40), (33, 40, 24)]  # (M, K, N)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize("M, K, N", KERNEL_SHAPES)
def test_kernels_match_a_float64_reference(launches, dtype, tol, slope, M, K, N):
    # at the interpreter's tile: ragged last row and column tiles, three row tiles (a short
    # GROUP_M group), a K the tile divides and a K with a tail
    tile = fused_mlp.INTERPRETED_TILE
    assert all(m % tile and n % tile for m, _, n in KERNEL_SHAPES) and max(m for m, _, _ in KERNEL_SHAPES) > 2 * tile
    assert {k % tile == 0 for _, k, _ in KERNEL_SHAPES} == {True, False}
    torch.manual_seed(M + N)
    x, dy = torch.randn(M, K, dtype=dtype), torch.randn(M, K, dtype=dtype)
    w_up, w_down = (0.2 * torch.randn(N, K)).to(dtype), (0.2 * torch.randn(K, N)).to(dtype)
    h, a = torch.ops.pgolf.mlp_up_act(x, w_up, slope)
    h_ref = x.double() @ w_up.double().t()
    assert rel(h, h_ref) < tol
    assert rel(a, F.leaky_relu(h_ref, slope).square()) < 2 * tol
    dh = torch.ops.pgolf.mlp_act_grad(dy, w_down, h, slope)
    hd = h.double()
    dh_ref = (dy.double() @ w_down.double()) * torch.where(hd > 0, 2 * hd, 2 * slope**2 * hd)
    assert rel(dh, dh_ref) < 2 * tol
    assert launches == [False, True]


def test_autograd_matches_the_reference_mlp(launches):
    torch.manual_seed(0)
    x = torch.randn(2, 35, 48, requires_grad=True)
    w_up = (0.2 * torch.randn(40, 48)).requires_grad_()
    w_down = (0.2 * torch.randn(48, 40)).requires_grad_()
    y = fused_mlp.fused_mlp(x, w_up, w_down, 0.5)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w_up, w_down)]
    ref = fused_mlp.reference_mlp(*ref_inputs, 0.5)
    ref.backward(grad_out.double())
    assert y.shape == (2, 35, 48) and rel(y, ref) < 1e-6
    for fused, reference in zip((x, w_up, w_down), ref_inputs):
        assert rel(fused.grad, reference.grad) < 1e-6
    assert launches == [False, True]


def leaky_model(cfg, kernels=None) -> GPT:
    return model_without_zero_weights(dataclasses.replace(cfg, mlp_activation="leaky_relu2"), kernels)


def test_model_training_step_matches_the_plain_mlp(launches, fused, tiny_model_config):
    model = leaky_model(tiny_model_config, fused)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    loss, grads = losses_and_grads(model, idx, targets)
    assert launches == [False] * 2 + [True] * 2  # two layers: forward, then backward
    plain_loss, plain_grads = losses_and_grads(leaky_model(tiny_model_config), idx, targets)  # the same weights
    assert launches == [False] * 2 + [True] * 2  # a model built without the kernels never runs them
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    for name, grad in plain_grads.items():
        assert rel(grads[name], grad) < 1e-5, name


def test_evaluation_keeps_the_plain_mlp(launches, fused, tiny_model_config):
    model = leaky_model(tiny_model_config, fused)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 8)))
    assert launches == []  # GPTQ calibration hooks the down projection: it must see the plain path


@pytest.mark.parametrize("autocast, tol", [(None, 1e-4), (torch.float16, 1e-2)])
def test_compiled_model_runs_the_kernels_in_one_graph(launches, fused, tiny_model_config, autocast, tol):
    """Compiled with fullgraph (a graph break would raise), as the record trains: under
    autocast with the low-precision residual stream too. Matches the eager fused step."""
    model = leaky_model(dataclasses.replace(tiny_model_config, low_precision_residual=autocast is not None), fused)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        eager_loss, eager_grads = losses_and_grads(model, idx, targets)
        launches.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        loss, grads = losses_and_grads(compiled, idx, targets)
    assert launches == [False] * 2 + [True] * 2
    assert torch.allclose(loss, eager_loss, rtol=tol / 10)
    for name, grad in eager_grads.items():
        assert rel(grads[name], grad) < tol, name


def test_autocast_runs_the_kernels_in_its_dtype(launches, fused, tiny_model_config):
    """Under autocast the fused path computes in the autocast dtype (float16 here: the
    interpreter has no bfloat16), as the plain linears do, and matches them."""
    model = leaky_model(tiny_model_config, fused)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        loss, grads = losses_and_grads(model, idx, targets)
        plain_loss, plain_grads = losses_and_grads(leaky_model(tiny_model_config), idx, targets)
    assert launches == [False] * 2 + [True] * 2
    assert abs(loss.item() - plain_loss.item()) < 1e-3 * plain_loss.item()
    for name, grad in plain_grads.items():
        assert grads[name].dtype == torch.float32 and rel(grads[name], grad) < 2e-2, name


def test_switch_is_off_without_triton_and_off_the_device(monkeypatch, capsys):
    """Resolved for CUDA (compiled Triton) the kernels run on CUDA tensors only; for a CPU
    without the interpreter, or without triton, they are left out with one line saying why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = resolve_kernels("cuda", RuntimeConfig(flash_attn=False, fused_mlp=True))
    assert cuda.mlp is fused_mlp.fused_mlp and cuda.loss is None and capsys.readouterr().out == ""
    assert cuda.mlp_active(torch.device("cuda")) and not cuda.mlp_active(torch.device("cpu"))
    assert not cuda.mlp_wanted(torch.zeros(2, requires_grad=True))
    cpu = resolve_kernels("cpu", RuntimeConfig(flash_attn=False, fused_mlp=True))
    assert cpu.mlp is None and not cpu.mlp_active(torch.device("cpu"))
    assert capsys.readouterr().out == ("kernels: fused_mlp asked for, but Triton runs cpu tensors only interpreted "
                                       "(TRITON_INTERPRET=1): using the plain MLP\n")
    monkeypatch.setattr(dispatch, "_installed", lambda module: False)
    missing = resolve_kernels("cuda", RuntimeConfig(flash_attn=False, fused_mlp=True))
    assert missing.mlp is None and not missing.mlp_active(torch.device("cuda"))
    assert capsys.readouterr().out == "kernels: fused_mlp asked for, but triton is not installed: using the plain MLP\n"


@pytest.mark.parametrize("backward", [False, True])
def test_every_tile_compiles_for_hopper_tensor_cores(monkeypatch, tmp_path, backward):
    """The real (not interpreted) kernels, at the record's shapes, for every autotuned
    tile: they compile for an H100, run on its wgmma tensor-core instructions, stream their
    operands through multi-stage asynchronous copies, fit its shared memory, and keep
    their accumulator in registers (ptxas, which Triton ships, reports no spills)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # compile for real, never a cached kernel
    M, D, H = 48 * 2048, 512, 2048
    b_strides = dict(stride_bk=H, stride_bn=1) if backward else dict(stride_bk=1, stride_bn=D)  # W_down, W_up^T
    args = dict(a_ptr="*bf16", b_ptr="*bf16", h_ptr="*bf16", out_ptr="*bf16", M=M, N=H, stride_am=D, stride_ak=1,
                **b_strides)
    tuner = fused_mlp._kernel(False)
    assert len(tuner.configs) >= 4
    for config in tuner.configs:
        kernel = compile_for_h100(tuner.fn, args, dict(K=D, SLOPE=0.5, BACKWARD=backward), config)
        assert "wgmma.mma_async" in kernel.asm["ptx"], config
        assert f"memdesc<{config.num_stages}x" in kernel.asm["ttgir"], config  # operands multi-buffered
        assert kernel.metadata.shared <= H100_SHARED_MEMORY, config
        assert ptxas_report(kernel, tmp_path)["spill_bytes"] == 0, config
