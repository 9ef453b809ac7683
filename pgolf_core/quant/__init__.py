"""Quantized weights: the container every quantizer returns and the artifact stores.

Quantizers (`quant.rtn`, with its GPTQ-lite grid, and `quant.gptq`) differ only in how
they choose the integers; they all hand back a `QuantizedModel`, so packing, the
reference file and the exact round-trip check never depend on which one ran. Dequantization lives here for the same reason, and
so does the one rule that puts a weight in a category (its width, its clip, its storage
group in the artifact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("int8", "fp16")  # per-row integers with fp16 scales, or fp16 passthrough
CATEGORY_PATTERNS = (  # first match wins; a matrix matching none is "other"
    ("gate", r"\.attn\.gate$"),  # the sparse attention gate (heads x 12): int8 or fp16, never bits.*
    ("embedding", r"(^|\.)(tok_emb|lm_head)\."),
    ("attention", r"\.attn\."),
    ("mlp", r"\.mlp\."),
)
CATEGORIES = ("embedding", "attention", "mlp", "other", "gate")
GATE_BITS = 8  # the gate's one width when stored as integers (04-19: int8, scale max|row|/127)
LQER_A_RANGE = (-2, 1)  # LQER's A: 2-bit signed integers, one fp16 scale per matrix (04-27, #1797)
LQER_B_RANGE = (-8, 7)  # LQER's B: 4-bit signed integers, one fp16 scale per group of LQER_GROUP
LQER_GROUP = 64  # consecutive elements of B (flattened row-major) sharing one scale


def category_of(name: str) -> str:
    """The category of a weight by its parameter name: "embedding" (the tied embedding,
    which is also the output head), "attention", "mlp" or "other"."""
    for category, pattern in CATEGORY_PATTERNS:
        if re.search(pattern, name):
            return category
    return "other"


@dataclass(frozen=True, kw_only=True)
class LowRank:
    """LQER's correction A·B of one matrix's quantization error, as stored.

    `a` int8 (rows, r) in LQER_A_RANGE with `a_scale` fp16 (1,); `b` int8 (r, cols) in
    LQER_B_RANGE with `b_scale` fp16 (ceil(r*cols/64),), one per 64 consecutive elements
    of b flattened row-major (the last group may be shorter).
    """

    a: torch.Tensor
    a_scale: torch.Tensor
    b: torch.Tensor
    b_scale: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def product(self) -> torch.Tensor:
        """float32 (rows, cols): (a · a_scale) @ (b · its group scales)."""
        a = self.a.float() * self.a_scale.float()
        flat = self.b.float().flatten()
        scales = self.b_scale.float().repeat_interleave(LQER_GROUP)[: flat.numel()]
        return a @ (flat * scales).reshape(self.b.shape)


def lqer_groups(rank: int, cols: int) -> int:
    """Number of B's scale groups for a rank-`rank` correction of a matrix with `cols` columns."""
    return -(-rank * cols // LQER_GROUP)


@dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
    """One tensor as stored: `q` int8 (rows, cols) with `scale` fp16 (rows,), or `data` fp16.

    `shape` and `dtype` are the original tensor's; `bits` is the integer grid's width
    (|q| <= 2**(bits-1) - 1), 0 for passthrough. `lqer`, on integer matrices only, is a
    low-rank correction added at dequantization.
    """

    shape: tuple[int, ...]
    dtype: str  # original dtype name, e.g. "float32"
    bits: int = 0
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    data: torch.Tensor | None = None
    lqer: LowRank | None = None

    @property
    def kind(self) -> str:
        return "fp16" if self.data is not None else "int8"


@dataclass(frozen=True, kw_only=True)
class QuantizedModel:
    """Quantized tensors by parameter name (insertion order is the storage order)."""

    tensors: dict[str, QuantizedTensor]
    method: str  # which quantizer produced the integers, e.g. "rtn"


def dequantize_tensor(t: QuantizedTensor) -> torch.Tensor:
    """float32 tensor of the original shape: q * scale per row (+ the LQER correction), or
    the fp16 data widened."""
    if t.data is not None:
        return t.data.float().reshape(t.shape)
    w = t.q.float() * t.scale.float()[:, None]
    if t.lqer is not None:
        w = w + t.lqer.product()
    return w.reshape(t.shape)


def dequantize(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """All tensors back as float32, keyed by name (exact and reproducible: fp16 scales)."""
    return {name: dequantize_tensor(t) for name, t in qm.tensors.items()}

