"""Laws of the n-gram baselines: counts match brute force, distributions sum to 1,
higher orders win on trigram-structured text, tables round-trip, bytes match bpb."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pgolf_core import bpb, ngrams
from pgolf_core.data import shard_name, write_shard, write_split

BOS = 1
REPO = Path(__file__).resolve().parents[1]


def python_bucket(older: int, prev: int, vocab_size: int, buckets: int) -> int:
    """The documented hash, in plain Python integers (independent of the numpy path)."""
    if prev == BOS:
        older = BOS
    mixed = ((older * vocab_size + prev) * 0x9E3779B97F4A7C15) % 2**64 >> 32
    return mixed % buckets


def random_stream(rng, vocab_size: int, length: int) -> np.ndarray:
    """Random tokens in [2, vocab_size) with BOS starting random-length documents."""
    tokens = rng.integers(2, vocab_size, size=length)
    tokens[rng.random(length) < 0.1] = BOS
    tokens[0] = BOS
    return tokens


def markov_stream(rng, vocab_size: int, num_docs: int) -> np.ndarray:
    """Documents whose next token depends mostly on the previous one, fully on the last two."""
    docs = []
    for _ in range(num_docs):
        doc = [BOS, *rng.integers(2, vocab_size, size=2)]
        for _ in range(int(rng.integers(20, 60))):
            a, b = doc[-2], doc[-1]
            nxt = 2 + (b + 1 + (a % 3)) % (vocab_size - 2) if rng.random() < 0.9 else rng.integers(2, vocab_size)
            doc.append(int(nxt))
        docs.append(doc)
    return np.array([t for doc in docs for t in doc], dtype=np.int64)


def write_pieces(directory: Path, tokens: np.ndarray, cuts) -> list[Path]:
    paths = []
    for index, piece in enumerate(np.split(tokens, cuts)):
        path = directory / shard_name("train", index)
        write_shard(path, piece)
        paths.append(path)
    return paths


@pytest.mark.parametrize("buckets", [7, 1 << 20])
@pytest.mark.parametrize("chunk_tokens", [3, 1 << 25])
def test_counts_match_brute_force(tmp_path, monkeypatch, buckets, chunk_tokens):
    monkeypatch.setattr(ngrams, "CHUNK_TOKENS", chunk_tokens)
    vocab_size, rng = 11, np.random.default_rng(0)
    tokens = random_stream(rng, vocab_size, 400)
    tokens[0] = 5  # the stream need not open with BOS: position 1's missing t-2 is BOS anyway
    paths = write_pieces(tmp_path, tokens, [1, 2, 50, 50, 51, 53, 300])  # 1-token and empty pieces too
    tables = ngrams.count_shards(paths, vocab_size, buckets, BOS, progress=False)

    seq = tokens.tolist()
    uni = Counter(seq[1:])
    bi = Counter((seq[t - 1], seq[t]) for t in range(1, len(seq)))
    tri = Counter(
        (python_bucket(seq[t - 2] if t >= 2 else BOS, seq[t - 1], vocab_size, buckets), seq[t])
        for t in range(1, len(seq))
    )
    assert tables.unigram.tolist() == [uni[w] for w in range(vocab_size)]
    assert dict(zip(tables.bigram_keys.tolist(), tables.bigram_counts.tolist())) == {
        p * vocab_size + w: c for (p, w), c in bi.items()
    }
    assert dict(zip(tables.trigram_keys.tolist(), tables.trigram_counts.tolist())) == {
        b * vocab_size + w: c for (b, w), c in tri.items()
    }
    assert np.all(np.diff(tables.bigram_keys) > 0) and np.all(np.diff(tables.trigram_keys) > 0)


def test_bos_context_rule():
    vocab_size, buckets = 9, 1 << 20
    tables = ngrams.count_ngrams([np.array([BOS, 4, 5, BOS, 6, 7])], vocab_size, buckets, BOS)
    keys = set(tables.trigram_keys.tolist())
    after_bos = python_bucket(BOS, BOS, vocab_size, buckets)
    assert after_bos * vocab_size + 6 in keys  # (5, BOS) -> 6 is counted as (BOS, BOS) -> 6
    assert python_bucket(5, BOS, vocab_size, buckets) == after_bos
    assert after_bos * vocab_size + 4 in keys  # the first target, 4, also sees (BOS, BOS)
    assert tables.unigram.sum() == 5


@pytest.mark.parametrize("order", ngrams.ORDERS)
def test_distributions_sum_to_one(order):
    vocab_size, rng = 12, np.random.default_rng(1)
    stream = random_stream(rng, vocab_size - 1, 300)  # token 11 is never seen
    tables = ngrams.count_ngrams([stream], vocab_size, 1 << 20, BOS)
    seen = (int(stream[5]), int(stream[6]))
    for older, prev in [seen, (BOS, BOS), (7, BOS), (3, 11), (11, 4), (11, 11)]:
        probs = ngrams.distribution(tables, older, prev, order)
        assert probs.shape == (vocab_size,) and np.all(probs > 0)
        assert math.isclose(probs.sum(), 1.0, rel_tol=0, abs_tol=1e-12), (order, older, prev)


def test_empty_tables_are_uniform():
    tables = ngrams.count_ngrams([np.array([BOS])], 5, 8, BOS)
    for order in ngrams.ORDERS:
        np.testing.assert_allclose(ngrams.distribution(tables, BOS, BOS, order), 0.2)


def test_higher_orders_win_on_markov_text():
    rng = np.random.default_rng(2)
    train, val = markov_stream(rng, 16, 400), markov_stream(rng, 16, 60)
    tables = ngrams.count_ngrams([train], 16, 1 << 16, BOS)
    nll = [ngrams.score_nll(tables, val, order).mean() for order in ngrams.ORDERS]
    assert nll[0] > nll[1] + 0.3 and nll[1] > nll[2] + 0.3, nll


def test_save_load_round_trip(tmp_path):
    stream = random_stream(np.random.default_rng(3), 10, 500)
    tables = ngrams.count_ngrams([stream], 10, 13, BOS)
    path = tables.save(tmp_path / "tables")
    loaded = ngrams.NgramTables.load(tmp_path / "tables")
    for name in ("unigram", "bigram_keys", "bigram_counts", "trigram_keys", "trigram_counts"):
        assert np.array_equal(getattr(loaded, name), getattr(tables, name)) and getattr(loaded, name).dtype == np.int64
    assert (loaded.vocab_size, loaded.buckets, loaded.bos_id) == (10, 13, BOS)
    assert tables.table_bytes == path.stat().st_size
    np.testing.assert_array_equal(ngrams.score_nll(loaded, stream, 3), ngrams.score_nll(tables, stream, 3))


def test_load_rejects_unsorted_keys(tmp_path):
    tables = ngrams.count_ngrams([random_stream(np.random.default_rng(4), 10, 200)], 10, 13, BOS)
    broken = dataclasses.replace(tables, bigram_keys=tables.bigram_keys[::-1].copy())
    broken.save(tmp_path)
    with pytest.raises(ValueError, match="bigram keys"):
        ngrams.NgramTables.load(tmp_path)


@pytest.mark.parametrize("chunk_tokens", [7, 1 << 25])
def test_val_bpb_uses_stream_bytes(monkeypatch, chunk_tokens):
    monkeypatch.setattr(ngrams, "CHUNK_TOKENS", chunk_tokens)
    vocab_size, rng = 10, np.random.default_rng(5)
    byte_tables = bpb.ByteTables(
        base_bytes=rng.integers(1, 5, size=vocab_size),
        has_space=rng.random(vocab_size) < 0.5,
        is_boundary=np.arange(vocab_size) < 4,
    )
    stream = random_stream(rng, vocab_size, 300)
    tables = ngrams.count_ngrams([stream], vocab_size, 64, BOS)
    seq = stream.tolist()
    brute_bytes = sum(
        int(byte_tables.base_bytes[seq[t]])
        + int(byte_tables.has_space[seq[t]] and not byte_tables.is_boundary[seq[t - 1]])
        for t in range(1, len(seq))
    )
    assert bpb.stream_bytes(byte_tables, stream) == brute_bytes
    scores = ngrams.val_bpb(tables, byte_tables, stream)
    for order in ngrams.ORDERS:
        nll = ngrams.score_nll(tables, stream, order)
        assert nll.shape == (len(stream) - 1,) and nll.dtype == np.float64
        expected = nll.sum() / math.log(2) / brute_bytes
        assert math.isclose(scores[order], expected, rel_tol=1e-12)


def test_stage_writes_metrics(tmp_path):
    from pgolf_core.tokenizer import encode_documents, load_tokenizer, train_tokenizer

    rng = np.random.default_rng(6)
    words = "the a cat dog sat on mat ran far near house tree river blue green small big old new".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 15)))) + "." for _ in range(300)]
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(train_tokenizer(docs, 300))
    sp = load_tokenizer(tmp_path / "tokenizer")
    write_split(tmp_path / "shards", "val", encode_documents(sp, docs[:30]), 1000)
    write_split(tmp_path / "shards", "train", encode_documents(sp, docs[30:]), 1000)
    (tmp_path / "params.yaml").write_text("ngrams:\n  trigram_buckets: 4096\n")

    spec = importlib.util.spec_from_file_location("stage_ngrams", REPO / "stages" / "ngrams.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main([
        "--params", str(tmp_path / "params.yaml"), "--shards", str(tmp_path / "shards"),
        "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "ngrams"),
        "--metrics", str(tmp_path / "metrics" / "ngrams.json"),
    ])
    metrics = json.loads((tmp_path / "metrics" / "ngrams.json").read_text())
    for key in ("val_bpb_unigram", "val_bpb_bigram", "val_bpb_trigram", "table_bytes", "train_tokens",
                "val_tokens", "val_bytes", "count_seconds", "score_seconds", "provenance"):
        assert key in metrics, key
    assert metrics["val_bpb_unigram"] > metrics["val_bpb_bigram"] > 0
    assert metrics["table_bytes"] == (tmp_path / "ngrams" / ngrams.TABLES_FILE).stat().st_size
    assert ngrams.NgramTables.load(tmp_path / "ngrams").train_targets == metrics["train_tokens"] - 1
