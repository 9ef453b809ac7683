"""Per-row symmetric round-to-nearest (RTN) quantization, and the grid every quantizer shares.

RTN is the baseline every smarter quantizer is measured against. The grid: one fp16
scale per output row, integers in +-(2**(bits-1) - 1), the width per weight category.
The row's clip is a percentile of |w| or SDClip's k standard deviations (#1394: the
compressed size of a Gaussian row tracks b - log2 k, so k, not the width, is the knob
that fills the byte budget). The scale is rounded to fp16 *before* the integers are
computed, so `q * scale` in the artifact reproduces exactly what was measured here.
`row_grid` is public so GPTQ quantizes on exactly the grid RTN would use.

GPTQ-lite (`quantize.method: gptq_lite`, the 03-22 record's name for it) is RTN on a
grid chosen per row: each row tries the |w| percentiles of `quantize.lite_percentiles`
as its clip and keeps the one whose integers reproduce the row with least squared error
(#1453: a small gain over one fixed percentile, for no calibration data).
"""

from __future__ import annotations

import torch

from pgolf_core.config import QuantizeConfig
from pgolf_core.quant import GATE_BITS, QuantizedModel, QuantizedTensor, category_of

FP16_MAX = float(torch.finfo(torch.float16).max)


def qmax_for(bits: int) -> int:
    """Largest integer of the symmetric grid: 2**(bits-1) - 1 (int8 -> 127, int6 -> 31)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: expected 2..8 (integers are stored as int8)")
    return 2 ** (bits - 1) - 1


def row_clip(w: torch.Tensor, clip_percentile: float) -> torch.Tensor:
    """Per-row clip value (rows,) float32: the `clip_percentile` percentile of |w| (100 = max).

    Linear interpolation between order statistics, as numpy's default percentile.
    """
    a = w.abs().float()
    if clip_percentile >= 100.0:
        return a.amax(dim=1)
    s = a.sort(dim=1).values
    pos = clip_percentile / 100.0 * (s.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, s.shape[1] - 1)
    frac = pos - lo
    return s[:, lo] * (1.0 - frac) + s[:, hi] * frac


def sdclip(w: torch.Tensor, k: float) -> torch.Tensor:
    """Per-row clip value (rows,) float32: k times the row's standard deviation (unbiased,
    as torch.std). A constant row (std 0) falls back to its max |w|, so a nonzero constant
    keeps its value instead of collapsing to zero."""
    w = w.float()
    std = w.std(dim=1) if w.shape[1] > 1 else torch.zeros(w.shape[0])
    return torch.where(std > 0, k * std, w.abs().amax(dim=1))


def row_grid(w: torch.Tensor, bits: int, cfg: QuantizeConfig, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip float32 (rows,), fp16 scale (rows,)) of a matrix: the grid RTN and GPTQ share
    (GPTQ-lite's, per row the least-error percentile, under method gptq_lite)."""
    if cfg.method == "gptq_lite":
        return least_error_grid(w, bits, cfg.lite_percentiles)
    clip = sdclip(w, k) if cfg.clip == "sdclip" else row_clip(w, cfg.clip_percentile)
    return clip, row_scales(clip, bits)


def least_error_grid(w: torch.Tensor, bits: int, percentiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the (clip, scale) among the |w| `percentiles` whose rounded integers give the
    least Σ (q·scale − w)² over the row; ties go to the earlier percentile in the list."""
    best_clip = best_scale = best_error = None
    for percentile in percentiles:
        clip = row_clip(w, percentile)
        scale = row_scales(clip, bits)
        error = ((quantize_rows(w, scale, clip, bits).float() * scale.float()[:, None] - w.float()) ** 2).sum(dim=1)
        if best_error is None:
            best_clip, best_scale, best_error = clip, scale, error
            continue
        better = error < best_error
        best_clip = torch.where(better, clip, best_clip)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_clip, best_scale


def row_scales(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 scales (rows,) for clip values (rows,): clip / qmax, rounded to fp16.

    Invariant: clip <= (qmax + 1/2) * scale, so values clamped to +-clip dequantize within
    scale/2. Where fp16 rounding (or underflow) breaks that, the scale moves one fp16 step
    up. Rows with clip 0 (all zero) get scale 1.
    """
    qmax = qmax_for(bits)
    clip = clip.float()
    scale = (clip / qmax).to(torch.float16)
    too_small = scale.float() * (qmax + 0.5) < clip
    scale = torch.where(too_small, torch.nextafter(scale, torch.tensor(float("inf"), dtype=torch.float16)), scale)
    scale = torch.where(clip == 0, torch.ones_like(scale), scale)
    if not torch.isfinite(scale).all():
        raise ValueError(f"clip value {clip.max().item():g} / {qmax} overflows fp16 (max {FP16_MAX:g})")
    return scale


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 (rows, cols): round(clamp(w, +-clip) / scale), clamped to +-qmax.

    `scale` is the fp16 tensor from `row_scales`; division uses its exact value.
    """
    qmax = qmax_for(bits)
    c = clip.float()[:, None]
    wc = torch.maximum(torch.minimum(w.float(), c), -c)
    q = torch.round(wc / scale.float()[:, None])
    return q.clamp_(-qmax, qmax).to(torch.int8)


def is_quantized(t: torch.Tensor, passthrough_max_numel: int) -> bool:
    """Routing rule: 2-D tensors with more than `passthrough_max_numel` elements get integers."""
    return t.ndim == 2 and t.numel() > passthrough_max_numel


def quantize_state(state: dict[str, torch.Tensor], cfg: QuantizeConfig, method: str, quantize_one) -> QuantizedModel:
    """The loop every quantizer shares: check each tensor, route it (integers or fp16
    passthrough), give an integer matrix its category's width and grid (`row_grid`), and
    let `quantize_one(name, w, bits, clip, scale)` choose its integers. Attention gates
    are routed by `cfg.gate_int8` alone (`quantize_gate`), whatever their size."""
    out: dict[str, QuantizedTensor] = {}
    for name, t in state.items():
        check_tensor(name, t)
        shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        if category_of(name) == "gate":
            out[name] = quantize_gate(name, t) if cfg.gate_int8 else \
                QuantizedTensor(shape=shape, dtype=dtype, data=_to_fp16(name, t))
        elif is_quantized(t, cfg.passthrough_max_numel):
            category = category_of(name)
            bits = getattr(cfg.bits, category)
            try:
                clip, scale = row_grid(t, bits, cfg, getattr(cfg.sdclip_k, category))
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from e
            q = quantize_one(name, t, bits, clip, scale)
            out[name] = QuantizedTensor(shape=shape, dtype=dtype, bits=bits, q=q, scale=scale)
        else:
            out[name] = QuantizedTensor(shape=shape, dtype=dtype, data=_to_fp16(name, t))
    return QuantizedModel(tensors=out, method=method)


def quantize_gate(name: str, w: torch.Tensor) -> QuantizedTensor:
    """The attention gate as int8 per row, scale max|row|/127 in fp16 (04-19's
    GATED_ATTN_QUANT_GATE): it feeds a sigmoid, so 8 bits lose nothing visible and halve
    its fp16 bytes. The gate is tiny, so GPTQ is not worth its Hessian here."""
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: an attention gate must be 2-D (heads, inputs) for quantize.gate_int8, "
                         f"found shape {list(w.shape)}")
    clip = w.abs().float().amax(dim=1)
    scale = row_scales(clip, GATE_BITS)
    q = quantize_rows(w, scale, clip, GATE_BITS)
    return QuantizedTensor(shape=tuple(w.shape), dtype=str(w.dtype).removeprefix("torch."), bits=GATE_BITS,
                           q=q, scale=scale)


def quantize_rtn(state: dict[str, torch.Tensor], cfg: QuantizeConfig) -> QuantizedModel:
    """Quantize a state dict: large 2-D float tensors -> integers per row (rounded to the
    nearest grid point), the rest -> fp16.

    Raises ValueError naming the tensor for non-float or non-finite values, or a
    passthrough value beyond the fp16 range.
    """
    method = "gptq_lite" if cfg.method == "gptq_lite" else "rtn"  # both round to nearest; gptq_lite's grid is its own
    return quantize_state(state, cfg, method, lambda name, w, bits, clip, scale: quantize_rows(w, scale, clip, bits))


def check_tensor(name: str, t: torch.Tensor) -> None:
    """Refuses, naming the tensor, weights that are not floating point or not finite."""
    if not t.is_floating_point():
        raise ValueError(f"tensor {name!r}: expected a floating-point tensor, found {t.dtype}")
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(f"tensor {name!r}: found {bad} non-finite values (NaN/inf); expected finite weights")


def _to_fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    peak = t.abs().max().item() if t.numel() else 0.0
    if peak > FP16_MAX:
        raise ValueError(f"tensor {name!r}: |value| {peak:g} exceeds the fp16 range ({FP16_MAX:g}) of passthrough")
    return t.detach().to(torch.float16).contiguous()
