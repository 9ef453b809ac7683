"""Laws of the n-gram baselines: counts match brute force (any chunking, any number of
workers, dense, sparse or folded under a memory cap), distributions sum to 1 at every
order, higher orders win on structured text, tables round-trip, bytes match bpb."""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pgolf_core import bpb, ngram_count, ngrams
from pgolf_core.data import shard_name, write_shard, write_split

BOS = 1
REPO = Path(__file__).resolve().parents[1]
MULT = 0x9E3779B97F4A7C15


def python_ids(seq: list[int], t: int, vocab_size: int, buckets: tuple[int, ...]) -> list[int]:
    """[id_2, ..., id_N] of target seq[t] by the documented rule, in plain Python integers."""
    span = len(buckets) + 1
    context = [seq[t - d] if t - d >= 0 else BOS for d in range(span, 0, -1)]  # oldest first
    for j in range(span - 2, -1, -1):  # tokens older than the latest BOS read as BOS
        if context[j + 1] == BOS:
            context[j] = BOS
    ids = [context[-1]]
    for order, ways in enumerate(buckets, start=3):
        key = sum(tok * vocab_size ** (order - 2 - j) for j, tok in enumerate(context[span - order + 1 :]))
        bits = ways.bit_length() - 1
        ids.append(ids[-1] * ways + ((key * MULT) % 2**64 >> (64 - bits) if bits else 0))
    return ids


def brute_counts(seq: list[int], vocab_size: int, buckets: tuple[int, ...], order: int) -> dict[int, int]:
    """{id * V + w: count} of one order over targets seq[1:]."""
    keys = Counter(python_ids(seq, t, vocab_size, buckets)[order - 2] * vocab_size + seq[t] for t in range(1, len(seq)))
    return dict(keys)


def assert_brute_force(tables: ngrams.NgramTables, tokens: np.ndarray) -> None:
    seq, vocab_size = tokens.tolist(), tables.vocab_size
    assert tables.unigram.tolist() == [Counter(seq[1:])[w] for w in range(vocab_size)]
    for order in range(2, tables.max_order + 1):
        keys, counts = tables.orders[order].to_sparse()
        assert dict(zip(keys.tolist(), counts.tolist())) == brute_counts(seq, vocab_size, tables.buckets, order), order
        assert np.all(np.diff(keys) > 0)


def random_stream(rng, vocab_size: int, length: int) -> np.ndarray:
    """Random tokens in [2, vocab_size) with BOS starting random-length documents."""
    tokens = rng.integers(2, vocab_size, size=length)
    tokens[rng.random(length) < 0.1] = BOS
    tokens[0] = BOS
    return tokens


def markov_stream(rng, vocab_size: int, num_docs: int, depth: int = 2) -> np.ndarray:
    """Documents whose next token depends mostly on the previous one, fully on the last `depth`."""
    docs = []
    for _ in range(num_docs):
        doc = [BOS, *rng.integers(2, vocab_size, size=depth)]
        for _ in range(int(rng.integers(20, 60))):
            a, b, c = doc[-3], doc[-2], doc[-1]
            shift = (b % 3) + (3 * (a % 2) if depth == 3 else 0)
            nxt = 2 + (c + 1 + shift) % (vocab_size - 2) if rng.random() < 0.9 else rng.integers(2, vocab_size)
            doc.append(int(nxt))
        docs.append(doc)
    return np.array([t for doc in docs for t in doc], dtype=np.int64)


def write_pieces(directory: Path, tokens: np.ndarray, cuts=(1, 2, 50, 50, 51, 53, 300)) -> list[Path]:
    """Shards of one stream, with 1-token and empty pieces among them."""
    paths = []
    for index, piece in enumerate(np.split(tokens, cuts)):
        path = directory / shard_name("train", index)
        write_shard(path, piece)
        paths.append(path)
    return paths


@pytest.mark.parametrize("buckets", [(8,), (4, 2), (2, 1, 4)])
@pytest.mark.parametrize("chunk_tokens", [3, ngrams.CHUNK_TOKENS])
def test_counts_match_brute_force(tmp_path, buckets, chunk_tokens):
    vocab_size, rng = 11, np.random.default_rng(0)
    tokens = random_stream(rng, vocab_size, 400)
    tokens[0] = 5  # the stream need not open with BOS: the missing older tokens are BOS anyway
    paths = write_pieces(tmp_path, tokens)
    tables = ngram_count.count_shards(paths, vocab_size, buckets, BOS, progress=False, chunk_tokens=chunk_tokens)
    assert tables.top.is_dense and not tables.hash_fallback and tables.max_order == len(buckets) + 2
    assert_brute_force(tables, tokens)


@pytest.mark.parametrize("buckets, cap_bytes, layout",
                         [((8, 4), 1 << 30, "dense"), ((64, 4), 1 << 30, "sparse"), ((8, 4), 40_000, "folded")])
def test_workers_count_the_same(tmp_path, buckets, cap_bytes, layout):
    """2 and 3 processes (groups of shards, merged) count exactly what 1 does, in every layout."""
    vocab_size, rng = 40, np.random.default_rng(1)
    tokens = random_stream(rng, vocab_size, 1500)
    paths = write_pieces(tmp_path, tokens, (1, 2, 300, 300, 301, 700, 1100))
    runs = [ngram_count.count_shards(paths, vocab_size, buckets, BOS, cap_bytes, workers, progress=False,
                                     chunk_tokens=64)
            for workers in (1, 2, 3)]
    assert_brute_force(runs[0], tokens)
    for tables in runs:
        assert tables.top.is_dense == (layout != "sparse") and tables.hash_fallback == (layout == "folded")
        for a, b in zip(tables.top.to_sparse(), runs[0].top.to_sparse()):
            np.testing.assert_array_equal(a, b)


def test_memory_cap_folds_buckets():
    vocab_size, rng = 11, np.random.default_rng(2)
    tokens = random_stream(rng, vocab_size, 400)
    tables = ngram_count.count_ngrams([tokens], vocab_size, (8, 4), BOS, max_memory_bytes=5_000)
    assert tables.hash_fallback and tables.requested_buckets == (8, 4) and tables.top.is_dense
    assert tables.buckets == (2, 2)  # (8, 4) -> (4, 4) -> (4, 2) -> (2, 2): the largest halves, ties at the top
    assert_brute_force(tables, tokens)  # exact counts of the folded hash


def test_plan_counts():
    plan = ngram_count.plan_counts(8192, BOS, (8,), 10**9, 3 << 30, num_workers=4)
    assert plan.dense and plan.buckets == (8,) and plan.num_workers == 1  # 2 GiB top + 256 MiB bigram
    plan = ngram_count.plan_counts(8192, BOS, (8,), 10**9, 40 << 30, num_workers=4)
    assert plan.num_workers == 4
    plan = ngram_count.plan_counts(8192, BOS, (8, 64, 64), 10**6, 1 << 30)
    assert not plan.dense and plan.buckets == (8, 64, 64)  # few targets: sparse fits
    plan = ngram_count.plan_counts(8192, BOS, (8, 64, 64), 10**9, 3 << 30)
    assert plan.dense and plan.hash_fallback and plan.buckets == (2, 2, 1)  # largest halved first, ties at the top
    with pytest.raises(ValueError, match="max_memory_mib"):
        ngram_count.plan_counts(8192, BOS, (8,), 10**9, 100 << 20)
    with pytest.raises(ValueError, match="power of two"):
        ngram_count.plan_counts(100, BOS, (6,), 10, 1 << 30)


def test_bos_context_rule():
    vocab_size, buckets = 9, (64, 64)
    tables = ngram_count.count_ngrams([np.array([BOS, 4, 5, BOS, 6, 7, 8])], vocab_size, buckets, BOS)
    all_bos = python_ids([BOS, BOS, BOS], 2, vocab_size, buckets)
    keys = set(tables.top.to_sparse()[0].tolist())
    assert all_bos[-1] * vocab_size + 6 in keys  # (4, 5, BOS) -> 6 is counted as (BOS, BOS, BOS) -> 6
    assert all_bos[-1] * vocab_size + 4 in keys  # the first target sees (BOS, BOS, BOS) too
    after_bos = [python_ids(seq, 4, vocab_size, buckets) for seq in ([4, 5, BOS, 6, 7], [9, 9, BOS, 6, 7])]
    assert after_bos[0] == after_bos[1]  # tokens before a BOS never reach a context
    assert tables.num_targets == 6


@pytest.mark.parametrize("buckets, dense", [((4, 2, 2), True), ((64, 4, 2), False)])
def test_distributions_sum_to_one(buckets, dense):
    vocab_size, rng = 12, np.random.default_rng(3)
    stream = random_stream(rng, vocab_size - 1, 600)  # token 11 is never seen
    tables = ngram_count.count_ngrams([stream], vocab_size, buckets, BOS)
    assert tables.top.is_dense == dense
    contexts = [stream[5:9].tolist(), stream[200:203].tolist(), [BOS], [7, BOS], [3, 11], [11, 4, 2, 9], [11] * 4]
    for order in range(1, 6):
        for context in contexts:
            probs = ngrams.distribution(tables, context, order)
            assert probs.shape == (vocab_size,) and np.all(probs > 0)
            assert math.isclose(probs.sum(), 1.0, rel_tol=0, abs_tol=1e-12), (order, context)


def test_empty_tables_are_uniform():
    tables = ngram_count.count_ngrams([np.array([BOS])], 5, (8, 2), BOS)
    for order in range(1, 5):
        np.testing.assert_allclose(ngrams.distribution(tables, [BOS], order), 0.2)


@pytest.mark.parametrize("depth", [2, 3])
def test_higher_orders_win_on_markov_text(depth):
    rng = np.random.default_rng(4)
    train, val = markov_stream(rng, 16, 400, depth), markov_stream(rng, 16, 60, depth)
    tables = ngram_count.count_ngrams([train], 16, (1 << 10, 1 << 10, 4), BOS)
    nll = [ngrams.score_nll(tables, val, order).mean() for order in range(1, 6)]
    assert nll[0] > nll[1] + 0.3 and nll[1] > nll[2] + 0.3, nll
    if depth == 3:
        assert nll[2] > nll[3] + 0.3, nll


def test_uint32_wrap_is_caught():
    tables = ngram_count.count_ngrams([np.array([BOS, 3, 4])], 8, (2,), BOS)
    with pytest.raises(ValueError, match="order-2 counts sum to 2, expected 2,000"):
        ngram_count.tables_from_counts(ngram_count.plan_counts(8, BOS, (2,), 2, 1 << 20), tables.top, 2000)


@pytest.mark.parametrize("dense", [True, False])
def test_save_load_round_trip(tmp_path, monkeypatch, dense):
    monkeypatch.setattr(ngrams, "BLOCK_CELLS", 64)  # several blocks per table
    monkeypatch.setattr(ngram_count, "DENSE_CELLS_PER_TARGET", 64 if dense else 1)
    stream = random_stream(np.random.default_rng(5), 10, 2000)
    tables = ngram_count.count_ngrams([stream], 10, (16, 8), BOS)
    assert tables.top.is_dense == dense
    path = tables.save(tmp_path / "tables")
    loaded = ngrams.NgramTables.load(tmp_path / "tables")
    assert (loaded.vocab_size, loaded.bos_id, loaded.buckets, loaded.num_targets) == (10, BOS, (16, 8), 1999)
    for order in range(2, 5):
        for a, b in zip(loaded.orders[order].to_sparse(), tables.orders[order].to_sparse()):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.unigram, tables.unigram)
    with np.load(path) as npz:
        assert npz["key_deltas"].dtype == np.uint16 and npz["counts"].dtype == np.uint8
    for order in range(1, 5):
        np.testing.assert_array_equal(ngrams.score_nll(loaded, stream, order), ngrams.score_nll(tables, stream, order))


def test_load_rejects_repeated_keys(tmp_path):
    tables = ngram_count.count_ngrams([random_stream(np.random.default_rng(6), 10, 200)], 10, (4,), BOS)
    path = tables.save(tmp_path)
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["key_deltas"][3] = 0
    with zipfile.ZipFile(path, "w") as zf:
        for name, values in arrays.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, values)
    with pytest.raises(ValueError, match="strictly increasing"):
        ngrams.NgramTables.load(tmp_path)


@pytest.mark.parametrize("chunk_tokens", [7, 1 << 16])
def test_val_bpb_uses_stream_bytes(monkeypatch, chunk_tokens):
    monkeypatch.setattr(ngrams, "CHUNK_TOKENS", chunk_tokens)
    vocab_size, rng = 10, np.random.default_rng(7)
    byte_tables = bpb.ByteTables(
        base_bytes=rng.integers(1, 5, size=vocab_size),
        has_space=rng.random(vocab_size) < 0.5,
        is_boundary=np.arange(vocab_size) < 4,
    )
    stream = random_stream(rng, vocab_size, 300)
    tables = ngram_count.count_ngrams([stream], vocab_size, (8, 2), BOS)
    seq = stream.tolist()
    brute_bytes = sum(
        int(byte_tables.base_bytes[seq[t]])
        + int(byte_tables.has_space[seq[t]] and not byte_tables.is_boundary[seq[t - 1]])
        for t in range(1, len(seq))
    )
    byte_counts = bpb.position_bytes(byte_tables, stream)
    assert byte_counts[0] == 0 and byte_counts.sum() == brute_bytes
    scores = ngrams.val_bpb(tables, byte_counts, stream)
    assert sorted(scores) == [1, 2, 3, 4]
    for order in range(1, 5):
        nll = ngrams.score_nll(tables, stream, order)
        assert nll.shape == (len(stream) - 1,) and nll.dtype == np.float64
        expected = nll.sum() / math.log(2) / brute_bytes
        assert math.isclose(scores[order], expected, rel_tol=1e-12)


def test_stage_writes_metrics(tmp_path):
    from pgolf_core.tokenizer import encode_documents, load_tokenizer, train_tokenizer

    rng = np.random.default_rng(8)
    words = "the a cat dog sat on mat ran far near house tree river blue green small big old new".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 15)))) + "." for _ in range(300)]
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(train_tokenizer(docs, 300))
    sp = load_tokenizer(tmp_path / "tokenizer")
    write_split(tmp_path / "shards", "val", encode_documents(sp, docs[:30]), 1000)
    write_split(tmp_path / "shards", "train", encode_documents(sp, docs[30:]), 1000)
    (tmp_path / "params.yaml").write_text("ngrams:\n  max_order: 4\n  order3_buckets: 16\n")

    spec = importlib.util.spec_from_file_location("stage_ngrams", REPO / "stages" / "ngrams.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main([
        "--params", str(tmp_path / "params.yaml"), "--shards", str(tmp_path / "shards"),
        "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "ngrams"),
        "--metrics", str(tmp_path / "metrics" / "ngrams.json"),
    ])
    metrics = json.loads((tmp_path / "metrics" / "ngrams.json").read_text())
    for key in ("val_bpb_unigram", "val_bpb_bigram", "val_bpb_trigram", "val_bpb_order4", "table_bytes",
                "train_tokens", "val_tokens", "val_bytes", "count_seconds", "score_seconds",
                "hash_fallback", "order3_buckets_counted", "order4_buckets_counted"):
        assert key in metrics, key
    provenance = json.loads((tmp_path / "metrics" / "provenance" / "ngrams.json").read_text())
    assert provenance["labels"]["count_layout"] in ("dense", "sparse") and "shards" in provenance["data_sha256"]
    assert "val_bpb_order5" not in metrics and metrics["hash_fallback"] is False
    assert metrics["val_bpb_unigram"] > metrics["val_bpb_bigram"] > 0
    assert metrics["table_bytes"] == (tmp_path / "ngrams" / ngrams.TABLES_FILE).stat().st_size
    assert ngrams.NgramTables.load(tmp_path / "ngrams").num_targets == metrics["train_tokens"] - 1
