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
from pgolf_core.quant.sdclip_search import least_error_within, output_error

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
    assert set(report["sdclip_search"]["error"]) == set(want) == {"attention", "mlp", "embedding", "other"}
    for category, by_k in want.items():
        got = report["sdclip_search"]["error"][category]
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
        assert report["sdclip_search"]["error"]["other"][k] == pytest.approx(weight_error, rel=1e-9)


def test_search_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="quantize.sdclip_search chooses SDClip's k, but quantize.clip is 'percentile'"):
        QuantizeConfig(sdclip_search=[10.0])
    with pytest.raises(ValueError, match="quantize.sdclip_search: -1 is not a positive k"):
        QuantizeConfig(clip="sdclip", sdclip_search=[8.0, -1])
    assert QuantizeConfig(clip="sdclip", sdclip_search=[8.0]).uses_hessians
    assert not QuantizeConfig(clip="sdclip").uses_hessians
    with pytest.raises(ValueError, match="quantize.sdclip_search needs the calibration Hessians"):
        quantize_model(random_state(), CFG, None)


def _packed_size(qm, cfg):
    from _quant_models import MODEL_CONFIG
    from pgolf_core.artifact import pack_artifact

    return len(pack_artifact(qm, MODEL_CONFIG, cfg.compressors, cfg.layouts, chunk_bytes=cfg.chunk_bytes)[0])


def _every_combination(state, inputs, cfg, code_bytes):
    """Per combination of candidate k (one per category): (summed output error on the inputs
    themselves, artifact bytes with code), each combination quantized and packed for real."""
    import itertools

    from pgolf_core.quant.lqer import add_lqer

    out = {}
    categories = ("attention", "embedding", "mlp", "other")
    for ks in itertools.product(cfg.sdclip_search, repeat=len(categories)):
        fixed = dataclasses.replace(cfg, sdclip_search=[], sdclip_search_bytes=0,
                                    sdclip_k=CategoryClip(**dict(zip(categories, ks))))
        integers = quantize_rtn(state, fixed)
        deq = dequantize(integers)
        err = sum(float((((state[n].double() - deq[n].double()) @ x.T) ** 2).sum() / len(x)) for n, x in inputs.items())
        shipped = add_lqer(integers, state, cfg.lqer_rank, cfg.lqer_top_k)[0] if cfg.lqer_rank else integers
        out[ks] = (err, _packed_size(shipped, cfg) + code_bytes)
    return categories, out


@pytest.mark.parametrize("lqer_rank", [0, 2])
def test_under_a_byte_target_the_search_takes_the_least_error_combination_that_fits(lqer_rank):
    """Every combination of candidates is quantized and packed here; the search must pick the
    one of least output error among those that fit, and its artifact must fit. The target
    sits in a wide gap between combinations' sizes, so that no few bytes of compressed
    header decide it, and between the smallest combination and the least-error one, so
    that it binds."""
    from _quant_models import MODEL_CONFIG

    state = heavy_tailed_state(seed=5)
    inputs, hessians = calibration_inputs(state, seed=6)
    code = 1234
    cfg = dataclasses.replace(CFG, sdclip_search=[2.0, 4.0, 30.0], compressors=["zlib"], lqer_rank=lqer_rank,
                              lqer_top_k=2)
    categories, table = _every_combination(state, inputs, cfg, code)
    least_error = min(table, key=lambda ks: table[ks][0])
    smallest = min(table, key=lambda ks: table[ks][1])
    sizes = sorted({size for _, size in table.values() if size < table[least_error][1]}, reverse=True)
    for high, low in zip(sizes, sizes[1:]):  # the largest target below the least-error size, in a gap
        target = (low + high) // 2
        want = min((ks for ks in table if table[ks][1] <= target), key=lambda ks: table[ks][0])
        if high - low > 32 and want != smallest:
            break
    else:
        raise AssertionError(f"no gap of over 32 bytes: {sizes}")
    assert want not in (least_error, smallest)  # the target binds, and bytes alone would choose otherwise

    run = dataclasses.replace(cfg, sdclip_search_bytes=target)
    qm, report = quantize_model(state, run, hessians, model_config=MODEL_CONFIG, code_bytes=code)
    assert tuple(report["sdclip_k"][c] for c in categories) == want
    assert _packed_size(qm, run) + code <= target
    assert report["sdclip_search"]["model_bytes"] + code == table[want][1]
    assert report["sdclip_search"]["packs"] >= len(cfg.sdclip_search) + 1


def test_an_unreachable_byte_target_is_refused_by_name():
    from _quant_models import MODEL_CONFIG

    state = heavy_tailed_state(seed=5)
    _, hessians = calibration_inputs(state, seed=6)
    run = dataclasses.replace(CFG, sdclip_search=[2.0, 4.0], compressors=["zlib"], sdclip_search_bytes=1000)
    with pytest.raises(ValueError, match="quantize.sdclip_search_bytes=1,000 is out of reach"):
        quantize_model(state, run, hessians, model_config=MODEL_CONFIG, code_bytes=10)
    with pytest.raises(ValueError, match="quantize.sdclip_search_bytes chooses among the k of quantize.sdclip_search"):
        QuantizeConfig(clip="sdclip", sdclip_search_bytes=100_000)
    with pytest.raises(ValueError, match="quantize.sdclip_search_bytes=16000001: must lie in"):
        QuantizeConfig(clip="sdclip", sdclip_search=[4.0], sdclip_search_bytes=16_000_001)


def test_the_stage_reports_the_search_and_lands_under_its_byte_target(tmp_path):
    """The quantize stage with the search: first by error alone, then with a byte target one
    byte under that artifact, which must change the choice and land at or under it, with
    the shipped script's bytes counted."""
    from pgolf_core import calibration, checkpoint
    from pgolf_core.config import ModelConfig, build_section
    from pgolf_core.model import GPT
    from pgolf_core.stage import quantize

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint.save_model(tmp_path / "model.safetensors", model)
    state, _ = checkpoint.read_model_file(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    hessians = {}
    for name, t in state.items():
        if t.ndim == 2 and t.numel() > 256 and category_of(name) != "gate":
            x = torch.randn(200, t.shape[1], generator=g)
            hessians[name] = x.T @ x / len(x)
    calibration.save_hessians(tmp_path / "h.safetensors", calibration.Calibration(
        hessians=hessians, rows=dict.fromkeys(hessians, 200), calls=dict.fromkeys(hessians, 1), aliases={},
        tokens=200, seconds=0.0))
    (tmp_path / "train_gpt.py").write_text("print('the shipped script')\n" * 50)
    code = (tmp_path / "train_gpt.py").stat().st_size
    paths = quantize.QuantizePaths(model=tmp_path / "model.safetensors", hessians=tmp_path / "h.safetensors",
                                   out=tmp_path / "artifact", reference=tmp_path / "ref.safetensors",
                                   script=tmp_path / "train_gpt.py", metrics=tmp_path / "q.json")
    section = {"passthrough_max_numel": 256, "clip": "sdclip", "sdclip_search": [1.0, 3.0, 30.0],
               "compressors": ["zlib"], "bits": dict.fromkeys(("attention", "mlp", "embedding", "other"), 6)}
    by_error = quantize.run(build_section("quantize", section), paths)
    assert set(by_error.metrics["sdclip_search_error"]["mlp"]) == {"1", "3", "30"}
    assert "sdclip_search_group_bytes" not in by_error.metrics
    target = by_error.metrics["model_bytes"] + code - 1
    fitted = quantize.run(build_section("quantize", {**section, "sdclip_search_bytes": target}), paths)
    assert (tmp_path / "artifact" / "model.bin").stat().st_size + code <= target
    assert fitted.metrics["sdclip_k"] != by_error.metrics["sdclip_k"]
    assert set(fitted.metrics["sdclip_search_group_bytes"]["attention"]) == {"1", "3", "30"}
    assert fitted.metrics["sdclip_search_packs"] >= 4
    assert f"within {target:,} bytes with code" in "\n".join(fitted.summary)


def test_least_error_within_is_the_brute_force_choice_under_the_budget():
    """Random errors and sizes, every budget between the smallest and the largest sum: the
    choice is the least summed error among combinations at most the budget and not
    excluded (ties: fewer bytes, then larger k), checked against an enumeration here."""
    rng = np.random.default_rng(8)
    ks = [10.0, 11.5, 13.0, 16.0]
    categories = ["attention", "embedding", "mlp"]
    errors = {c: {k: float(rng.integers(1, 6)) for k in ks} for c in categories}  # small integers: ties occur
    sizes = {c: {k: int(rng.integers(100, 200)) for k in ks} for c in categories}
    combos = [dict(zip(categories, choice)) for choice in np.array(np.meshgrid(ks, ks, ks)).T.reshape(-1, 3).tolist()]

    def brute(budget, excluded):
        fits = [c for c in combos if sum(sizes[k][v] for k, v in c.items()) <= budget
                and tuple(sorted(c.items())) not in excluded]
        if not fits:
            return None
        return min(fits, key=lambda c: (sum(errors[k][v] for k, v in c.items()),
                                        sum(sizes[k][v] for k, v in c.items()),
                                        [-c[k] for k in categories]))

    totals = sorted({sum(sizes[k][v] for k, v in c.items()) for c in combos})
    for budget in range(totals[0] - 1, totals[-1] + 2, 7):
        want = brute(budget, set())
        assert least_error_within(errors, sizes, budget) == want, budget
        if want is not None:
            excluded = {tuple(sorted(want.items()))}
            assert least_error_within(errors, sizes, budget, excluded) == brute(budget, excluded), budget
