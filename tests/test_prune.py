"""Magnitude pruning removes exactly its fraction; the ±1 candidates come in order of
least damage; fit_bytes lands at or under its target with the code counted."""

import pytest
import torch

from _quant_models import MODEL_CONFIG, random_state
from pgolf_core.artifact import compare_exact, pack_artifact, unpack_artifact
from pgolf_core.config import CategoryBits, QuantizeConfig
from pgolf_core.quant.fit import pack_to_fit
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.quant.prune import prune_matrix, prune_state, unit_candidates, zero_cheapest
from pgolf_core.quant.rtn import quantize_rtn

CFG = QuantizeConfig(bits=CategoryBits(attention=5, mlp=5, embedding=5, other=5), clip="sdclip",
                     passthrough_max_numel=100)


@pytest.mark.parametrize("fraction", [0.02, 0.03, 0.25])
def test_magnitude_pruning_removes_exactly_the_fraction(fraction):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    out = prune_matrix(w, fraction)
    zeroed = out == 0
    assert int(zeroed.sum()) == round(fraction * w.numel())
    assert w[zeroed].abs().max() <= w[~zeroed].abs().min()  # the smallest magnitudes went
    assert torch.equal(out[~zeroed], w[~zeroed])


@pytest.mark.parametrize("passthrough", [100, 40])  # at 40 the gate (48 entries) is large enough, and still kept
def test_prune_state_touches_only_quantized_matrices(passthrough):
    state = random_state()
    pruned = prune_state(state, 0.1, passthrough_max_numel=passthrough)
    for name, t in state.items():
        quantized = t.ndim == 2 and t.numel() > passthrough and not name.endswith(".gate")
        assert int((pruned[name] == 0).sum()) == (round(0.1 * t.numel()) if quantized else 0), name
    assert pruned["blocks.0.attn.gate"] is state["blocks.0.attn.gate"]
    qm, _ = quantize_model(state, QuantizeConfig(prune_fraction=0.1, passthrough_max_numel=passthrough))
    q = qm.tensors["blocks.0.mlp.fc.weight"].q
    assert int((q == 0).sum()) >= round(0.1 * q.numel())


def test_gptq_keeps_the_pruned_entries_zero():
    """GPTQ pushes each column's error onto later columns; without the mask it refills
    pruned entries, and prune_fraction would not mean its zeros."""
    state = random_state(seed=3)
    g = torch.Generator().manual_seed(4)
    hessians = {}
    for name, t in state.items():
        if t.ndim == 2 and t.numel() > 100 and not name.endswith(".gate"):
            x = torch.randn(400, t.shape[1], generator=g) @ torch.randn(t.shape[1], t.shape[1], generator=g)
            hessians[name] = x.T @ x / len(x)
    cfg = QuantizeConfig(method="gptq", prune_fraction=0.25, passthrough_max_numel=100, clip="sdclip",
                         bits=CategoryBits(attention=6, mlp=6, embedding=6, other=6))
    qm, _ = quantize_model(state, cfg, hessians)
    pruned = prune_state(state, 0.25, passthrough_max_numel=100)
    for name in hessians:
        zeroed = (pruned[name] == 0) & (state[name] != 0)
        assert int(zeroed.sum()) == round(0.25 * state[name].numel()), name
        assert not qm.tensors[name].q[zeroed].any(), name


def test_candidates_are_the_unit_integers_by_least_damage():
    qm = quantize_rtn(random_state(seed=2), CFG)
    cand = unit_candidates(qm)
    units = sum(int((t.q.abs() == 1).sum()) for n, t in qm.tensors.items() if t.kind == "int8")
    assert len(cand) == units > 0
    damage = [float(qm.tensors[cand.names[i]].scale[f // qm.tensors[cand.names[i]].q.shape[1]].double()) ** 2
              for i, f in zip(cand.tensor.tolist(), cand.flat.tolist())]
    assert damage == sorted(damage)
    n = len(cand) // 3
    pruned = zero_cheapest(qm, cand, n)
    changed = sum(int((pruned.tensors[k].q != qm.tensors[k].q).sum()) for k in qm.tensors if qm.tensors[k].kind == "int8")
    assert changed == n
    left = unit_candidates(pruned)
    assert len(left) == len(cand) - n
    worst_zeroed = max(damage[:n])
    assert all(float(pruned.tensors[left.names[i]].scale[f // pruned.tensors[left.names[i]].q.shape[1]].double()) ** 2
               >= worst_zeroed for i, f in zip(left.tensor.tolist(), left.flat.tolist()))


@pytest.fixture(scope="module")
def code():
    return 61_398  # a shipped script's bytes (the CPU profile's train_gpt.py, 2026-12-04): any size will do


@pytest.mark.parametrize("chunk_bytes", [0, 700])  # 700: every group of this model in several chunks
def test_fit_bytes_lands_at_or_under_its_target_with_code_counted(code, chunk_bytes):
    qm = quantize_rtn(random_state(seed=4, scale=0.05), CFG)
    _, base = pack_artifact(qm, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"], chunk_bytes=chunk_bytes)
    assert (max(base["chunks_per_group"].values()) > 1) == (chunk_bytes > 0)
    target = code + base["model_bytes"] - 150
    packed, blob, report, fit = pack_to_fit(qm, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"], target, code,
                                            chunk_bytes)
    assert len(blob) + code <= target and fit["artifact_bytes"] == len(blob) + code
    assert report["model_bytes"] == len(blob)
    assert 0 < fit["zeroed"] < fit["candidates"] and fit["probes"] >= 1
    back, _ = unpack_artifact(blob)
    assert compare_exact(back, packed) == []
    assert compare_exact(back, zero_cheapest(qm, unit_candidates(qm), fit["zeroed"])) == []
    # a clearly smaller count would not have fit: the search does not zero far more than needed
    fewer = zero_cheapest(qm, unit_candidates(qm), fit["zeroed"] // 2)
    assert len(pack_artifact(fewer, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"], chunk_bytes=chunk_bytes)[0]) \
        + code > target


def test_fit_bytes_off_or_already_under_zeroes_nothing(code):
    qm = quantize_rtn(random_state(seed=4), CFG)
    blob0, _ = pack_artifact(qm, MODEL_CONFIG, ["zlib"])
    for target in (0, len(blob0) + code):
        packed, blob, _, fit = pack_to_fit(qm, MODEL_CONFIG, ["zlib"], ["row"], target, code, 0)
        assert fit["zeroed"] == 0 and blob == blob0 and packed is qm


def test_unreachable_fit_bytes_names_the_key(code):
    qm = quantize_rtn(random_state(seed=4), CFG)
    with pytest.raises(ValueError, match="quantize.fit_bytes=.*out of reach"):
        pack_to_fit(qm, MODEL_CONFIG, ["zlib"], ["row"], code + 500, code, 0)


def _padding_packs(monkeypatch, *, full: int = 0, probe: int = 0):
    """Make the full layout/codec search's packs (`full`) or the search's one-choice probes
    (`probe`) that many bytes longer: the header that names each group's choice can grow
    by a few bytes between the two, which real codecs only show near a budget's edge."""
    from pgolf_core.quant import fit as fit_module

    real = fit_module.pack_artifact

    def padded(*args, **kwargs):
        blob, report = real(*args, **kwargs)
        extra = probe if kwargs.get("choices") else full
        return blob + b"\0" * extra, {**report, "model_bytes": len(blob) + extra}

    monkeypatch.setattr(fit_module, "pack_artifact", padded)


def test_fit_ships_the_probe_that_fitted_when_the_full_search_comes_out_larger(monkeypatch, code):
    qm = quantize_rtn(random_state(seed=4, scale=0.05), CFG)
    _, base = pack_artifact(qm, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"])
    target = code + base["model_bytes"] - 150
    _padding_packs(monkeypatch, full=1000)  # the full search never fits: only a probe can
    packed, blob, report, fit = pack_to_fit(qm, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"], target, code, 0)
    assert len(blob) + code <= target and fit["shipped_pack"] == "probe" and report["model_bytes"] == len(blob)
    back, _ = unpack_artifact(blob)  # a probe is a whole artifact, not padded
    assert compare_exact(back, packed) == [] and compare_exact(back, zero_cheapest(qm, unit_candidates(qm),
                                                                                   fit["zeroed"])) == []


def test_fit_asks_the_full_search_before_calling_a_target_out_of_reach(monkeypatch, code):
    qm = quantize_rtn(random_state(seed=4, scale=0.05), CFG)
    everything = zero_cheapest(qm, unit_candidates(qm), len(unit_candidates(qm)))
    smallest = len(pack_artifact(everything, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"])[0])
    _padding_packs(monkeypatch, probe=1000)  # no probe fits: only the full search at the largest count does
    packed, blob, _, fit = pack_to_fit(qm, MODEL_CONFIG, ["zlib", "zstd"], ["row", "col"], code + smallest, code, 0)
    assert len(blob) == smallest and fit["zeroed"] == fit["candidates"] and fit["shipped_pack"] == "full search"
    assert compare_exact(unpack_artifact(blob)[0], packed) == []


def test_prune_and_fit_keys_are_checked():
    with pytest.raises(ValueError, match="quantize.prune_fraction"):
        QuantizeConfig(prune_fraction=1.0)
    with pytest.raises(ValueError, match="quantize.fit_bytes"):
        QuantizeConfig(fit_bytes=16_000_001)
    with pytest.raises(ValueError, match="quantize.lqer_rank"):
        QuantizeConfig(lqer_rank=-1)
    with pytest.raises(ValueError, match="quantize.chunk_bytes"):
        QuantizeConfig(chunk_bytes=-1)
