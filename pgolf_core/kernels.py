"""The one dispatch for GPU-only kernels: flash attention when present, PyTorch SDPA
otherwise (same signature, always works, the path CPU tests exercise).

Document masking (`document_mask`, the records' varlen attention from 04-10 on: no
token attends across a BOS) has two forms of one mask: inside a compiled CUDA graph a
FlexAttention block mask (blocks wholly outside a document are skipped), elsewhere a
dense boolean mask for SDPA (CPU, eager evaluation). Neither has been timed on a GPU.

Probed once at import inside try/except; nothing else in pgolf_core imports
flash-attention. `use_flash_attn(False)` forces the fallback (tests).

Measured (bench/results/attention_kernels.json, H100): SDPA runs cuDNN's kernel there,
2.39 ms forward + backward per record micro-batch and layer. The FA4 branch has not run
on a GPU yet; it is not a registered custom op, so under torch.compile it may break the
graph: measure it with bench/attention_kernels.py before relying on it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

try:  # FlashAttention 4 (module flash_attn.cute), Hopper/Blackwell only
    from flash_attn.cute import flash_attn_func as _flash_attn_func

    HAS_FLASH_ATTN = True
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None
    HAS_FLASH_ATTN = False

_flash_enabled = HAS_FLASH_ATTN


def use_flash_attn(enabled: bool) -> None:
    """Turn the flash-attention path on or off; warns when asked for but not installed."""
    global _flash_enabled
    if enabled and not HAS_FLASH_ATTN:
        warnings.warn("flash attention requested but flash_attn.cute is not installed: using SDPA", stacklevel=2)
    _flash_enabled = enabled and HAS_FLASH_ATTN


def attention_path(device: torch.device) -> str:
    """Which kernel `causal_attention` runs on `device`: "flash_attn_4" or "sdpa"."""
    return "flash_attn_4" if _flash_enabled and device.type == "cuda" else "sdpa"


def _block_mask_wanted(idx: torch.Tensor) -> bool:
    """FlexAttention only where it is fast: compiled, on a GPU (eager it materialises scores)."""
    return idx.is_cuda and torch.compiler.is_compiling()


def document_mask(idx: torch.Tensor, bos_id: int):
    """The causal same-document mask of token ids (B, T), in the form `causal_attention`
    takes on this device: token t sees s <= t only when no BOS lies in (s, t]. Tokens
    before a row's first BOS are one document (a document cut by the row start)."""
    docs = torch.cumsum(idx == bos_id, dim=1)  # (B, T): the document index of each token
    B, T = idx.shape
    if _block_mask_wanted(idx):
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

        return create_block_mask(same_document_causal, B, None, T, T, device=idx.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Causal attention with grouped KV heads, within documents when given `document_mask`.

    q: (B, H, T, E); k, v: (B, K, T, E) with H % K == 0. Returns (B, H, T, E).
    """
    gqa = q.size(1) != k.size(1)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if mask is not None:  # a FlexAttention block mask (compiled CUDA graphs)
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if _flash_enabled and q.is_cuda:
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
