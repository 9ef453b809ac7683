"""Quantized weights: the container every quantizer returns and the artifact stores.

Quantizers (`quant.rtn`, `quant.gptq`) differ only in how they choose the integers; they
all hand back a `QuantizedModel`, so packing, the reference file and the exact round-trip
check never depend on which one ran. Dequantization lives here for the same reason, and
so does the one rule that puts a weight in a category (its width, its clip, its storage
group in the artifact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("int8", "fp16")  # per-row integers with fp16 scales, or fp16 passthrough
CATEGORY_PATTERNS = (  # first match wins; a matrix matching none is "other"
    ("embedding", r"(^|\.)(tok_emb|lm_head)\."),
    ("attention", r"\.attn\."),
    ("mlp", r"\.mlp\."),
)
CATEGORIES = ("embedding", "attention", "mlp", "other")


def category_of(name: str) -> str:
    """The category of a weight by its parameter name: "embedding" (the tied embedding,
    which is also the output head), "attention", "mlp" or "other"."""
    for category, pattern in CATEGORY_PATTERNS:
        if re.search(pattern, name):
            return category
    return "other"


@dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
    """One tensor as stored: `q` int8 (rows, cols) with `scale` fp16 (rows,), or `data` fp16.

    `shape` and `dtype` are the original tensor's; `bits` is the integer grid's width
    (|q| <= 2**(bits-1) - 1), 0 for passthrough.
    """

    shape: tuple[int, ...]
    dtype: str  # original dtype name, e.g. "float32"
    bits: int = 0
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    data: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "fp16" if self.data is not None else "int8"


@dataclass(frozen=True, kw_only=True)
class QuantizedModel:
    """Quantized tensors by parameter name (insertion order is the storage order)."""

    tensors: dict[str, QuantizedTensor]
    method: str  # which quantizer produced the integers, e.g. "rtn"


def dequantize_tensor(t: QuantizedTensor) -> torch.Tensor:
    """float32 tensor of the original shape: q * scale per row, or the fp16 data widened."""
    if t.data is not None:
        return t.data.float().reshape(t.shape)
    return (t.q.float() * t.scale.float()[:, None]).reshape(t.shape)


def dequantize(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """All tensors back as float32, keyed by name (exact and reproducible: fp16 scales)."""
    return {name: dequantize_tensor(t) for name, t in qm.tensors.items()}

