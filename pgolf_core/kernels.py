"""The one dispatch for attention kernels: which kernel runs, and the mask it takes.

- Plain causal attention runs PyTorch SDPA (cuDNN's kernel on an H100: 2.39 ms forward
  + backward per record micro-batch and layer at c5166ca, against 3.83 ms for SDPA's flash
  backend; grouped KV heads, since expanding them cost cuDNN 14 %). It always works and
  is the path CPU tests exercise.
- Document masking (`doc_mask`, the records' varlen attention from 04-10 on: no token
  attends across a BOS) runs FlexAttention with a block mask inside compiled CUDA graphs
  (blocks wholly outside a document are skipped) and SDPA with a dense boolean mask
  elsewhere (CPU, eager evaluation; FlexAttention run eagerly materialises the scores).
- With FlashAttention 4 installed (module `flash_attn.cute`), compiled CUDA graphs run
  every attention through FlexAttention's FLASH backend (FA4's kernels, a causal block
  mask when there are no documents). Going through FlexAttention keeps the graph whole,
  where a direct call into flash_attn would break it. `use_flash_attn(False)` turns it off.

None of the FlexAttention paths has been timed on a GPU yet: `bench/gpu_session.sh
docmask docmaskoff` measures the record step with and without document masking.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F


def _flash_attn_installed() -> bool:
    """Whether flash_attn.cute can be found (FlexAttention imports it itself, when used)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # noqa: BLE001 - a broken flash_attn package counts as absent
        return False


HAS_FLASH_ATTN = _flash_attn_installed()
_flash_enabled = HAS_FLASH_ATTN


def use_flash_attn(enabled: bool) -> None:
    """Turn the FA4 path on or off; warns when asked for but not installed."""
    global _flash_enabled
    if enabled and not HAS_FLASH_ATTN:
        warnings.warn("flash attention requested but flash_attn.cute is not installed: using SDPA", stacklevel=2)
    _flash_enabled = enabled and HAS_FLASH_ATTN


def attention_path(device: torch.device, doc_mask: bool = False, compiled: bool = True) -> str:
    """Which kernel `causal_attention` runs for a model on `device` (for logs and results)."""
    if device.type == "cuda" and compiled and (doc_mask or _flash_enabled):
        return "flex_attention_fa4" if _flash_enabled else "flex_attention_triton"
    return "sdpa_document_mask" if doc_mask else "sdpa"


def _block_mask_wanted(idx: torch.Tensor) -> bool:
    """FlexAttention only where it is fast: compiled, on a GPU."""
    return idx.is_cuda and torch.compiler.is_compiling()


def attention_mask(idx: torch.Tensor, bos_id: int, documents: bool):
    """The mask every layer's `causal_attention` takes for token ids idx (B, T), made once
    per forward: None (plain causal SDPA), a dense (B, 1, T, T) boolean, or a FlexAttention
    block mask. With `documents`, token t sees s <= t only when no BOS lies in (s, t];
    tokens before a row's first BOS are one document (one cut by the row start)."""
    block = _block_mask_wanted(idx)
    if not documents and not (_flash_enabled and block):
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Causal attention with grouped KV heads, restricted by an `attention_mask`.

    q: (B, H, T, E); k, v: (B, K, T, E) with H % K == 0. Returns (B, H, T, E).
    """
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa, kernel_options=_flex_options())


def _flex_options() -> dict | None:
    return {"BACKEND": "FLASH"} if _flash_enabled else None  # FA4's kernels; default: Triton
