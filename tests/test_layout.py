"""Every layout and codec round-trips the artifact bit for bit, permutations included;
the int8 attention gate matches a float64 reference; tampering is refused."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from _quant_models import MODEL_CONFIG, random_state
from pgolf_core.artifact import compare_exact, pack_artifact, read_header, unpack_artifact
from pgolf_core.compress import CODEC_IDS, lrzip_binary
from pgolf_core.config import CategoryBits, QuantizeConfig
from pgolf_core.layout import Layout, decode, encode, nn_order
from pgolf_core.quant import dequantize
from pgolf_core.quant.lqer import add_lqer
from pgolf_core.quant.rtn import quantize_rtn

LAYOUTS = [o + n + s for o in ("row", "col") for n in ("", "+nn") for s in ("", "+shuffle")]
CODECS = [c for c in CODEC_IDS if c != "lrzip" or lrzip_binary()]
CFG = QuantizeConfig(bits=CategoryBits(attention=6, mlp=5, embedding=7, other=6), clip="sdclip",
                     passthrough_max_numel=100, gate_int8=True)


@pytest.fixture(scope="module")
def qm():
    state = random_state(seed=1)
    return add_lqer(quantize_rtn(state, CFG), state, rank=2, top_k=2)[0]


@pytest.mark.parametrize("layout,codec", list(itertools.product(LAYOUTS, CODECS)))
def test_every_layout_and_codec_round_trips_bit_exactly(qm, layout, codec):
    blob, report = pack_artifact(qm, MODEL_CONFIG, [codec], [layout])
    assert set(report["layout_per_group"].values()) == {layout}
    assert set(report["compressor_per_group"].values()) == {codec}
    back, config = unpack_artifact(blob)
    assert config == MODEL_CONFIG and compare_exact(back, qm) == []
    assert list(back.tensors) == list(qm.tensors)


def test_the_smallest_layout_and_codec_win_per_group(qm):
    _, report = pack_artifact(qm, MODEL_CONFIG, ["zlib", "zstd"], LAYOUTS)
    for group, size in report["bytes_per_group"].items():
        alone = [pack_artifact(qm, MODEL_CONFIG, [c], [lay])[1]["bytes_per_group"][group]
                 for lay in LAYOUTS for c in ("zlib", "zstd")]
        assert size == min(alone)


def _reference_nn_order(m: np.ndarray) -> list[int]:
    """Greedy chain by Euclidean distance in float64, ties to the lowest index, brute force."""
    left, order = set(range(1, len(m))), [0]
    while left:
        cur = m[order[-1]].astype(np.float64)
        order.append(min(left, key=lambda j: (float(((m[j].astype(np.float64) - cur) ** 2).sum()), j)))
        left.remove(order[-1])
    return order


def test_nn_order_is_the_greedy_chain():
    m = np.random.default_rng(0).integers(-7, 8, size=(40, 9)).astype(np.int8)
    assert nn_order(m).tolist() == _reference_nn_order(m)


def test_encode_stores_the_permutation_and_decode_checks_it():
    rng = np.random.default_rng(1)
    a = rng.integers(-31, 32, size=(12, 5)).astype(np.int8)
    b = rng.integers(-31, 32, size=(7, 6)).astype(np.int8)
    tail = rng.standard_normal(10).astype("<f2").tobytes()
    raw = a.tobytes() + b.tobytes() + tail
    matrices = [(0, 12, 5, "a"), (60, 7, 6, "b")]
    for name in LAYOUTS:
        lay = Layout.parse(name)
        data = encode(raw, matrices, 102, lay)
        assert decode(data, matrices, 102, len(raw), lay) == raw
        if lay.nn:
            perm = np.frombuffer(data[:24], dtype="<u2")
            assert perm.tolist() == nn_order(a).tolist()
            body = np.frombuffer(data[38:38 + 60], dtype=np.int8).reshape((5, 12) if lay.order == "col" else (12, 5))
            assert np.array_equal(body.T if lay.order == "col" else body, a[perm.astype(int)])
            bad = bytearray(data)
            bad[0:2] = bad[2:4]  # a row index twice: not a permutation
            with pytest.raises(ValueError, match="tensor 'a'.*not a permutation"):
                decode(bytes(bad), matrices, 102, len(raw), lay)
        if name == "row":
            assert data == raw
        if "col" in name or "shuffle" in name:  # from the name, not from what parse made of it
            assert data != raw
        # the fp16 tail (the last 20 bytes) with "shuffle": every low byte, then every high byte
        assert data[-20:] == (tail[0::2] + tail[1::2] if "shuffle" in name else tail), name


def test_unknown_layout_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"quantize.layouts\[\]='diag'"):
        QuantizeConfig(layouts=["diag"])
    with pytest.raises(ValueError, match="quantize.layouts is empty"):
        QuantizeConfig(layouts=[])


def test_lrzip_asked_for_but_missing_stops_with_a_message(qm, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ValueError, match="no lrzip binary is on PATH.*quantize.compressors"):
        pack_artifact(qm, MODEL_CONFIG, ["zlib", "lrzip"])


def test_tampered_artifact_is_refused(qm):
    blob, _ = pack_artifact(qm, MODEL_CONFIG, ["zlib"], ["col+nn+shuffle"])
    header = read_header(blob)
    assert {g["layout"] for g in header["groups"]} == {"col+nn+shuffle"}
    for pos in (30, len(blob) // 2, len(blob) - 40):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError):
            unpack_artifact(bytes(bad))
    old = bytearray(blob)
    old[8:10] = (2).to_bytes(2, "little")
    with pytest.raises(ValueError, match="format version 2 .* re-run the quantize stage"):
        unpack_artifact(bytes(old))


def _reference_gate(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 per row in float64: scale = fp16(max|row|/127) (one fp16 step up if it would
    clip), q = round(w / scale) in [-127, 127]; returns (q, scale as float64)."""
    amax = np.abs(w).max(axis=1)
    scale = (amax / 127).astype(np.float16)
    low = scale.astype(np.float64) * 127.5 < amax
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    scale[amax == 0] = 1
    s = scale.astype(np.float64)
    return np.clip(np.round(w / s[:, None]), -127, 127), s


def test_gate_int8_round_trip_is_exact_against_a_float64_reference(qm):
    state = random_state(seed=1)
    w = state["blocks.0.attn.gate"].double().numpy()
    q, s = _reference_gate(w)
    t = qm.tensors["blocks.0.attn.gate"]
    assert t.kind == "int8" and t.bits == 8 and np.array_equal(t.q.numpy(), q.astype(np.int8))
    assert np.array_equal(t.scale.numpy().astype(np.float64), s)
    back = dequantize(unpack_artifact(pack_artifact(qm, MODEL_CONFIG, ["zlib"])[0])[0])["blocks.0.attn.gate"]
    assert np.array_equal(back.double().numpy(), q * s[:, None])  # exact: 8-bit q times an fp16 scale
    assert np.abs(back.double().numpy() - w).max() <= s.max() / 2 + 1e-12


def test_gate_category_and_group(qm):
    blob, report = pack_artifact(qm, MODEL_CONFIG, ["zlib"])
    header = read_header(blob)
    assert header["bits_per_category"]["gate"] == 8 and "gate" in report["bytes_per_group"]
    off = quantize_rtn(random_state(seed=1), QuantizeConfig(passthrough_max_numel=10))
    assert off.tensors["blocks.0.attn.gate"].kind == "fp16"  # gate_int8 off: fp16 whatever the size
    assert torch.equal(off.tensors["blocks.0.attn.gate"].data, random_state(seed=1)["blocks.0.attn.gate"].half())
    # the gate's bytes: its int8 group plus the rest of the passthrough, against the fp16 gate inside it
    with_int8 = pack_artifact(quantize_rtn(random_state(seed=1), CFG), MODEL_CONFIG, ["zlib"])[1]["bytes_per_group"]
    with_fp16 = pack_artifact(quantize_rtn(random_state(seed=1), dataclasses.replace(CFG, gate_int8=False)),
                              MODEL_CONFIG, ["zlib"])[1]["bytes_per_group"]
    assert "gate" not in with_fp16 and with_int8["gate"] + with_int8["passthrough"] < with_fp16["passthrough"]


def test_a_cache_shared_between_models_never_reuses_bytes_laid_out_for_other_shapes():
    """The same integers in matrices of other shapes are other bytes once a layout
    reorders them: the pack cache must tell them apart."""
    from pgolf_core.quant import QuantizedModel, QuantizedTensor

    ints = torch.randint(-15, 16, (64,), generator=torch.Generator().manual_seed(0), dtype=torch.int8)

    def model(shape_fc, shape_proj):
        def tensor(q):
            return QuantizedTensor(shape=tuple(q.shape), dtype="float32", bits=5, q=q.clone(),
                                   scale=torch.ones(q.shape[0], dtype=torch.float16))
        return QuantizedModel(tensors={"blocks.0.mlp.fc.weight": tensor(ints[:32].reshape(shape_fc)),
                                       "blocks.0.mlp.proj.weight": tensor(ints[32:].reshape(shape_proj))},
                              method="rtn")

    cache: dict = {}
    pack_artifact(model((4, 8), (8, 4)), {}, ["zlib"], ["col"], cache=cache)
    other = model((8, 4), (4, 8))
    blob, _ = pack_artifact(other, {}, ["zlib"], ["col"], cache=cache)
    assert blob == pack_artifact(other, {}, ["zlib"], ["col"])[0]
    assert compare_exact(unpack_artifact(blob)[0], other) == []
