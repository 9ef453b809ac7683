import torch

from pgolf_core.loss import token_nll
from pgolf_core.model import GPT


def _trained_looking(model):
    """Zero-initialised projections make every block the identity; perturb them so the
    test exercises attention and MLP paths for real."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_shapes_and_softcap(tiny_model_config):
    model = GPT(tiny_model_config)
    logits = model(torch.randint(0, tiny_model_config.vocab_size, (3, 17)))
    assert logits.shape == (3, 17, tiny_model_config.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= tiny_model_config.logit_softcap


def test_changing_a_future_token_never_changes_earlier_logits(tiny_model_config):
    model = _trained_looking(GPT(tiny_model_config)).eval()
    idx = torch.randint(0, tiny_model_config.vocab_size, (2, 24))
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % tiny_model_config.vocab_size
        a, b = model(idx), model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_starts_as_identity_blocks_and_every_parameter_gets_a_gradient(tiny_model_config):
    model = GPT(tiny_model_config)
    idx = torch.randint(0, tiny_model_config.vocab_size, (2, 16))
    assert all(b.attn.out.weight.abs().sum() == 0 and b.mlp.down.weight.abs().sum() == 0 for b in model.blocks)
    _trained_looking(model)
    token_nll(model(idx[:, :-1]), idx[:, 1:]).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_token_nll_matches_log_softmax(tiny_model_config):
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_nll(logits, targets).double(), expected, rtol=1e-6, atol=1e-6)
