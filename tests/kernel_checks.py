"""What the tests of our Triton kernels (pgolf_core.fused_mlp, pgolf_core.fused_ce) share:
ptxas's verdict on their sm_90 code (compiled by `sm90`), the
interpreter switched on with each launch recorded, the kernels resolved for CPU tensors
under it, and comparing a model's training step with and without them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sm90 import ptxas_usage

from pgolf_core.config import RuntimeConfig
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.kernels import Kernels
from pgolf_core.model import GPT

H100_SHARED_MEMORY = 232_448  # bytes of shared memory one block may use on sm_90


def ptxas_report(kernel, workdir: Path) -> dict:
    """registers and spill_bytes (stores and loads) of a compiled kernel, from ptxas -v for sm_90a."""
    usage = ptxas_usage(kernel, workdir)
    return {"registers": usage["registers"], "spill_bytes": usage["spill_stores"] + usage["spill_loads"]}


@contextlib.contextmanager
def recorded_launches(monkeypatch, module, record):
    """Triton's interpreter on for the block; yields the list that gets `record(kwargs)`
    of each `module._launch`."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = module._launch
    monkeypatch.setattr(module, "_launch", lambda *args, **kw: calls.append(record(kw)) or real(*args, **kw))
    yield calls


def interpreted_kernels(**switches) -> Kernels:
    """The kernels of `switches` (fused_mlp, fused_ce) resolved for CPU tensors; call
    with Triton's interpreter on (`recorded_launches`)."""
    kernels = resolve_kernels("cpu", RuntimeConfig(**{"flash_attn": False, **switches}))
    assert kernels.device_type == "cpu" and all(getattr(kernels, {"fused_mlp": "mlp", "fused_ce": "loss"}[name])
                                                for name, on in switches.items() if on)
    return kernels


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of `x` against `ref`, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def losses_and_grads(model: GPT, idx, targets):
    """Mean training loss and every parameter's gradient, by name (compiled or not)."""
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets).mean()
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def model_without_zero_weights(cfg, kernels: Kernels | None = None) -> GPT:
    """A seeded model whose zero-initialised output projections are made random, so that no
    gradient is zero in the comparisons: the same weights whatever its `kernels`."""
    torch.manual_seed(0)
    model = GPT(cfg, kernels)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2 and not weight.any():
                weight.normal_(std=0.1)
    return model
