"""The training loss: cross-entropy of soft-capped logits, plain and fused.

`softcap_nll` is the plain composition (soft cap, float32 log-softmax, gather) that
evaluation and tests use. `fused_softcap_nll` gives the same values but computes the
gradient with respect to the raw (bf16) logits already in the forward pass and keeps
only that: under torch.compile the forward becomes one reduction and one pointwise
pass over the (tokens x vocab) logits, and the backward one scaling pass, where the
plain version keeps float32 capped logits and makes several more passes (the logits
of one record micro-batch are 48 x 2048 x 8192 = 805 M values).

Gradient: with s = c tanh(z / c), p = softmax(s), nll = logsumexp(s) - s_y,
d nll / d z = (p - onehot(y)) * (1 - (s / c)^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(z / c) in float32 (the identity, in float32, when cap <= 0)."""
    z = logits.float()
    return cap * torch.tanh(z / cap) if cap > 0 else z


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, shape of `targets`."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view_as(targets)


def softcap_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token NLL of soft-capped logits (B, T, V) -> (B, T); the plain reference."""
    return token_nll(softcap(logits, cap), targets)


class _FusedSoftcapNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        s = softcap(logits, cap)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        hit = torch.arange(s.size(-1), device=s.device) == targets[..., None]
        nll = (lse - s.gather(-1, targets[..., None])).squeeze(-1)
        grad = torch.exp(s - lse) - hit.float()
        if cap > 0:
            grad = grad * (1.0 - (s / cap).square())
        ctx.save_for_backward(grad.to(logits.dtype))
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[..., None].to(grad.dtype), None, None


def fused_softcap_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """`softcap_nll` with its gradient made in the forward pass (training only: the
    forward always pays for the gradient, so use `softcap_nll` without autograd)."""
    return _FusedSoftcapNLL.apply(logits, targets, cap)
