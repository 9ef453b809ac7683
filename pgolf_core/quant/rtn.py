"""Per-row symmetric round-to-nearest (RTN) quantization with percentile clipping.

The baseline every smarter quantizer is measured against, and the grid they share:
one fp16 scale per output row, integers in +-(2**(bits-1) - 1). The scale is rounded
to fp16 *before* the integers are computed, so `q * scale` in the artifact reproduces
exactly what was measured here. `row_scales` and `quantize_rows` are public so GPTQ can
use the same grid.
"""

from __future__ import annotations

import torch

from pgolf_core.config import QuantizeConfig
from pgolf_core.quant import QuantizedModel, QuantizedTensor

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


def quantize_matrix(w: torch.Tensor, bits: int, clip_percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of one 2-D matrix (rows, cols) -> (q int8 (rows, cols), scale fp16 (rows,))."""
    clip = row_clip(w, clip_percentile)
    scale = row_scales(clip, bits)
    return quantize_rows(w, scale, clip, bits), scale


def is_quantized(t: torch.Tensor, passthrough_max_numel: int) -> bool:
    """Routing rule: 2-D tensors with more than `passthrough_max_numel` elements get integers."""
    return t.ndim == 2 and t.numel() > passthrough_max_numel


def quantize_rtn(state: dict[str, torch.Tensor], cfg: QuantizeConfig) -> QuantizedModel:
    """Quantize a state dict: large 2-D float tensors -> int8 per row, the rest -> fp16.

    Raises ValueError naming the tensor for non-float or non-finite values, or a
    passthrough value beyond the fp16 range.
    """
    out: dict[str, QuantizedTensor] = {}
    for name, t in state.items():
        _check_tensor(name, t)
        shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        if is_quantized(t, cfg.passthrough_max_numel):
            try:
                q, scale = quantize_matrix(t, cfg.bits, cfg.clip_percentile)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from e
            out[name] = QuantizedTensor(shape=shape, dtype=dtype, bits=cfg.bits, q=q, scale=scale)
        else:
            out[name] = QuantizedTensor(shape=shape, dtype=dtype, data=_to_fp16(name, t))
    return QuantizedModel(tensors=out, method="rtn")


def _check_tensor(name: str, t: torch.Tensor) -> None:
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
