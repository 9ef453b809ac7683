"""Every codec round-trips and names itself in errors; many jobs at once give what each gives alone."""

import random
from pathlib import Path

import pytest

from pgolf_core.compress import CODEC_IDS, codec_id, codec_name, compress, compress_many, decompress, lrzip_binary

AVAILABLE = [name for name in CODEC_IDS if name != "lrzip" or lrzip_binary()]  # lrzip only where installed


def _data(n=20000, seed=0):
    rng = random.Random(seed)
    return bytes(rng.choice(b"\x00\x01\x02\xfe\xff\x7f") for _ in range(n)) + b"pgolf" * 500


@pytest.mark.parametrize("name", AVAILABLE)
def test_round_trip(name):
    data = _data()
    blob = compress(data, name)
    assert len(blob) < len(data)
    assert decompress(blob, name) == data
    assert decompress(compress(b"", name), name) == b""


@pytest.mark.parametrize("name", AVAILABLE)
def test_corrupt_data_names_the_codec(name):
    with pytest.raises(ValueError, match=name):
        decompress(b"\x13\x37not compressed at all" * 3, name)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec 'gzip'"):
        compress(b"abc", "gzip")
    with pytest.raises(ValueError, match="unknown codec 'gzip'"):
        decompress(b"abc", "gzip")
    with pytest.raises(ValueError, match="unknown codec id 99"):
        codec_name(99)


def test_compress_many_returns_each_job_as_compressed_alone_in_order():
    jobs = [(_data(n=3000 + 500 * i, seed=i), AVAILABLE[i % len(AVAILABLE)]) for i in range(7)]  # more jobs than cores
    results = compress_many(jobs)
    assert len(results) == len(jobs)
    for (data, name), (blob, seconds) in zip(jobs, results):
        assert blob == compress(data, name) and decompress(blob, name) == data
        assert seconds >= 0.0
    assert compress_many([]) == []


def test_codec_ids_round_trip():
    for name in CODEC_IDS:
        assert codec_name(codec_id(name)) == name


def test_lrzip_missing_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no binary can be found on an empty PATH
    assert lrzip_binary() is None
    for run in (lambda: compress(b"abc", "lrzip"), lambda: decompress(b"abc", "lrzip")):
        with pytest.raises(ValueError, match="lrzip.*no lrzip binary is on PATH.*quantize.compressors"):
            run()
    # the quantize stage says so before it reads the model (and before minutes of GPTQ)
    from pgolf_core.config import build_section
    from pgolf_core.stage import quantize
    nowhere = Path("/nonexistent")
    with pytest.raises(ValueError, match="no lrzip binary is on PATH"):
        quantize.run(build_section("quantize", {"compressors": ["zstd", "lrzip"]}), quantize.QuantizePaths(
            model=nowhere / "model.safetensors", hessians=nowhere / "h.safetensors", out=nowhere / "artifact",
            reference=nowhere / "ref.safetensors", script=nowhere / "train_gpt.py", metrics=nowhere / "q.json"))
