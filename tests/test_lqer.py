"""LQER lowers the quantization error where it is applied, stays on its grids, and its
factors survive the artifact and the reference file bit for bit."""

import numpy as np
import pytest
import torch

from _quant_models import MODEL_CONFIG, random_state
from pgolf_core.artifact import compare_exact, pack_artifact, read_reference, unpack_artifact, write_reference
from pgolf_core.config import CategoryBits, QuantizeConfig
from pgolf_core.quant import dequantize, dequantize_tensor
from pgolf_core.quant.lqer import add_lqer, fit_low_rank
from pgolf_core.quant.rtn import quantize_rtn

B_GROUP = 64  # B's integers per fp16 scale: the 04-27 record's groups (issue 20), not the library's constant
CFG = QuantizeConfig(bits=CategoryBits(attention=5, mlp=5, embedding=5, other=5), clip="sdclip",
                     passthrough_max_numel=100)


def reference_product(lq) -> np.ndarray:
    """A·B in float64 from the stored integers and scales, written independently of LowRank.product."""
    a = lq.a.numpy().astype(np.float64) * float(lq.a_scale.numpy().astype(np.float64)[0])
    flat = lq.b.numpy().astype(np.float64).reshape(-1)
    scales = lq.b_scale.numpy().astype(np.float64)
    for g in range(len(scales)):
        flat[g * B_GROUP:(g + 1) * B_GROUP] *= scales[g]
    return a @ flat.reshape(lq.b.shape)


def _error(state, t, name, lqer=True) -> float:
    w = state[name].double().numpy()
    base = t.q.numpy().astype(np.float64) * t.scale.numpy().astype(np.float64)[:, None]
    if lqer and t.lqer is not None:
        base = base + reference_product(t.lqer)
    return float(np.linalg.norm(w - base))


@pytest.fixture(scope="module")
def corrected():
    state = random_state(seed=3)
    qm = quantize_rtn(state, CFG)
    return state, qm, *add_lqer(qm, state, rank=4, top_k=2)


def test_targets_the_top_k_and_lowers_their_error(corrected):
    state, qm, fixed, report = corrected
    errors = {n: _error(state, t, n) for n, t in qm.tensors.items() if t.kind == "int8" and not n.endswith(".gate")}
    top = sorted(errors, key=errors.get, reverse=True)[:2]
    assert [r["name"] for r in report] == top
    for name in top:
        t = fixed.tensors[name]
        assert t.lqer is not None and t.lqer.rank == 4
        after = _error(state, t, name)
        assert after < errors[name]
        assert after == pytest.approx(report[[r["name"] for r in report].index(name)]["error_after"], rel=1e-5)
    for name in set(errors) - set(top):
        assert fixed.tensors[name].lqer is None and fixed.tensors[name] is qm.tensors[name]


def test_factors_on_their_grids_and_dequantized_as_the_reference_says(corrected):
    state, _, fixed, report = corrected
    for r in report:
        t = fixed.tensors[r["name"]]
        lq = t.lqer
        assert lq.a.dtype == torch.int8 and -2 <= lq.a.min() and lq.a.max() <= 1
        assert lq.b.dtype == torch.int8 and -8 <= lq.b.min() and lq.b.max() <= 7
        assert lq.a_scale.dtype == lq.b_scale.dtype == torch.float16
        assert lq.b_scale.shape == (-(-lq.b.numel() // B_GROUP),)
        base = t.q.numpy().astype(np.float64) * t.scale.numpy().astype(np.float64)[:, None]
        np.testing.assert_allclose(dequantize_tensor(t).double().numpy(), base + reference_product(lq),
                                   rtol=0, atol=1e-6)


def test_a_low_rank_error_is_mostly_removed():
    g = torch.Generator().manual_seed(0)
    error = torch.randn(128, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 96, generator=g,
                                                                                dtype=torch.float64)
    lq = fit_low_rank(error, 4)
    left = np.linalg.norm(error.numpy() - reference_product(lq)) / np.linalg.norm(error.numpy())
    assert left < 0.6  # a 2-bit A and 4-bit B keep most of an exactly rank-4 error


def test_a_correction_that_lowers_no_error_is_not_stored():
    """Weights exactly on their grid leave an error of zero: every correction is fitted,
    lowers nothing, and is dropped; the tensors stay the ones quantization made."""
    state = random_state(seed=3)
    qm = quantize_rtn(state, CFG)
    on_grid = {name: dequantize_tensor(t).to(state[name].dtype) if t.kind == "int8" else state[name]
               for name, t in qm.tensors.items()}
    fixed, report = add_lqer(qm, on_grid, rank=4, top_k=2)
    assert len(report) == 2 and not any(r["kept"] for r in report)
    assert all(r["error_before"] == r["error_after"] == 0.0 for r in report)
    assert all(fixed.tensors[name] is t for name, t in qm.tensors.items())


def test_factors_round_trip_exactly_through_artifact_and_reference(corrected, tmp_path):
    _, _, fixed, _ = corrected
    blob, report = pack_artifact(fixed, MODEL_CONFIG, ["zlib", "zstd"])
    assert "lqer" in report["bytes_per_group"]
    back, _ = unpack_artifact(blob)
    assert compare_exact(back, fixed) == []
    for name, t in fixed.tensors.items():
        if t.lqer is not None:
            for part in ("a", "a_scale", "b", "b_scale"):
                assert torch.equal(getattr(back.tensors[name].lqer, part).view(torch.int8 if part in "ab" else
                                                                               torch.int16),
                                   getattr(t.lqer, part).view(torch.int8 if part in "ab" else torch.int16))
    for name, w in dequantize(back).items():
        assert torch.equal(w, dequantize(fixed)[name])
    write_reference(tmp_path / "ref.safetensors", fixed)
    assert compare_exact(read_reference(tmp_path / "ref.safetensors"), fixed) == []
    plain = unpack_artifact(pack_artifact(quantize_rtn(random_state(seed=3), CFG), MODEL_CONFIG, ["zlib"])[0])[0]
    assert sorted(compare_exact(plain, fixed)) == sorted(n for n, t in fixed.tensors.items() if t.lqer is not None)


def test_lqer_bytes_count_in_model_bytes(corrected):
    _, qm, fixed, _ = corrected
    with_lqer = pack_artifact(fixed, MODEL_CONFIG, ["zlib"])[1]
    without = pack_artifact(qm, MODEL_CONFIG, ["zlib"])[1]
    assert with_lqer["model_bytes"] > without["model_bytes"]
    assert with_lqer["model_bytes"] - without["model_bytes"] >= with_lqer["bytes_per_group"]["lqer"]
