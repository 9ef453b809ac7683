"""Causal self-attention with the challenge records' options, each off by default.

Shapes: B batch, T time, D model_dim, H query heads, K kv heads, G = H / K, E head_dim.
Options (TECHNIQUES.md §2.3, §2.7): partial rotary embedding (`rope_dims` of E), a
learned per-head query gain, XSA (remove from each head's output its component along
the token's own value vector), a sparse sigmoid output gate per head, value
embeddings added to v (one table, or two with a scale each per layer), and value
residual (mix layer 0's v into later layers' v, linearly or through a sigmoid gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgolf_core.config import GATE_INPUT_DIMS
from pgolf_core.kernels import causal_attention


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary embedding over the first `dims` channels of each head (pairs i <-> i + dims/2);
    the remaining channels carry no position."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float32) / dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, heads, T, E)
        t = torch.arange(x.size(-2), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (T, dims/2)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.size(-1) else rotated


class Attention(nn.Module):
    def __init__(self, cfg, layer: int, flash_attn: bool = False):
        super().__init__()
        self.flash_attn = flash_attn  # a FlexAttention block mask runs FA4's kernels (`kernels.Kernels`)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.k = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.v = nn.Linear(cfg.model_dim, kv_dim, bias=False)
        self.out = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.rotary = Rotary(cfg.rope_dims or cfg.head_dim, cfg.rope_base)
        self.use_xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.qk_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init)) if cfg.qk_gain_init else None
        self.gate = nn.Parameter(torch.zeros(cfg.num_heads, GATE_INPUT_DIMS)) if cfg.attn_gate else None
        self.gate_scale = cfg.attn_gate_scale
        self.value_embed_tables = cfg.value_embed_tables
        self.value_embed_scale = nn.Parameter(torch.ones(cfg.value_embed_tables)) \
            if layer in cfg.value_embed_layers else None
        residual = cfg.value_residual and layer > 0
        self.value_mix = nn.Parameter(torch.full((2,), 0.5)) \
            if residual and cfg.value_residual_mode == "linear" else None
        # #569's gated form: one logit per layer, sigmoid(-1.5) = 18 % of v0 at start, so
        # the later layers begin close to their own values and learn how much to share
        self.value_gate = nn.Parameter(torch.full((1,), -1.5)) \
            if residual and cfg.value_residual_mode == "gated" else None

    def forward(self, x: torch.Tensor, v0: torch.Tensor | None = None, value_embed: torch.Tensor | None = None,
                mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) normalized input -> (output (B, T, D), this layer's raw v (B, T, K*E)).
        `value_embed`: (B, T, K*E), or (2, B, T, K*E) with two tables; `mask`: a
        `kernels.attention_mask` (None: plain causal)."""
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v_raw = self.v(x)  # (B, T, K*E)
        v = v_raw
        if self.value_embed_scale is not None and self.value_embed_tables == 2:  # #1453: (2, B, T, K*E)
            scale = self.value_embed_scale.to(v.dtype)
            v = v + 0.1 * (scale[0] * value_embed[0] + scale[1] * value_embed[1])
        elif self.value_embed_scale is not None:
            v = v + 0.1 * self.value_embed_scale * value_embed
        if self.value_mix is not None:
            v = self.value_mix[0] * v0 + self.value_mix[1] * v
        elif self.value_gate is not None:  # v <- (1 - sigmoid(g)) v + sigmoid(g) v0
            v = torch.lerp(v, v0, torch.sigmoid(self.value_gate).to(v.dtype))
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))  # QK-norm, then positions
        if self.qk_gain is not None:
            q = q * self.qk_gain.to(q.dtype)[None, :, None, None]
        y = causal_attention(q, k, v, mask, self.flash_attn)  # (B, H, T, E)
        if self.use_xsa:
            y = self._exclude_self_value(y, v)
        if self.gate is not None:
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., :GATE_INPUT_DIMS], self.gate.to(x.dtype)))  # (B, T, H)
            y = y * g.transpose(1, 2)[..., None]
        return self.out(y.transpose(1, 2).reshape(B, T, D)), v_raw

    def _exclude_self_value(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """XSA: y <- y - (y . v_hat) v_hat per head, v_hat the unit value of the same token
        from the head's KV group (broadcast over the G query heads of the group)."""
        B, H, T, E = y.shape
        groups = y.view(B, self.num_kv_heads, H // self.num_kv_heads, T, E)
        v_hat = F.normalize(v, dim=-1)[:, :, None]  # (B, K, 1, T, E)
        groups = groups - (groups * v_hat).sum(-1, keepdim=True) * v_hat
        return groups.view(B, H, T, E)
