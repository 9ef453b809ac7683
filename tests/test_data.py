import numpy as np
import pytest

from pgolf_core import data


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000)
    path = tmp_path / data.shard_name("train", 0)
    data.write_shard(path, tokens)
    assert path.stat().st_size == data.HEADER_BYTES + 2 * 1000
    np.testing.assert_array_equal(data.read_shard(path), tokens)
    np.testing.assert_array_equal(data.read_shard(path, mmap=True), tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()


def test_split_is_cut_into_shards_and_read_back_in_order(tmp_path):
    tokens = np.arange(2500) % 700
    paths = data.write_split(tmp_path, "train", tokens, shard_tokens=1000)
    assert [p.name for p in paths] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    np.testing.assert_array_equal(data.load_split(tmp_path, "train"), tokens)


def test_val_glob_skips_byte_sidecars(tmp_path):
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    data.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 5])
    assert [p.name for p in data.list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-2], "truncated"),
    (lambda b: b + b"\0\0", "truncated or padded"),
    (lambda b: b[:100], "shorter than"),
    (lambda b: (1234).to_bytes(4, "little") + b[4:], "magic 1234"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
])
def test_bad_shards_are_named(tmp_path, damage, message):
    path = tmp_path / "fineweb_train_000000.bin"
    data.write_shard(path, np.arange(50))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        data.read_shard(path)
    assert str(path) in str(err.value)


def test_missing_shards_and_ids_beyond_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train shards"):
        data.list_shards(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="shard not found"):
        data.read_shard(tmp_path / "nope.bin")
    path = tmp_path / "fineweb_val_000000.bin"
    data.write_shard(path, [1, 5, 900, 3])
    with pytest.raises(ValueError, match="token id 900 at position 2 is beyond the vocab size 512"):
        data.read_shard(path, vocab_size=512)
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        data.write_shard(path, [70000])


def test_token_stream_tiles_without_gaps(tmp_path):
    data.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10))
    stream = data.TokenStream(data.list_shards(tmp_path, "train"), vocab_size=10)
    first, second = stream.next_batch(4), stream.next_batch(4)
    assert first.tolist() == [0, 1, 2, 3, 4] and second.tolist() == [4, 5, 6, 7, 8]
    assert stream.next_batch(4).tolist() == [8, 9, 0, 1, 2]  # wraps around


def test_token_stream_reads_across_shards_like_one_concatenated_stream(tmp_path):
    sizes = [7, 0, 3, 12]  # an empty shard in the middle must be skipped
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50, n) for n in sizes]
    for i, part in enumerate(parts):
        data.write_shard(tmp_path / data.shard_name("train", i), part)
    stream = data.TokenStream(data.list_shards(tmp_path, "train"), vocab_size=50)
    assert all(isinstance(s, np.memmap) for s in stream.shards)  # nothing loaded into RAM
    whole = np.concatenate(parts)
    position = 0
    for n in (5, 9, 1, 30, 4):  # crosses shard boundaries and wraps (31 tokens of 22: twice)
        batch = stream.next_batch(n)
        assert batch.dtype == np.int64
        np.testing.assert_array_equal(batch, whole[(position + np.arange(n + 1)) % len(whole)])
        position = (position + n) % len(whole)


def test_token_stream_shares_tile_the_global_batch(tmp_path):
    data.write_shard(tmp_path / data.shard_name("train", 0), np.arange(40) % 30)
    data.write_shard(tmp_path / data.shard_name("train", 1), np.arange(25) % 30)
    files = data.list_shards(tmp_path, "train")
    reference, ranks = data.TokenStream(files, vocab_size=30), [data.TokenStream(files, vocab_size=30) for _ in range(3)]
    for _ in range(4):  # 4 steps of 24 tokens over 65: wraps; 3 ranks of 8 tokens (+1 shifted target) each
        whole = reference.next_batch(24)
        for r, stream in enumerate(ranks):
            np.testing.assert_array_equal(stream.next_batch(24, 8 * r, 8 * (r + 1)), whole[8 * r : 8 * (r + 1) + 1])
    assert {s.state() for s in ranks} == {reference.state()}
    with pytest.raises(ValueError, match="share 8..30 is not inside a batch of 24"):
        reference.next_batch(24, 8, 30)
