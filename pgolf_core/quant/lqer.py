"""LQER: a low-rank correction of the quantization error (04-27 record, PR #1797).

After quantization the error E = W − Ŵ of a matrix is not white: its largest singular
directions carry a visible share of ‖E‖_F. A rank-r product A·B fitted to E and added at
dequantization removes that share for a few hundred bytes per matrix. Only the k matrices
with the largest ‖E‖_F get one (04-27: r = 4, k = 3, which landed on the embedding and
MLP-up matrices), because their bytes are what the correction buys back most for.

Packing as the record's asymmetric default: A as 2-bit signed integers {−2..1} with one
fp16 scale per matrix (max|A|/1.5), B as 4-bit {−8..7} in groups of 64 consecutive
elements with one fp16 scale per group (max|group|/7.5).

Two choices differ from the record, both to make the 2 bits of A go further (mine, not
the record's): A = U_r (orthonormal columns, all of similar magnitude, so one scale fits
them) and B = Σ_r V_rᵀ (B's per-group scales absorb σ's spread), with each column of U
flipped so its largest entry is negative (the grid reaches −2 but only +1); and B is
refitted by least squares to the *quantized* A before B is quantized, so B corrects what
A's rounding lost. A correction that does not lower ‖E‖_F after all this rounding is
dropped rather than stored.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pgolf_core.quant import (LQER_A_RANGE, LQER_B_RANGE, LQER_GROUP, LowRank, QuantizedModel, category_of,
                              dequantize_tensor)

_A_DIV = 1.5  # A's scale is max|A| / 1.5 (04-27)
_B_DIV = 7.5  # B's group scale is max|group| / 7.5 (04-27)


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """fp16 scales from float64 values; 0 (all-zero group) becomes 1 so decoding never divides by it."""
    s = x.to(torch.float16)
    return torch.where(s == 0, torch.ones_like(s), s)


def _round_to(x: torch.Tensor, scale: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), *bounds).to(torch.int8)


def fit_low_rank(error: torch.Tensor, rank: int) -> LowRank:
    """The packed rank-`rank` correction of `error` (rows, cols), computed in float64."""
    E = error.detach().to(torch.float64)
    rank = min(rank, *E.shape)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    U = U[:, :rank].clone()
    flip = U.gather(0, U.abs().argmax(dim=0, keepdim=True)) > 0  # largest entry of each column made negative
    U[:, flip[0]] *= -1
    a_scale = _fp16_scale(U.abs().max() / _A_DIV).reshape(1)
    a = _round_to(U, a_scale.double(), LQER_A_RANGE)
    A = a.double() * a_scale.double()
    B = torch.linalg.lstsq(A, E, driver="gelsd").solution if A.abs().sum() > 0 else torch.zeros(rank, E.shape[1],
                                                                                               dtype=E.dtype)
    flat = B.flatten()
    groups = math.ceil(flat.numel() / LQER_GROUP)
    padded = torch.nn.functional.pad(flat, (0, groups * LQER_GROUP - flat.numel())).reshape(groups, LQER_GROUP)
    b_scale = _fp16_scale(padded.abs().amax(dim=1) / _B_DIV)
    b = _round_to(flat, b_scale.double().repeat_interleave(LQER_GROUP)[: flat.numel()], LQER_B_RANGE)
    return LowRank(a=a, a_scale=a_scale, b=b.reshape(rank, E.shape[1]), b_scale=b_scale)


def add_lqer(qm: QuantizedModel, state: dict[str, torch.Tensor], rank: int, top_k: int) -> tuple[QuantizedModel, list]:
    """`qm` with a rank-`rank` correction on the `top_k` integer matrices of largest
    ‖W − Ŵ‖_F (gates excluded: they are tiny), W from `state`. Returns the model and, per
    chosen matrix, {"name", "error_before", "error_after", "kept"} (Frobenius norms)."""
    errors = {}
    for name, t in qm.tensors.items():
        if t.kind == "int8" and category_of(name) != "gate":
            if name not in state:
                raise ValueError(f"LQER: tensor {name!r} is quantized but missing from the float weights")
            errors[name] = torch.linalg.matrix_norm(state[name].double() - dequantize_tensor(t).double()).item()
    chosen = sorted(errors, key=lambda n: (-errors[n], n))[:top_k]
    tensors, report = dict(qm.tensors), []
    for name in chosen:
        t = tensors[name]
        E = state[name].double() - dequantize_tensor(t).double()
        candidate = replace(t, lqer=fit_low_rank(E, rank))
        after = torch.linalg.matrix_norm(state[name].double() - dequantize_tensor(candidate).double()).item()
        kept = after < errors[name]
        if kept:
            tensors[name] = candidate
        report.append({"name": name, "error_before": errors[name], "error_after": after if kept else errors[name],
                       "kept": kept})
    return QuantizedModel(tensors=tensors, method=qm.method), report
