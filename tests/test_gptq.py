"""GPTQ against a plain float64 implementation written here, against RTN on the output
error it exists to lower, and on the matrices that break naive implementations."""

import numpy as np
import pytest
import torch

from pgolf_core.config import CategoryBits, QuantizeConfig
from pgolf_core.quant import dequantize
from pgolf_core.quant.gptq import gptq_matrix, quantize_gptq
from pgolf_core.quant.rtn import quantize_rows, quantize_rtn, row_grid


def reference_gptq(w, h, scale, bits, damp, act_order, zero_mask=None):
    """Column by column, every later column updated at once (no blocks), in numpy float64;
    entries of `zero_mask` are set to 0 instead of rounded, their error propagated alike."""
    w, h, s = np.array(w, dtype=np.float64), np.array(h, dtype=np.float64), np.array(scale, dtype=np.float64)
    zero_mask = np.zeros(w.shape, dtype=bool) if zero_mask is None else np.array(zero_mask)
    qmax = 2 ** (bits - 1) - 1
    cols = w.shape[1]
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h = h + damp * np.mean(np.diag(h)) * np.eye(cols)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w, h, zero_mask = w[:, order], h[np.ix_(order, order)], zero_mask[:, order]
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for j in range(cols):
        q[:, j] = np.where(zero_mask[:, j], 0.0, np.clip(np.round(w[:, j] / s), -qmax, qmax))
        err = (w[:, j] - q[:, j] * s) / upper[j, j]
        w[:, j:] -= np.outer(err, upper[j, j:])
    out = np.zeros_like(q)
    out[:, order] = q
    return out


def correlated_inputs(n, cols, seed, anisotropy=30.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    spread = torch.logspace(0, np.log10(anisotropy), cols, dtype=torch.float64)
    return torch.randn(n, cols, generator=g, dtype=torch.float64) * spread @ mix / cols ** 0.5


def grid(w, bits, k=3.0):
    cfg = QuantizeConfig(clip="sdclip")
    return row_grid(w, bits, cfg, k)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_size", [4, 7, 64])
def test_agrees_with_float64_reference(act_order, block_size):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 24, generator=g) * 0.1
    x = correlated_inputs(200, 24, seed=4)
    h = (x.T @ x / len(x)).float()
    h[5, :] = h[:, 5] = 0.0  # a dead input column
    clip, scale = grid(w, 5)
    got = gptq_matrix(w, h, scale, 5, damp=0.01, block_size=block_size, act_order=act_order)
    want = reference_gptq(w.numpy(), h.numpy(), scale.float().numpy(), 5, 0.01, act_order)
    assert got.dtype == torch.int8
    assert np.array_equal(got.numpy(), want)
    assert not got[:, 5].any()


@pytest.mark.parametrize("act_order", [True, False])
def test_fixed_zeros_stay_zero_and_agree_with_float64_reference(act_order):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(12, 24, generator=g) * 0.1
    mask = torch.rand(12, 24, generator=g) < 0.3
    x = correlated_inputs(200, 24, seed=12)
    h = (x.T @ x / len(x)).float()
    clip, scale = grid(w, 5)
    got = gptq_matrix(w * ~mask, h, scale, 5, block_size=7, act_order=act_order, fixed_zero=mask)
    want = reference_gptq((w * ~mask).numpy(), h.numpy(), scale.float().numpy(), 5, 0.01, act_order, mask.numpy())
    assert np.array_equal(got.numpy(), want)
    assert not got[mask].any()
    free = gptq_matrix(w * ~mask, h, scale, 5, block_size=7, act_order=act_order)
    assert free[mask].any()  # what the mask prevents: error propagation refills pruned entries
    with pytest.raises(ValueError, match="mask of shape"):
        gptq_matrix(w, h, scale, 5, fixed_zero=mask[:, :10])


def test_hessians_of_another_model_are_refused_naming_them():
    state = {"blocks.0.mlp.up.weight": torch.randn(8, 8)}
    with pytest.raises(ValueError, match=r"Hessians of 1 tensor\(s\) the model does not have \('blocks.0.mlp.fc.weight'\)"):
        quantize_gptq(state, {"blocks.0.mlp.fc.weight": torch.eye(8)}, QuantizeConfig(passthrough_max_numel=10))


def _output_error(w, q, scale, x):
    deq = q.double() * scale.double()[:, None]
    return torch.linalg.norm((w.double() - deq) @ x.T).item()


def test_beats_rtn_on_correlated_inputs_and_ties_on_isotropic_ones():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    clip, scale = grid(w, 4 + 2)
    rtn = quantize_rows(w, scale, clip, 6)
    x = correlated_inputs(4000, 96, seed=1)
    gptq = gptq_matrix(w, (x.T @ x / len(x)).float(), scale, 6)
    assert _output_error(w, gptq, scale, x) < 0.5 * _output_error(w, rtn, scale, x)
    iso = torch.randn(4000, 96, generator=g, dtype=torch.float64)
    gptq_iso = gptq_matrix(w, (iso.T @ iso / len(iso)).float(), scale, 6)
    ratio = _output_error(w, gptq_iso, scale, iso) / _output_error(w, rtn, scale, iso)
    assert 0.85 < ratio < 1.05


def test_identity_hessian_gives_rtn_integers():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 40, generator=g)
    w[2, 3] = 30.0  # clamped to the grid's end by both
    for clip_method in ("sdclip", "percentile"):
        clip, scale = row_grid(w, 6, QuantizeConfig(clip=clip_method, clip_percentile=99.0), 2.5)
        assert torch.equal(gptq_matrix(w, torch.eye(40), scale, 6), quantize_rows(w, scale, clip, 6))


def test_zero_row_outlier_and_constant_column_behave():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(10, 32, generator=g) * 0.02
    w[4] = 0.0  # an all-zero row
    w[7, 9] = 50.0  # a huge outlier
    x = correlated_inputs(500, 32, seed=7)
    x[:, 11] = x[:, 12] = 1.0  # two equal constant input columns: H is singular
    h = (x.T @ x / len(x)).float()
    clip, scale = grid(w, 6)
    with pytest.raises(RuntimeError, match="positive-definite"):
        gptq_matrix(w, h, scale, 6, damp=0.0)  # what the damping is for
    q = gptq_matrix(w, h, scale, 6)
    assert scale[4].item() == 1.0 and not q[4].any()
    assert q.abs().max() <= 31 and q[7, 9] == 31


def test_quantize_gptq_routes_like_rtn_and_uses_rtn_without_a_hessian():
    g = torch.Generator().manual_seed(8)
    state = {"blocks.0.mlp.up.weight": torch.randn(48, 32, generator=g) * 0.05,
             "value_embed.weight": torch.randn(64, 16, generator=g) * 0.05,
             "blocks.0.attn_scale": torch.ones(32)}
    x = correlated_inputs(300, 32, seed=9)
    cfg = QuantizeConfig(clip="sdclip", passthrough_max_numel=100, bits=CategoryBits(mlp=5, other=7))
    qm = quantize_gptq(state, {"blocks.0.mlp.up.weight": (x.T @ x / len(x)).float()}, cfg)
    rtn = quantize_rtn(state, cfg)
    assert qm.method == "gptq" and qm.tensors["blocks.0.mlp.up.weight"].bits == 5
    assert torch.equal(qm.tensors["value_embed.weight"].q, rtn.tensors["value_embed.weight"].q)
    assert qm.tensors["value_embed.weight"].bits == 7 and qm.tensors["blocks.0.attn_scale"].kind == "fp16"
    assert torch.equal(qm.tensors["blocks.0.mlp.up.weight"].scale, rtn.tensors["blocks.0.mlp.up.weight"].scale)
    assert set(dequantize(qm)) == set(state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_or_weight_is_refused_by_name(bad):
    w = {"blocks.0.mlp.up.weight": torch.randn(8, 8)}
    h = torch.eye(8)
    h[2, 2] = bad
    with pytest.raises(ValueError, match="Hessian 'blocks.0.mlp.up.weight' holds NaN or Inf"):
        quantize_gptq(w, {"blocks.0.mlp.up.weight": h}, QuantizeConfig(passthrough_max_numel=10))
    w["blocks.0.mlp.up.weight"][1, 1] = bad
    with pytest.raises(ValueError, match="tensor 'blocks.0.mlp.up.weight'.*non-finite"):
        quantize_gptq(w, {"blocks.0.mlp.up.weight": torch.eye(8)}, QuantizeConfig(passthrough_max_numel=10))


def test_hessian_of_the_wrong_shape_is_refused_by_name():
    with pytest.raises(ValueError, match="tensor 'blocks.0.mlp.up.weight'.*does not match"):
        quantize_gptq({"blocks.0.mlp.up.weight": torch.randn(8, 8)}, {"blocks.0.mlp.up.weight": torch.eye(6)},
                      QuantizeConfig(passthrough_max_numel=10))


def test_sdclip_scale_is_k_std_over_qmax_per_category():
    g = torch.Generator().manual_seed(10)
    state = {"blocks.0.attn.q.weight": torch.randn(20, 30, generator=g), "tok_emb.weight": torch.randn(40, 30, generator=g)}
    cfg = QuantizeConfig(clip="sdclip", passthrough_max_numel=10, bits=CategoryBits(attention=6, embedding=8))
    qm = quantize_rtn(state, cfg)
    for name, k, qmax in (("blocks.0.attn.q.weight", cfg.sdclip_k.attention, 31), ("tok_emb.weight", cfg.sdclip_k.embedding, 127)):
        w = state[name].double().numpy()
        ideal = k * w.std(axis=1, ddof=1) / qmax
        got = qm.tensors[name].scale.double().numpy()
        assert np.all(np.abs(got - ideal) <= ideal * 2**-10)
