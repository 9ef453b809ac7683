import pytest
import torch

from pgolf_core.loss import fused_softcap_nll, softcap_nll


def reference(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Float64, written out: cap * tanh(z / cap), then -log softmax at the target."""
    s = logits.double()
    s = cap * torch.tanh(s / cap) if cap > 0 else s
    return -(s.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1))


@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_nll_value_and_gradient_match_float64(cap, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 8).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    weights = torch.rand(3, 7) + 0.1  # a non-uniform upstream gradient
    logits64 = logits.detach().double().requires_grad_()  # the same rounded inputs, in float64
    expected = reference(logits64, targets, cap)
    (expected * weights.double()).sum().backward()
    nll = fused_softcap_nll(logits, targets, cap)
    (nll * weights).sum().backward()
    assert nll.dtype == torch.float32 and logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 stores the gradient with 8 bits of mantissa

    def rel_error(out, ref):
        return ((out.double() - ref).norm() / ref.norm()).item()
    assert rel_error(nll, expected.detach()) < 1e-6
    assert rel_error(logits.grad, logits64.grad) < tol
    assert rel_error(softcap_nll(logits.detach(), targets, cap), expected.detach()) < 1e-6


def test_model_uses_the_fused_loss_only_with_autograd(tiny_model_config):
    from pgolf_core.model import GPT

    torch.manual_seed(0)
    model = GPT(tiny_model_config)
    idx = torch.randint(0, tiny_model_config.vocab_size, (2, 9))
    with torch.no_grad():
        plain = model(idx[:, :-1], idx[:, 1:])
    fused = model(idx[:, :-1], idx[:, 1:])
    assert fused.grad_fn is not None and "Fused" in type(fused.grad_fn).__name__
    torch.testing.assert_close(fused.detach(), plain, rtol=1e-6, atol=1e-6)
    from_logits = softcap_nll(model(idx[:, :-1]) * 1.0, idx[:, 1:], 0.0)  # logits are already capped
    torch.testing.assert_close(from_logits.detach(), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap, scale", [(30.0, 8.0), (30.0, 1000.0), (40.0, 1000.0), (60.0, 1000.0)])
def test_capped_logsumexp_matches_float64_without_a_maximum(cap, scale):
    """Under the bound the one-pass form holds even when every logit saturates at -cap or
    +cap; above it (60) the function falls back to torch.logsumexp."""
    from pgolf_core.loss import capped_logsumexp, softcap

    torch.manual_seed(0)
    s = softcap(torch.randn(4, 300) * scale, cap)
    s[0] = -cap + 1e-3  # a whole row at the floor: exp(s - cap) near exp(-2 cap)
    expected = torch.logsumexp(s.double(), -1, keepdim=True)
    got = capped_logsumexp(s, cap)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got.double() - expected).abs() / expected.abs()).max() < 1e-6
