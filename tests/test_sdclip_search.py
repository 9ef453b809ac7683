"""The search over SDClip's k: the error it minimises is the layer-output error on the
calibration inputs (against a float64 computation on the inputs themselves), each
category takes its candidate of least error, and the run then quantizes with that k."""

import dataclasses

import numpy as np
import pytest
import torch

from _quant_models import random_state
from pgolf_core.config import CategoryBits, CategoryClip, QuantizeConfig
from pgolf_core.quant import category_of, dequantize
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.quant.rtn import quantize_rtn
from pgolf_core.quant.sdclip_search import output_error

CANDIDATES = [1.0, 2.0, 4.0, 8.0, 30.0]
CFG = QuantizeConfig(clip="sdclip", passthrough_max_numel=100, sdclip_search=CANDIDATES,
                     bits=CategoryBits(attention=5, mlp=5, embedding=5, other=5))


def heavy_tailed_state(seed=0):
    """The random model with a few large weights per matrix, so that clipping matters."""
    state = random_state(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for name, t in state.items():
        if t.ndim == 2 and t.numel() > 100:
            mask = torch.rand(t.shape, generator=g) < 0.01
            state[name] = torch.where(mask, t * 15, t)
    return state


def calibration_inputs(state, seed=1, rows=300):
    """Per integer matrix, correlated inputs X (rows, in) and H = XᵀX / rows."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, t in state.items():
        if t.ndim == 2 and t.numel() > 100 and category_of(name) != "gate":
            cols = t.shape[1]
            inputs[name] = torch.randn(rows, cols, generator=g, dtype=torch.float64) @ \
                torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    return inputs, {name: (x.T @ x / len(x)).float() for name, x in inputs.items()}


def test_output_error_is_the_outputs_squared_error_per_input_row():
    g = torch.Generator().manual_seed(2)
    w, w_hat = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    direct = float((((w.double() - w_hat.double()) @ x.T) ** 2).sum() / len(x))
    assert output_error(w, w_hat, (x.T @ x / len(x))) == pytest.approx(direct, rel=1e-12)
    assert output_error(w, w_hat, None) == pytest.approx(float(((w.double() - w_hat.double()) ** 2).sum()))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_category_takes_its_candidate_of_least_output_error(method):
    state = heavy_tailed_state()
    inputs, hessians = calibration_inputs(state)
    cfg = dataclasses.replace(CFG, method=method)
    qm, report = quantize_model(state, cfg, hessians)
    # the errors recomputed here: each candidate as every category's k, on the inputs themselves
    want: dict[str, dict[float, float]] = {}
    for k in CANDIDATES:
        alone = dataclasses.replace(cfg, sdclip_search=[], sdclip_k=CategoryClip(**dict.fromkeys(
            ("attention", "mlp", "embedding", "other"), k)))
        deq = dequantize(quantize_model(state, alone, hessians)[0])
        for name in inputs:
            w = state[name].double()
            err = float((((w - deq[name].double()) @ inputs[name].T) ** 2).sum() / len(inputs[name]))
            want.setdefault(category_of(name), {}).setdefault(k, 0.0)
            want[category_of(name)][k] += err
    assert set(report["sdclip_search"]) == set(want) == {"attention", "mlp", "embedding", "other"}
    for category, by_k in want.items():
        got = report["sdclip_search"][category]
        assert list(got) == CANDIDATES
        np.testing.assert_allclose([got[k] for k in CANDIDATES], [by_k[k] for k in CANDIDATES], rtol=1e-4)
        best = min(by_k, key=by_k.get)
        assert report["sdclip_k"][category] == best
        assert best not in (CANDIDATES[0], CANDIDATES[-1]), (category, by_k)  # the trade-off has an interior
    # and the run quantized with the chosen k
    fixed = dataclasses.replace(cfg, sdclip_search=[], sdclip_k=CategoryClip(**report["sdclip_k"]))
    again, _ = quantize_model(state, fixed, hessians)
    for name, t in qm.tensors.items():
        if t.kind == "int8":
            assert torch.equal(t.q, again.tensors[name].q) and torch.equal(t.scale, again.tensors[name].scale), name


def test_a_matrix_without_a_hessian_counts_its_weight_error():
    state = heavy_tailed_state(seed=3)
    _, hessians = calibration_inputs(state)
    del hessians["value_embed.weight"]  # a lookup table: one-hot inputs, no H
    _, report = quantize_model(state, CFG, hessians)
    for k in CANDIDATES:
        deq = dequantize(quantize_rtn(state, dataclasses.replace(CFG, sdclip_search=[], sdclip_k=CategoryClip(
            **dict.fromkeys(("attention", "mlp", "embedding", "other"), k)))))
        weight_error = float(((state["value_embed.weight"].double() - deq["value_embed.weight"].double()) ** 2).sum())
        assert report["sdclip_search"]["other"][k] == pytest.approx(weight_error, rel=1e-9)


def test_search_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="quantize.sdclip_search chooses SDClip's k, but quantize.clip is 'percentile'"):
        QuantizeConfig(sdclip_search=[10.0])
    with pytest.raises(ValueError, match="quantize.sdclip_search: -1 is not a positive k"):
        QuantizeConfig(clip="sdclip", sdclip_search=[8.0, -1])
    assert QuantizeConfig(clip="sdclip", sdclip_search=[8.0]).uses_hessians
    assert not QuantizeConfig(clip="sdclip").uses_hessians
    with pytest.raises(ValueError, match="quantize.sdclip_search needs the calibration Hessians"):
        quantize_model(random_state(), CFG, None)
