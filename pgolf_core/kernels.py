"""The kernels a model runs: which attention kernel and the mask it takes, and (`Kernels`)
which of training's fused kernels the model was built with.

- Plain causal attention runs PyTorch SDPA (cuDNN's kernel on an H100: 2.39 ms forward
  + backward per record micro-batch and layer at c5166ca, against 3.83 ms for SDPA's flash
  backend; grouped KV heads, since expanding them cost cuDNN 14 %). It always works and
  is the path CPU tests exercise.
- Document masking (`doc_mask`, the records' varlen attention from 04-10 on: no token
  attends across a BOS) runs FlexAttention with a block mask inside compiled CUDA graphs
  (blocks wholly outside a document are skipped) and SDPA with a dense boolean mask
  elsewhere (CPU, eager evaluation; FlexAttention run eagerly materialises the scores).
- With FA4 (FlashAttention 4, module `flash_attn.cute`) asked for and installed, compiled
  CUDA graphs run every attention through FlexAttention's FLASH backend (FA4's kernels, a
  causal block mask when there are no documents). Going through FlexAttention keeps the
  graph whole, where a direct call into flash_attn would break it.

`dispatch.resolve_kernels` chooses once, for a device, what the run's switches ask for
and the device and installed packages allow; the model gets the resulting `Kernels` at
construction. Nothing here is process-wide state: a model built without kernels
(evaluation, calibration, tests) runs SDPA, the plain MLP and the plain loss.

None of the FlexAttention paths has been timed on a GPU yet: `bench/gpu_session.sh
docmask docmaskoff` measures the record step with and without document masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pgolf_core.loss import lse_needs_no_maximum


@dataclass(frozen=True)
class Kernels:
    """The kernels a model is built with (`dispatch.resolve_kernels`); the default is the
    plain set. The fused
    functions run only where wanted: with autograd on (evaluation and GPTQ calibration,
    which hooks the MLP's down projection, take the plain paths) and on tensors of the
    device type they were resolved for."""

    device_type: str | None = None  # where `mlp` and `loss` run: "cuda", or "cpu" under Triton's interpreter
    flash_attn: bool = False  # FA4 through FlexAttention, in compiled CUDA graphs
    mlp: Callable | None = None  # fused_mlp.fused_mlp(x, w_up, w_down, slope); None: the plain MLP
    loss: Callable | None = None  # fused_ce.softcap_ce(logits, targets, cap); None: loss.fused_softcap_nll

    def mlp_wanted(self, x: torch.Tensor) -> bool:
        """Whether an MLP applied to `x` takes the fused path."""
        return self.mlp_active(x.device) and torch.is_grad_enabled()

    def loss_wanted(self, logits: torch.Tensor, cap: float) -> bool:
        """Whether the loss of `logits` takes the Triton path."""
        return self.loss_active(logits.device, cap) and torch.is_grad_enabled()

    def mlp_active(self, device: torch.device) -> bool:
        """Whether training steps on `device` run the fused MLP (for logs and results)."""
        return self.mlp is not None and device.type == self.device_type

    def loss_active(self, device: torch.device, cap: float) -> bool:
        """Whether training steps on `device` with this soft cap run the Triton loss (its
        bound on exp(s - cap) must hold: `loss.lse_needs_no_maximum`)."""
        return self.loss is not None and device.type == self.device_type and lse_needs_no_maximum(cap)

    def attention_path(self, device: torch.device, doc_mask: bool = False, compiled: bool = True) -> str:
        """Which kernel `causal_attention` runs for a model on `device` (for logs and results)."""
        if device.type == "cuda" and compiled and (doc_mask or self.flash_attn):
            return "flex_attention_fa4" if self.flash_attn else "flex_attention_triton"
        return "sdpa_document_mask" if doc_mask else "sdpa"

    def describe(self, device: torch.device, *, doc_mask: bool, compiled: bool, cap: float) -> dict:
        """What results record of the kernels: attention_path, fused_mlp, fused_ce."""
        return {"attention_path": self.attention_path(device, doc_mask, compiled),
                "fused_mlp": self.mlp_active(device), "fused_ce": self.loss_active(device, cap)}


def _block_mask_wanted(idx: torch.Tensor) -> bool:
    """FlexAttention only where it is fast: compiled, on a GPU."""
    return idx.is_cuda and torch.compiler.is_compiling()


def attention_mask(idx: torch.Tensor, bos_id: int, documents: bool, flash_attn: bool = False):
    """The mask every layer's `causal_attention` takes for token ids idx (B, T), made once
    per forward: None (plain causal SDPA), a dense (B, 1, T, T) boolean, or a FlexAttention
    block mask (also without documents, for FA4: `flash_attn`). With `documents`, token t
    sees s <= t only when no BOS lies in (s, t]; tokens before a row's first BOS are one
    document (one cut by the row start)."""
    block = _block_mask_wanted(idx)
    if not documents and not (flash_attn and block):
        return None
    docs = torch.cumsum(idx == bos_id, dim=1) if documents else None  # (B, T) document index
    return block_mask(docs, idx.size(1), idx.device) if block else dense_document_mask(docs)


def dense_document_mask(docs: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean for SDPA from document indices (B, T): causal and same document."""
    T = docs.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def block_mask(docs: torch.Tensor | None, seq_len: int, device: torch.device):
    """FlexAttention block mask: causal and, given document indices (B, T), same document."""
    from torch.nn.attention.flex_attention import create_block_mask

    if docs is None:
        return create_block_mask(lambda b, h, q, kv: kv <= q, None, None, seq_len, seq_len, device=device)
    return create_block_mask(lambda b, h, q, kv: (kv <= q) & (docs[b, q] == docs[b, kv]),
                             docs.size(0), None, seq_len, seq_len, device=device)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None,
                     flash_attn: bool = False) -> torch.Tensor:
    """Causal attention with grouped KV heads, restricted by an `attention_mask`; a block
    mask runs FA4's kernels with `flash_attn`, FlexAttention's Triton ones without.

    q: (B, H, T, E); k, v: (B, K, T, E) with H % K == 0. Returns (B, H, T, E).
    """
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa, kernel_options=_flex_options(flash_attn))


def _flex_options(flash_attn: bool) -> dict | None:
    return {"BACKEND": "FLASH"} if flash_attn else None  # FA4's kernels; default: Triton
