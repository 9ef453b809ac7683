"""Artifact laws: bit-exact round trip; any damaged byte, truncation or bad index is refused."""

import hashlib
import json
import zlib

import pytest
import torch

from pgolf_core.artifact import (
    DIGEST_BYTES, MAGIC, PREFIX, compare_exact, group_of, pack_artifact, read_header,
    read_reference, split_chunks, unpack_artifact, write_reference,
)
from pgolf_core.compress import CODEC_IDS
from pgolf_core.config import COMPRESSORS, CategoryBits, QuantizeConfig
from pgolf_core.quant import QuantizedModel, QuantizedTensor, dequantize
from pgolf_core.quant.rtn import quantize_rtn

MODEL_CONFIG = {"num_layers": 1, "model_dim": 16, "vocab_size": 64, "rope_base": 10000.0, "name": "tiny"}


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    return {
        "tok_emb.weight": r(64, 16),
        "blocks.0.attn.q.weight": r(16, 16),
        "blocks.0.attn.gain": r(16) + 1.0,
        "blocks.0.mlp.fc.weight": r(32, 16),
        "blocks.0.mlp.proj.weight": r(16, 32),
        "head_bias_matrix": r(8, 40),  # matches no group pattern -> "other"
        "final_norm.gain": r(16) + 1.0,
    }


@pytest.fixture(scope="module")
def qm():
    return quantize_rtn(_state(), QuantizeConfig(bits=CategoryBits(attention=6, mlp=6, embedding=6, other=6), clip_percentile=99.9, passthrough_max_numel=200))


@pytest.fixture(scope="module")
def packed(qm):
    return pack_artifact(qm, MODEL_CONFIG, list(COMPRESSORS))


def _reseal(blob: bytes, edit, edit_payload=lambda payload: payload) -> bytes:
    """Apply edit(header) and edit_payload(the chunks' bytes), and rebuild a well-formed
    artifact (valid length and sha256)."""
    _, version, _, header_len = PREFIX.unpack_from(blob)
    header = json.loads(zlib.decompress(blob[PREFIX.size:PREFIX.size + header_len]))
    edit(header)
    header_bytes = zlib.compress(json.dumps(header).encode())
    payload = edit_payload(blob[PREFIX.size + header_len:-DIGEST_BYTES])
    total = PREFIX.size + len(header_bytes) + len(payload) + DIGEST_BYTES
    body = PREFIX.pack(MAGIC, version, total, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def test_round_trip_is_bit_exact(qm, packed):
    blob, report = packed
    back, config = unpack_artifact(blob)
    assert compare_exact(qm, back) == []
    assert config == MODEL_CONFIG and back.method == "rtn"
    assert list(back.tensors) == list(qm.tensors)
    a, b = dequantize(qm), dequantize(back)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(back.tensors[n].dtype == "float32" for n in back.tensors)


def test_report_and_groups(packed):
    blob, report = packed
    assert report["model_bytes"] == len(blob)
    assert set(report["bytes_per_group"]) == {"embedding", "attention", "mlp", "other", "passthrough"}
    assert set(report["compressor_per_group"].values()) <= set(CODEC_IDS)
    groups = {t["name"]: t["group"] for t in read_header(blob)["tensors"]}
    assert groups["blocks.0.attn.q.weight"] == "attention" and groups["blocks.0.attn.gain"] == "passthrough"
    assert groups["head_bias_matrix"] == "other"


def test_group_table():
    assert group_of("tok_emb.weight", "int8") == "embedding"
    assert group_of("lm_head.weight", "int8") == "embedding"
    assert group_of("blocks.3.attn.proj.weight", "int8") == "attention"
    assert group_of("blocks.3.mlp.fc.weight", "int8") == "mlp"
    assert group_of("blocks.3.mlp.fc.weight", "fp16") == "passthrough"
    assert group_of("skip_weights", "int8") == "other"


def test_packing_is_deterministic(qm, packed):
    assert pack_artifact(qm, MODEL_CONFIG, list(COMPRESSORS))[0] == packed[0]


def _flip(blob: bytes, pos: int) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ 0x40]) + blob[pos + 1:]


def test_flipped_byte_in_named_places_is_rejected(packed):
    blob = packed[0]
    _, _, _, header_len = PREFIX.unpack_from(blob)
    places = {
        "magic": 0, "version": 8, "length": 12, "header length": 19,
        "header": PREFIX.size + header_len // 2,
        "group payload": PREFIX.size + header_len + 5,
        "last payload byte": len(blob) - DIGEST_BYTES - 1,
        "checksum": len(blob) - 3,
    }
    for place, pos in places.items():
        with pytest.raises(ValueError):
            unpack_artifact(_flip(blob, pos))
    with pytest.raises(ValueError, match="checksum mismatch"):
        unpack_artifact(_flip(blob, places["group payload"]))
    with pytest.raises(ValueError, match="magic"):
        unpack_artifact(_flip(blob, 0))
    with pytest.raises(ValueError, match="unsupported artifact format version"):
        unpack_artifact(_flip(blob, 8))


def test_an_old_version_artifact_is_refused_with_a_message(packed):
    blob = bytearray(packed[0])
    blob[8:10] = (1).to_bytes(2, "little")
    with pytest.raises(ValueError, match="format version 1 .* re-run the quantize stage"):
        unpack_artifact(bytes(blob))


def test_a_version_3_artifact_is_refused_with_a_message(packed):
    blob = bytearray(packed[0])
    blob[8:10] = (3).to_bytes(2, "little")
    with pytest.raises(ValueError, match="format version 3 \\(each group compressed whole, no chunks\\).*re-run"):
        unpack_artifact(bytes(blob))


def test_groups_in_chunks_round_trip_bit_exact(qm, packed):
    blob, report = pack_artifact(qm, MODEL_CONFIG, list(COMPRESSORS), chunk_bytes=100)
    assert compare_exact(qm, unpack_artifact(blob)[0]) == []
    groups = {g["name"]: g for g in read_header(blob)["groups"]}
    for name, g in groups.items():
        # the codec sees the raw payload ("row" layout: no permutations), cut into pieces of 100
        assert len(g["chunks"]) == max(1, -(-g["raw_bytes"] // 100)) == report["chunks_per_group"][name]
        assert sum(g["chunks"]) == report["bytes_per_group"][name]
    assert report["chunks_per_group"]["mlp"] > 1
    # 0 and a size above every group's are one chunk per group: the same artifact as the default's here
    for whole in (0, 10**9):
        assert pack_artifact(qm, MODEL_CONFIG, list(COMPRESSORS), chunk_bytes=whole)[0] == packed[0]
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="chunk_bytes"):
            pack_artifact(qm, MODEL_CONFIG, ["zlib"], chunk_bytes=bad)


def test_chunks_cut_every_length_into_whole_pieces_of_at_most_chunk_bytes():
    data = bytes(range(256)) * 2
    for n in range(0, 350):
        pieces = split_chunks(data[:n], 100)
        assert b"".join(pieces) == data[:n], n
        assert len(pieces) == max(1, -(-n // 100)) and all(len(p) <= 100 for p in pieces), n
    assert split_chunks(data, 0) == [data]


def test_each_group_is_stored_by_its_smallest_codec(qm):
    alone = {codec: pack_artifact(qm, MODEL_CONFIG, [codec], chunk_bytes=150)[1]["bytes_per_group"]
             for codec in COMPRESSORS}
    _, report = pack_artifact(qm, MODEL_CONFIG, list(COMPRESSORS), chunk_bytes=150)
    for group, size in report["bytes_per_group"].items():
        assert size == min(sizes[group] for sizes in alone.values())
        assert alone[report["compressor_per_group"][group]][group] == size


@pytest.mark.parametrize("edit", [
    lambda chunks: chunks.clear(),
    lambda chunks: chunks.__setitem__(0, -chunks[0]),
    lambda chunks: chunks.__setitem__(0, "12"),
    lambda chunks: (chunks.__setitem__(0, chunks[0] - 1), chunks.__setitem__(1, chunks[1] + 1)),  # same total
])
def test_damaged_chunk_table_is_rejected(qm, edit):
    blob, _ = pack_artifact(qm, MODEL_CONFIG, ["zlib"], chunk_bytes=100)

    def damage(header):
        edit(next(g for g in header["groups"] if g["name"] == "mlp")["chunks"])
    with pytest.raises(ValueError, match="mlp"):
        unpack_artifact(_reseal(blob, damage))


def test_every_flipped_byte_is_rejected(packed):
    blob = packed[0]
    for pos in range(len(blob)):
        with pytest.raises(ValueError):
            unpack_artifact(_flip(blob, pos))


@pytest.mark.parametrize("keep", [0, 5, PREFIX.size + 10, -1, -DIGEST_BYTES - 1])
def test_truncated_artifact_is_rejected(packed, keep):
    blob = packed[0]
    cut = blob[:keep] if keep >= 0 else blob[:len(blob) + keep]
    with pytest.raises(ValueError, match="truncated"):
        unpack_artifact(cut)


def test_trailing_bytes_are_rejected(packed):
    with pytest.raises(ValueError, match="trailing"):
        unpack_artifact(packed[0] + b"\0")


def test_undecompressable_group_is_rejected(packed):
    def swap_codec(header):
        g = header["groups"][0]
        g["codec"] = CODEC_IDS["lzma"] if g["codec"] == CODEC_IDS["zlib"] else CODEC_IDS["zlib"]
    with pytest.raises(ValueError, match="cannot be decompressed"):
        unpack_artifact(_reseal(packed[0], swap_codec))


def test_payload_crc_mismatch_is_rejected(packed):
    def bad_crc(header):
        header["groups"][0]["crc32"] ^= 1
    with pytest.raises(ValueError, match="crc32"):
        unpack_artifact(_reseal(packed[0], bad_crc))


@pytest.mark.parametrize("edit", [
    lambda t: t.__setitem__("shape", [t["shape"][0], t["shape"][1] + 1]),
    lambda t: t.__setitem__("shape", [t["shape"][0] * t["shape"][1]]),
    lambda t: t.__setitem__("kind", "int4"),
    lambda t: t.__setitem__("q", [t["q"][0] + 1, t["q"][1]]),
    lambda t: t.__setitem__("group", "nowhere"),
    lambda t: t.pop("scale"),
])
def test_inconsistent_index_is_rejected(packed, edit):
    def damage(header):
        edit(next(t for t in header["tensors"] if t["kind"] == "int8"))
    with pytest.raises(ValueError, match="tensor|malformed"):
        unpack_artifact(_reseal(packed[0], damage))


def test_payload_bytes_that_no_group_declares_are_rejected(packed):
    """Sealed bytes after the last chunk (length and sha256 valid) would load unnoticed and
    count in the artifact's size."""
    with pytest.raises(ValueError, match="declare .* stored bytes, the payload holds"):
        unpack_artifact(_reseal(packed[0], lambda header: None, lambda payload: payload + bytes(7)))


# Four refusals the checks above would each also make for most corruptions: each test below
# builds the one corruption that only its check sees, with sizes, crc32 and sha256 valid.


def test_a_group_listed_twice_is_rejected(packed):
    """The last group's entry and its stored bytes repeated: every size, crc32 and span holds."""
    last = read_header(packed[0])["groups"][-1]
    stored = sum(last["chunks"])
    with pytest.raises(ValueError, match=f"group {last['name']!r} appears twice"):
        unpack_artifact(_reseal(packed[0], lambda header: header["groups"].append(dict(last)),
                                lambda payload: payload + payload[-stored:]))


def test_a_span_read_twice_is_rejected(packed):
    """mlp.proj's q pointed at mlp.fc's (the same 512 bytes): both load, in bounds, and
    proj's own bytes are read by nothing."""
    def share(header):
        entries = {t["name"]: t for t in header["tensors"]}
        fc, proj = entries["blocks.0.mlp.fc.weight"], entries["blocks.0.mlp.proj.weight"]
        assert fc["group"] == proj["group"] and fc["q"][1] == proj["q"][1]
        proj["q"] = list(fc["q"])
    with pytest.raises(ValueError, match="spans must tile the payload"):
        unpack_artifact(_reseal(packed[0], share))


def test_group_bytes_no_tensor_reads_are_rejected(qm):
    """Two bytes appended to the last group's decompressed payload (recompressed, sizes and
    crc32 rewritten): every tensor still loads from its span, and the two bytes would count
    in the artifact's size unread."""
    blob, _ = pack_artifact(qm, MODEL_CONFIG, ["zlib"], chunk_bytes=0)
    last = read_header(blob)["groups"][-1]
    assert last["layout"] == "row" and len(last["chunks"]) == 1  # stored as zlib of the raw bytes
    stored = last["chunks"][0]
    raw = zlib.decompress(blob[-DIGEST_BYTES - stored:-DIGEST_BYTES]) + bytes(2)
    packed_raw = zlib.compress(raw, 9)

    def grow(header):
        header["groups"][-1].update(raw_bytes=len(raw), crc32=zlib.crc32(raw), chunks=[len(packed_raw)])
    with pytest.raises(ValueError, match=f"group {last['name']!r}: tensors cover {len(raw) - 2} bytes, "
                                         f"its payload has {len(raw)}"):
        unpack_artifact(_reseal(blob, grow, lambda payload: payload[:-stored] + packed_raw))


@pytest.mark.parametrize("shift", ["negative", "past_the_end"])
def test_a_span_outside_its_group_is_rejected(packed, shift):
    header = read_header(packed[0])
    raw_bytes = {g["name"]: g["raw_bytes"] for g in header["groups"]}

    def move(header):
        entry = next(t for t in header["tensors"] if t["name"] == "blocks.0.mlp.fc.weight")
        nbytes = entry["q"][1]
        entry["q"] = [-1, nbytes] if shift == "negative" else [raw_bytes[entry["group"]] - nbytes + 1, nbytes]
    with pytest.raises(ValueError, match=r"mlp\.fc\.weight' q: 512 bytes at offset -?\d+ in a \d+-byte group"):
        unpack_artifact(_reseal(packed[0], move))


def test_resealed_unchanged_header_still_loads(qm, packed):
    back, _ = unpack_artifact(_reseal(packed[0], lambda h: None))  # the test helper is faithful
    assert compare_exact(qm, back) == []


def _replace(qm: QuantizedModel, name: str, **parts) -> QuantizedModel:
    t = qm.tensors[name]
    fields = {"shape": t.shape, "dtype": t.dtype, "bits": t.bits, "q": t.q, "scale": t.scale, "data": t.data}
    return QuantizedModel(tensors={**qm.tensors, name: QuantizedTensor(**{**fields, **parts})}, method=qm.method)


def test_compare_exact_catches_single_changes(qm):
    name = "blocks.0.mlp.fc.weight"
    t = qm.tensors[name]
    q = t.q.clone()
    q[3, 4] = q[3, 4] + 1 if q[3, 4] < 31 else q[3, 4] - 1
    assert compare_exact(qm, _replace(qm, name, q=q)) == [name]
    scale = t.scale.clone()
    scale[2] = torch.nextafter(scale[2:3], torch.tensor([1.0], dtype=torch.float16))[0]
    assert compare_exact(qm, _replace(qm, name, scale=scale)) == [name]
    data = qm.tensors["final_norm.gain"].data.clone()
    data[0] = -data[0]
    assert compare_exact(qm, _replace(qm, "final_norm.gain", data=data)) == ["final_norm.gain"]
    fewer = QuantizedModel(tensors={k: v for k, v in qm.tensors.items() if k != name}, method="rtn")
    assert compare_exact(qm, fewer) == [name] and compare_exact(fewer, qm) == [name]
    assert compare_exact(qm, qm) == []


def test_reference_round_trips(qm, tmp_path):
    path = tmp_path / "quant" / "reference.safetensors"
    write_reference(path, qm)
    back = read_reference(path)
    assert compare_exact(qm, back) == [] and back.method == "rtn"
    first = path.read_bytes()
    for _ in range(5):  # the same content, the same bytes (its metadata has three keys): DVC sees no change
        write_reference(path, qm)
        assert path.read_bytes() == first
    assert [t.dtype for t in back.tensors.values()] == [t.dtype for t in qm.tensors.values()]
    with pytest.raises(FileNotFoundError, match="reference"):
        read_reference(tmp_path / "missing.safetensors")
