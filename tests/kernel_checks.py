"""What the tests of our Triton kernels (pgolf_core.fused_mlp, pgolf_core.fused_ce) share:
ptxas's verdict on their sm_90 code (compiled by `sm90`), the
interpreter switched on with each launch recorded, and comparing a model's training step
with and without them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sm90 import ptxas_usage

from pgolf_core.model import GPT

H100_SHARED_MEMORY = 232_448  # bytes of shared memory one block may use on sm_90


def ptxas_report(kernel, workdir: Path) -> dict:
    """registers and spill_bytes (stores and loads) of a compiled kernel, from ptxas -v for sm_90a."""
    usage = ptxas_usage(kernel, workdir)
    return {"registers": usage["registers"], "spill_bytes": usage["spill_stores"] + usage["spill_loads"]}


@contextlib.contextmanager
def recorded_launches(monkeypatch, module, switch, record):
    """`switch` (a module's use_... function) on under Triton's interpreter for the block;
    yields the list that gets `record(kwargs)` of each `module._launch`."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    switch(True)
    calls = []
    real = module._launch
    monkeypatch.setattr(module, "_launch", lambda *args, **kw: calls.append(record(kw)) or real(*args, **kw))
    try:
        yield calls
    finally:
        switch(False)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of `x` against `ref`, in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def losses_and_grads(model: GPT, idx, targets):
    """Mean training loss and every parameter's gradient, by name (compiled or not)."""
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets).mean()
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def model_without_zero_weights(cfg) -> GPT:
    """A seeded model whose zero-initialised output projections are made random, so that no
    gradient is zero in the comparisons."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2 and not weight.any():
                weight.normal_(std=0.1)
    return model
