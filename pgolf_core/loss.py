"""The training loss: cross-entropy of soft-capped logits, plain and fused.

`softcap_nll` is the plain composition (soft cap, float32 log-softmax, gather) that
evaluation and tests use. `fused_softcap_nll` gives the same values with its gradient
written out. Run eagerly, it makes the gradient in the forward pass and keeps only that
(no float32 tensor over the logits outlives the forward: one record micro-batch has
48 x 2048 x 8192 = 805 M of them). Compiled, Inductor's partitioner keeps the bf16 logits
instead and recomputes the gradient in the backward, which is the floor: one read of the
logits forward (`capped_logsumexp` needs no maximum) and one read and one write backward
(counted in its sm_90 code). `pgolf_core.fused_ce` makes the same passes in two Triton kernels with
fewer instructions per logit (`train.runtime.fused_ce`).

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


# exp(s - cap) of a capped logit lies in (exp(-2 cap), 1]: up to this cap it is a normal
# float32, so the log-sum-exp needs no running maximum
BOUNDED_LSE_MAX_CAP = 40.0


def lse_needs_no_maximum(cap: float) -> bool:
    """Whether logits soft-capped at `cap` bound exp(s - cap) within float32's normal range."""
    return 0 < cap <= BOUNDED_LSE_MAX_CAP


def capped_logsumexp(s: torch.Tensor, cap: float) -> torch.Tensor:
    """logsumexp over the last dim (kept) of logits soft-capped at `cap`, in one pass: with
    |s| < cap the maximum is not needed (a compiled kernel reads the row once, where
    `torch.logsumexp` reads it for the maximum and again for the sum)."""
    if lse_needs_no_maximum(cap):
        return cap + torch.log(torch.exp(s - cap).sum(-1, keepdim=True))
    return torch.logsumexp(s, dim=-1, keepdim=True)


class _FusedSoftcapNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        s = softcap(logits, cap)
        lse = capped_logsumexp(s, cap)
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
