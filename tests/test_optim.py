import pytest
import torch

from pgolf_core.config import TrainConfig
from pgolf_core.model import GPT
from pgolf_core.optim import Muon, lr_multiplier, muon_momentum, orthogonalize, param_groups


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96)])
def test_newton_schulz_matches_the_polar_factor_of_an_svd(shape):
    G = torch.randn(*shape, dtype=torch.float64) + 0.1  # a general, never-zero matrix
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    X = orthogonalize(G, steps=5, dtype=torch.float64)
    # X = U diag(f(S)) Vᵀ: in the singular bases of G it is diagonal ...
    D = U.mT @ X @ Vh.mT
    off_diagonal = D - torch.diag(torch.diagonal(D))
    assert off_diagonal.abs().max() < 1e-8
    # ... and the singular values land in the band the quintic coefficients aim for
    sv = torch.diagonal(D)
    # (every direction holding at least 0.2% of ||G||_F; the tiniest ones of a random
    # square matrix grow by ~3.4x per step and have not arrived after 5 steps, by design)
    kept = S / G.norm() > 2e-3
    assert sv[kept].min() > 0.65 and sv.max() < 1.25
    # so X is close to U Vᵀ in the sense Muon needs: the same singular vectors
    polar = U @ Vh
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.95


def test_muon_accepts_only_matrices_and_steps(tiny_model_config):
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    w = torch.nn.Parameter(torch.randn(8, 16))
    before = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn(8, 16)
    opt.step()
    update = (before - w.detach()) / 0.1
    torch.testing.assert_close(update, orthogonalize(w.grad * 1.9), rtol=1e-5, atol=1e-6)  # nesterov: g + mu*(g)


def test_param_groups_cover_every_parameter_once(tiny_model_config):
    model = GPT(tiny_model_config)
    roles = param_groups(model)
    ids = [id(p) for ps in roles.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.ndim == 2 for p in roles["matrices"]) and roles["embedding"] == [model.tok_emb.weight]


def test_schedules():
    cfg = TrainConfig(iterations=100, warmup_steps=10, warmdown_frac=0.5, min_lr_frac=0.1,
                      muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=10)
    assert lr_multiplier(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(20, 0.2, cfg) == 1.0
    assert lr_multiplier(75, 0.75, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, 0.99, cfg) == pytest.approx(0.1)  # the floor
    assert muon_momentum(0, cfg) == pytest.approx(0.85) and muon_momentum(50, cfg) == pytest.approx(0.95)
