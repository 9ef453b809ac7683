"""Full-Hessian GPTQ (Frantar et al. 2022; the records' form from 03-25 #1019 on).

Round-to-nearest treats every weight alone. GPTQ quantizes a matrix one input column at
a time and pushes each column's rounding error onto the columns not yet quantized, in
proportion to how the layer's inputs correlate (H = XᵀX over calibration tokens), so
that the layer's *output* error ‖(W − Ŵ)X‖ stays small rather than the weights' error.
It uses exactly RTN's grid (`rtn.row_grid`: per-row fp16 scale, the category's width),
so the two differ only in which integers they pick, and the artifact format does not
care which ran. With H the identity it picks RTN's integers.
"""

from __future__ import annotations

import torch

from pgolf_core.config import QuantizeConfig
from pgolf_core.quant import QuantizedModel
from pgolf_core.quant.rtn import qmax_for, quantize_rows, quantize_state


def gptq_matrix(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int, *, damp: float = 0.01,
                block_size: int = 128, act_order: bool = True, fixed_zero: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (rows, cols) integers for `w` (rows, cols) on the grid q * scale (fp16, (rows,)).

    Steps (TECHNIQUES §4.1): input columns no token ever activated (H_jj = 0) are zeroed
    and get H_jj = 1; `damp` · mean(diag H) is added to the diagonal so the factorisation
    exists; with `act_order` the columns go in order of decreasing H_jj; U is the upper
    Cholesky factor of H⁻¹; inside a block of `block_size` columns each column is rounded
    (its integers clamped to the grid) and its error, divided by U_jj, is subtracted from
    the block's later columns along U's row; after the block the accumulated errors update
    every later column at once. Computed in float64 on the weights' device.

    `fixed_zero` (bool, like `w`) marks entries that must come out 0 (magnitude pruning's):
    they are "rounded" to 0 and their error is pushed onto the later columns like any
    other, so the pruned weights' loss is compensated instead of undone (SparseGPT's
    treatment of a mask, Frantar & Alistarh 2023). Without it, the error propagation
    would refill most of the pruned positions with nonzero integers.
    """
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {list(hessian.shape)} does not match a matrix with {cols} input columns")
    qmax = qmax_for(bits)
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    s = scale.to(device=W.device, dtype=torch.float64)[:, None]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order \
        else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    if fixed_zero is not None and fixed_zero.shape != w.shape:
        raise ValueError(f"fixed-zero mask of shape {list(fixed_zero.shape)} does not match the matrix's {list(w.shape)}")
    keep = None if fixed_zero is None else ~fixed_zero.to(W.device)[:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j]
            q = torch.clamp(torch.round(column[:, None] / s), -qmax, qmax)[:, 0]
            if keep is not None:
                q = q * keep[:, start + j]
            Q[:, start + j] = q
            err = (column - q * s[:, 0]) / U[start + j, start + j]
            block[:, j:] -= err[:, None] * U[start + j, start + j:end][None, :]
            errors[:, j] = err
        W[:, end:] -= errors @ U[start:end, end:]
    return Q[:, torch.argsort(order)].to(torch.int8).cpu()


def quantize_gptq(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: QuantizeConfig,
                  device: torch.device | str = "cpu", progress=None,
                  fixed_zero: dict[str, torch.Tensor] | None = None) -> QuantizedModel:
    """Quantize a state dict: matrices with a Hessian by GPTQ, matrices without one (lookup
    tables such as value embeddings, whose inputs are one-hot) by RTN on the same grid, the
    rest fp16. `progress(name)` is called after each GPTQ matrix (a progress bar).
    `fixed_zero` maps a matrix name to the entries that must stay 0 (`gptq_matrix`).

    Raises ValueError naming the tensor for a non-finite Hessian or one of the wrong shape,
    and naming them for Hessians of tensors the state does not have: Hessians of another
    model would otherwise leave every matrix to RTN without a word.
    """
    stale = sorted(set(hessians) - set(state))
    if stale:
        shown = ", ".join(repr(n) for n in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ValueError(f"Hessians of {len(stale)} tensor(s) the model does not have ({shown}): they were "
                         "collected from another model; rerun train so that calibration matches it")
    for name, h in hessians.items():
        if not torch.isfinite(h).all():
            raise ValueError(f"Hessian {name!r} holds NaN or Inf values: the calibration forward diverged")
    fixed_zero = fixed_zero or {}

    def one(name: str, w: torch.Tensor, bits: int, clip: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if name not in hessians:
            return quantize_rows(w, scale, clip, bits)
        try:
            q = gptq_matrix(w.to(device), hessians[name], scale, bits, damp=cfg.damp, block_size=cfg.block_size,
                            act_order=cfg.act_order, fixed_zero=fixed_zero.get(name))
        except (ValueError, RuntimeError) as e:  # RuntimeError: torch.linalg's failed factorisation
            raise ValueError(f"tensor {name!r}: GPTQ failed: {e}") from e
        if progress:
            progress(name)
        return q

    return quantize_state(state, cfg, "gptq", one)
