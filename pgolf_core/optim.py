"""Muon for the 2-D block matrices, Adam for the embedding and the vectors, and the
learning-rate / momentum schedules as pure functions.

Muon (Keller Jordan, 2024) replaces each matrix's momentum update by its nearest
semi-orthogonal matrix U Vᵀ, approximated by a few Newton–Schulz iterations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon. They overshoot on
# purpose: small singular values grow fast, and after 5 steps every singular value of
# a normalized matrix lies in a band around 1 (about 0.7..1.2) rather than exactly at
# 1, which trains as well and converges in far fewer steps.
NS_QUINTIC = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate the polar factor U Vᵀ of G = U S Vᵀ (G: (rows, cols)).

    Works on the wide orientation (rows <= cols) so X Xᵀ is the small Gram matrix;
    X is first scaled to Frobenius norm 1 so every singular value is <= 1. `dtype` is
    the iteration's precision (bf16 on GPU, float32 on CPU).
    """
    a, b, c = NS_QUINTIC
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized, scaled by √max(1, rows/cols); decoupled
    weight decay scaled by the current lr. Only for 2-D parameters: embeddings,
    vectors and the output head belong to Adam."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"], self.ns_dtype)
                update *= math.sqrt(max(1.0, p.size(0) / p.size(1)))
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by role: `matrices` (2-D block weights, Muon), `embedding` (tied
    input/output table, Adam) and `scalars` (vectors and gains, Adam)."""
    roles: dict[str, list[nn.Parameter]] = {"matrices": [], "embedding": [], "scalars": []}
    for name, p in model.named_parameters():
        if name == "tok_emb.weight":
            roles["embedding"].append(p)
        elif p.ndim == 2 and name.startswith("blocks."):
            roles["matrices"].append(p)
        elif p.ndim <= 1:
            roles["scalars"].append(p)
        else:
            raise ValueError(f"parameter {name} of shape {tuple(p.shape)} has no optimizer role")
    return roles


def build_optimizers(model: nn.Module, cfg, ns_dtype: torch.dtype) -> list[torch.optim.Optimizer]:
    """Muon over the matrices, Adam over embedding and scalars; `initial_lr` is kept in
    every group so the schedule can rescale it."""
    roles = param_groups(model)
    muon = Muon(roles["matrices"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.weight_decay, ns_steps=cfg.ns_steps, ns_dtype=ns_dtype)
    adam = torch.optim.Adam(
        [dict(params=roles["embedding"], lr=cfg.embed_lr), dict(params=roles["scalars"], lr=cfg.scalar_lr)],
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8,
    )
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [muon, adam]


def lr_multiplier(step: int, progress: float, cfg) -> float:
    """Linear warm-up over `warmup_steps`, flat, then linear warm-down over the last
    `warmdown_frac` of the run to a floor of `min_lr_frac`. `progress` in [0, 1] is
    step/iterations or elapsed/max_wallclock_seconds, as `cfg.schedule` says."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.warmdown_frac > 0 and progress > 1.0 - cfg.warmdown_frac:
        return max((1.0 - progress) / cfg.warmdown_frac, cfg.min_lr_frac)
    return 1.0


def muon_momentum(step: int, cfg) -> float:
    """Momentum ramps linearly from `muon_momentum_warmup_start` to `muon_momentum`."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def apply_schedule(optimizers: list[torch.optim.Optimizer], multiplier: float, momentum: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, Muon):
                group["momentum"] = momentum
