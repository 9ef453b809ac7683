import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pgolf_core.config import OptimizerConfig, ScheduleConfig
from pgolf_core.model import GPT
from pgolf_core.optim import NS_COEFFICIENTS, Muon, lr_multiplier, muon_momentum, orthogonalize, param_groups
from launch import torchrun

ROOT = Path(__file__).resolve().parents[1]
# Tall, wide and square matrices, several of a shape: the MLP's up (tall) and down (wide)
# projections share a batch, as (16, 8) and (8, 16) do here.
SHAPES = [(8, 16), (16, 8), (16, 8), (12, 12), (8, 16), (4, 16), (4, 16), (16, 8), (4, 16), (4, 16)]


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


def reference_muon_step(weights, grads, bufs, lr, mu, wd, coefficients, row_normalize):
    """One Muon step written plainly, matrix by matrix, in float64."""
    for w, g, b in zip(weights, grads, bufs):
        b.mul_(mu).add_(g)
        u = g + mu * b
        if row_normalize:
            u = u / u.norm(dim=1, keepdim=True)
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / (x.norm() + 1e-7)  # the formula's guard against a zero matrix
        table = NS_COEFFICIENTS[coefficients]
        for i in range(5):
            a, b_, c = table[min(i, len(table) - 1)]
            gram = x @ x.T
            x = a * x + (b_ * gram + c * gram @ gram) @ x
        x = x.T if u.shape[0] > u.shape[1] else x
        w.mul_(1 - lr * wd).sub_(lr * math.sqrt(max(1, u.shape[0] / u.shape[1])) * x)


@pytest.mark.parametrize("coefficients,row_normalize", [("quintic", False), ("polar_express", True)])
def test_muon_matches_a_plain_matrix_by_matrix_step(coefficients, row_normalize):
    """Batching by wide orientation (tall matrices transposed in) changes nothing: three
    steps of mixed shapes agree with the plain float64 formula, decay and MuonEq-R included."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64)) for shape in SHAPES]
    expected = [w.detach().clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in expected]
    opt = Muon(weights, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64,
               ns_coefficients=coefficients, row_normalize=row_normalize)
    for _ in range(3):
        grads = [torch.randn_like(w) + 0.1 for w in expected]
        for w, g in zip(weights, grads):
            w.grad = g.clone()
        opt.step()
        reference_muon_step(expected, grads, bufs, 0.05, 0.9, 0.1, coefficients, row_normalize)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.detach(), e, rtol=1e-10, atol=1e-12)


SHARDED_MUON_SCRIPT = '''
import sys
import torch
import torch.distributed as torch_dist
sys.path.insert(0, sys.argv[1])
from pgolf_core import optim

shapes = [tuple(s) for s in eval(sys.argv[2])]
torch_dist.init_process_group("gloo")
rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
orthogonalized = []  # matrices this process ran Newton-Schulz on
plain_orthogonalize = optim.orthogonalize
def counting_orthogonalize(X, *args):
    orthogonalized.append(X.size(0))
    return plain_orthogonalize(X, *args)
optim.orthogonalize = counting_orthogonalize

torch.manual_seed(0)  # the same weights and gradients on every process, as after DDP's all-reduce
sharded = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
whole = [torch.nn.Parameter(w.detach().clone()) for w in sharded]
opts = [optim.Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, row_normalize=True, shard=shard)
        for params, shard in ((sharded, True), (whole, False))]
for step in range(3):
    grads = [torch.randn_like(w) + 0.1 for w in sharded]
    for params, opt in zip((sharded, whole), opts):
        for w, g in zip(params, grads):
            w.grad = g.clone()
        opt.step()
    if step == 0:
        ran_sharded = sum(orthogonalized[:-3])  # the whole optimizer's 3 batches came last
state = opts[0].state  # weights and momentum: what rank 0's snapshot would hold for every rank
flat = torch.cat([t.flatten() for w in sharded for t in (w.detach(), state[w]["momentum_buffer"])])
every_rank = [torch.empty_like(flat) for _ in range(world)]
torch_dist.all_gather(every_rank, flat)
counts = [torch.zeros(1) for _ in range(world)]
torch_dist.all_gather(counts, torch.tensor([float(ran_sharded)]))
error = max(((a - b).norm() / b.norm()).item() for a, b in zip(sharded, whole))
torch_dist.destroy_process_group()
if not all(torch.equal(flat, other) for other in every_rank):
    sys.exit("the processes' weights or momentum differ after sharded steps")
if error > 1e-6:
    sys.exit(f"sharded Muon differs from whole Muon by {error:.2e}")
if rank == 0:
    print("orthogonalized per rank:", [int(c.item()) for c in counts])
'''


@pytest.mark.slow
def test_sharded_muon_is_the_whole_update_computed_once_across_processes(tmp_path):
    """3 gloo processes, 10 matrices in 3 batches (of 5, 4 and 1 matrices): each process
    orthogonalizes only its blocks (2+2+1, 2+2+0 and 1+0+0), every matrix exactly once, and
    after 3 steps the weights equal the unsharded optimizer's, and weights and momentum are
    identical on all (so rank 0's snapshot resumes every rank)."""
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_MUON_SCRIPT)
    run = subprocess.run([*torchrun(tmp_path, 3),
                          str(script), str(ROOT), repr(SHAPES)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "orthogonalized per rank: [5, 4, 1]" in run.stdout


def test_param_groups_cover_every_parameter_once(tiny_model_config):
    model = GPT(tiny_model_config)
    roles = param_groups(model)
    ids = [id(p) for ps in roles.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.ndim == 2 for p in roles["matrices"]) and roles["embedding"] == [model.tok_emb.weight]


def test_schedules():
    schedule = ScheduleConfig(iterations=100, warmup_steps=10, warmdown_frac=0.5, min_lr_frac=0.1)
    optimizer = OptimizerConfig(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=10)
    assert lr_multiplier(0, 0.0, schedule) == pytest.approx(0.1)
    assert lr_multiplier(20, 0.2, schedule) == 1.0
    assert lr_multiplier(75, 0.75, schedule) == pytest.approx(0.5)
    assert lr_multiplier(99, 0.99, schedule) == pytest.approx(0.1)  # the floor
    assert muon_momentum(0, optimizer) == pytest.approx(0.85) and muon_momentum(50, optimizer) == pytest.approx(0.95)
