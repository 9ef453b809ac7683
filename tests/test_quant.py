"""Laws of per-row RTN: error bound, fp16-exact scales, routing, refusal of bad weights."""

import numpy as np
import pytest
import torch

from pgolf_core.config import CategoryBits, QuantizeConfig
from pgolf_core.quant import dequantize
from pgolf_core.quant.rtn import quantize_rows, quantize_rtn, row_clip, row_scales


def _weights(rows=48, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier the percentile clip cuts
    return w


def quantize_matrix(w: torch.Tensor, bits: int, clip_percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of one matrix with a percentile clip, composed as `quantize_rtn` composes it."""
    clip = row_clip(w, clip_percentile)
    scale = row_scales(clip, bits)
    return quantize_rows(w, scale, clip, bits), scale


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("pct", [99.0, 99.99, 100.0])
def test_error_within_half_scale_of_clipped_weights(bits, pct):
    w = _weights()
    q, scale = quantize_matrix(w, bits, pct)
    clip = row_clip(w, pct)[:, None]
    w_clipped = torch.maximum(torch.minimum(w, clip), -clip).double()
    deq = q.double() * scale.double()[:, None]
    assert ((w_clipped - deq).abs() <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert q.dtype == torch.int8 and q.abs().max() <= 2 ** (bits - 1) - 1  # symmetric: int6 in [-31, 31]


def test_percentile_matches_numpy_and_100_is_max():
    np = pytest.importorskip("numpy")
    w = _weights()
    got = row_clip(w, 99.5)
    want = torch.from_numpy(np.percentile(w.abs().numpy(), 99.5, axis=1)).float()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.equal(row_clip(w, 100.0), w.abs().amax(dim=1))


def test_scales_are_fp16_and_dequant_uses_them_exactly():
    w = _weights(seed=1)
    q, scale = quantize_matrix(w, 6, 99.9)
    assert scale.dtype == torch.float16
    assert torch.equal(scale.float().half(), scale)  # round trips: fp16-representable
    ideal = row_clip(w, 99.9) / 31  # int6's largest magnitude
    assert ((scale.float() - ideal).abs() <= ideal * 2**-10).all()  # nearest fp16
    qm = quantize_rtn({"m": w}, QuantizeConfig(bits=CategoryBits(attention=6, mlp=6, embedding=6, other=6), clip_percentile=99.9, passthrough_max_numel=16))
    assert torch.equal(dequantize(qm)["m"], q.float() * scale.float()[:, None])


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_scales_are_the_nearest_fp16_moved_up_only_where_the_clip_would_escape(bits):
    """A float64/numpy reference: s = fp16(clip / qmax), one fp16 step up exactly where
    (qmax + 1/2) s < clip (clamped values would then dequantize more than s/2 away)."""
    rng = np.random.default_rng(bits)
    clip = np.concatenate([rng.uniform(1e-3, 4.0, 4000), rng.uniform(1e-6, 1e-4, 1000)]).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    want = (clip.astype(np.float64) / qmax).astype(np.float16)
    escapes = want.astype(np.float64) * (qmax + 0.5) < clip.astype(np.float64)
    want[escapes] = np.nextafter(want[escapes], np.float16(np.inf))
    got = row_scales(torch.from_numpy(clip), bits)
    assert got.dtype == torch.float16
    assert np.array_equal(got.numpy(), want)
    assert (got.double().numpy() * (qmax + 0.5) >= clip).all()


def test_sdclip_gives_a_nonzero_constant_row_its_own_value():
    """A constant row has std 0, so k * std would clip it to nothing: it falls back to
    its max |w| and dequantizes to within half a step of that constant."""
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3] = -0.07
    qm = quantize_rtn({"m": w}, QuantizeConfig(bits=CategoryBits(attention=6, mlp=6, embedding=6, other=6),
                                               clip="sdclip", passthrough_max_numel=16))
    t = qm.tensors["m"]
    step = float(t.scale[3])
    assert 0 < step <= 0.07 / 31 * (1 + 2**-9)  # int6: 31 steps span the constant's magnitude
    assert (dequantize(qm)["m"][3] - w[3]).abs().max() <= step / 2


def test_zero_rows_get_scale_one_and_zero_integers():
    w = _weights()
    w[5] = 0.0
    q, scale = quantize_matrix(w, 8, 99.99)
    assert scale[5].item() == 1.0 and not q[5].any()
    assert torch.isfinite(scale).all()


def test_tiny_rows_keep_the_bound_despite_fp16_underflow():
    w = _weights() * 1e-7  # clip / qmax falls below the smallest fp16 subnormal
    q, scale = quantize_matrix(w, 8, 100.0)
    assert (scale > 0).all()
    deq = q.double() * scale.double()[:, None]
    assert ((w.double() - deq).abs() <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()


def test_routing_large_matrices_quantized_rest_passthrough():
    state = {
        "tok_emb.weight": _weights(64, 32, seed=2),  # 2048 > 1000: int8
        "blocks.0.attn.gain": torch.rand(32) + 0.5,  # 1-D: fp16
        "blocks.0.small": torch.rand(8, 8) + 0.1,  # 64 <= 1000: fp16
    }
    qm = quantize_rtn(state, QuantizeConfig(passthrough_max_numel=1000))
    kinds = {name: t.kind for name, t in qm.tensors.items()}
    assert kinds == {"tok_emb.weight": "int8", "blocks.0.attn.gain": "fp16", "blocks.0.small": "fp16"}
    assert qm.tensors["blocks.0.small"].data.dtype == torch.float16
    out = dequantize(qm)
    for name, t in state.items():
        assert out[name].dtype == torch.float32 and out[name].shape == t.shape
    assert torch.equal(out["blocks.0.attn.gain"], state["blocks.0.attn.gain"].half().float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(bad):
    w = _weights()
    w[1, 2] = bad
    with pytest.raises(ValueError, match="blocks.1.mlp.fc.weight"):
        quantize_rtn({"blocks.1.mlp.fc.weight": w}, QuantizeConfig(passthrough_max_numel=16))
    with pytest.raises(ValueError, match="norm.gain"):
        quantize_rtn({"norm.gain": torch.tensor([1.0, bad])}, QuantizeConfig())


def test_passthrough_beyond_fp16_range_is_refused():
    with pytest.raises(ValueError, match="big.*fp16"):
        quantize_rtn({"big": torch.tensor([1e6, 1.0])}, QuantizeConfig())


def test_row_scales_reject_fp16_overflow():
    with pytest.raises(ValueError, match="overflows fp16"):
        row_scales(torch.tensor([1e9]), 8)


LITE = [99.0, 99.9, 99.99, 100.0]


def _heavy_tailed(rows=48, cols=96, seed=0):
    """Gaussian rows with a few large entries: the best clip differs from row to row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    outliers = torch.rand(rows, cols, generator=g) < torch.linspace(0.0, 0.04, rows)[:, None]
    return torch.where(outliers, w * 12, w)


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_gptq_lite_keeps_per_row_the_percentile_of_least_squared_error(bits):
    """Each row's integers and scale are those RTN gives at one candidate percentile, and
    that candidate's error (float64, here) is the least of all candidates for the row."""
    state = {"blocks.0.mlp.fc.weight": _heavy_tailed(seed=bits)}
    widths = CategoryBits(attention=bits, mlp=bits, embedding=bits, other=bits)
    lite = quantize_rtn(state, QuantizeConfig(method="gptq_lite", lite_percentiles=LITE, bits=widths,
                                              passthrough_max_numel=100))
    assert lite.method == "gptq_lite"
    w = state["blocks.0.mlp.fc.weight"].double()
    t = lite.tensors["blocks.0.mlp.fc.weight"]
    lite_error = ((t.q.double() * t.scale.double()[:, None] - w) ** 2).sum(dim=1)
    per_candidate = []
    for percentile in LITE:
        r = quantize_rtn(state, QuantizeConfig(clip_percentile=percentile, bits=widths, passthrough_max_numel=100))
        rt = r.tensors["blocks.0.mlp.fc.weight"]
        per_candidate.append((rt, ((rt.q.double() * rt.scale.double()[:, None] - w) ** 2).sum(dim=1)))
    least = torch.stack([e for _, e in per_candidate]).min(dim=0).values
    assert torch.equal(lite_error, least)
    for row in range(w.shape[0]):
        assert any(torch.equal(t.q[row], rt.q[row]) and t.scale[row] == rt.scale[row] for rt, _ in per_candidate), row
    chosen = [next(i for i, (_, e) in enumerate(per_candidate) if e[row] == least[row]) for row in range(w.shape[0])]
    assert len(set(chosen)) > 1  # the rows chose differently: a per-row choice, not one percentile


def test_gptq_lite_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="quantize.method 'gptq_lite' chooses each row's clip"):
        QuantizeConfig(method="gptq_lite", clip="sdclip")
    with pytest.raises(ValueError, match="quantize.lite_percentiles: 40 is not a percentile"):
        QuantizeConfig(method="gptq_lite", lite_percentiles=[99.9, 40])
    with pytest.raises(ValueError, match="quantize.lite_percentiles is empty"):
        QuantizeConfig(method="gptq_lite", lite_percentiles=[])
    assert not QuantizeConfig(method="gptq_lite").uses_hessians
