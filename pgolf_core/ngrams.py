"""Classical n-gram baselines (orders 1-3): the numbers every neural val_bpb is read against.

A neural model that cannot beat a counted trigram has learnt nothing worth its bytes,
so the `ngrams` stage counts unigram, bigram and hashed-trigram tables from the train
shards and scores the validation stream with an interpolated Witten-Bell model.

Stream conventions (shared by counting and scoring, so the two cannot disagree):
- The train (or val) split is one token stream cut into shards; counting carries the
  last two tokens of one piece into the next, so shard boundaries are invisible.
- Targets are every position but the first (the first token has no predecessor), the
  same target set as `bpb.stream_bytes`.
- Trigram context of target t is (t-2, t-1). At t = 1 there is no t-2 and BOS stands
  in (the stream starts a document). When t-1 is BOS, t-2 is replaced by BOS too, so
  no context leaks across a document boundary.
- The trigram context is hashed into `buckets` buckets (see `context_buckets`); the
  continuation is exact. Tables are sparse: sorted unique int64 keys with int64 counts,
  bigram key = prev * V + cur, trigram key = bucket * V + cur.

Smoothing: interpolated Witten-Bell. For a context h with c(h) tokens seen after it
and N1+(h.) distinct continuations,
    P_WB(w | h) = (c(h, w) + N1+(h.) * P_lower(w)) / (c(h) + N1+(h.)),
with P_lower the next shorter order (trigram -> bigram -> unigram -> uniform 1/V).
Where c(h) = 0 the lower order is used unchanged. Each order is a proper distribution
over the vocabulary because sum_w c(h, w) = c(h) and P_lower sums to 1.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pgolf_core import bpb
from pgolf_core.data import read_shard

TABLES_FILE = "tables.npz"
FORMAT_VERSION = 1
ORDERS = (1, 2, 3)
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Knuth, Fibonacci hashing)
MAX_BUCKETS = 1 << 32  # the hash keeps 32 high bits of the product
CHUNK_TOKENS = 1 << 25  # tokens counted (or val targets scored) at once; bounds memory on 100M-token shards


@dataclass(frozen=True, eq=False)
class NgramTables:
    """Counts of orders 1-3 over the targets of a train stream (see the module docstring)."""

    unigram: np.ndarray  # int64 [vocab_size]: target counts
    bigram_keys: np.ndarray  # int64 [n2], sorted unique: prev * vocab_size + cur
    bigram_counts: np.ndarray  # int64 [n2]
    trigram_keys: np.ndarray  # int64 [n3], sorted unique: bucket * vocab_size + cur
    trigram_counts: np.ndarray  # int64 [n3]
    vocab_size: int
    buckets: int  # hashed trigram contexts
    bos_id: int

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/tables.npz` (uncompressed, no pickle); returns the path."""
        path = Path(directory) / TABLES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._serialise())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "NgramTables":
        """Read what `save` wrote; checks format, shapes and key ranges, naming the file."""
        path = Path(directory) / TABLES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"n-gram tables not found: {path} (run the ngrams stage)")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return _tables_from_arrays(arrays, path)

    @property
    def table_bytes(self) -> int:
        """Bytes of the saved file (exactly what `save` writes)."""
        return len(self._serialise())

    @property
    def train_targets(self) -> int:
        return int(self.unigram.sum())

    @cached_property
    def bigram_context_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(c(prev), N1+(prev.)), int64 [vocab_size] each."""
        return _context_stats(self.bigram_keys, self.bigram_counts, self.vocab_size, self.vocab_size)

    @cached_property
    def trigram_context_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(c(bucket), N1+(bucket.)), int64 [buckets] each."""
        return _context_stats(self.trigram_keys, self.trigram_counts, self.vocab_size, self.buckets)

    def _serialise(self) -> bytes:
        meta = np.array([FORMAT_VERSION, self.vocab_size, self.buckets, self.bos_id], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(
            buffer, meta=meta, unigram=self.unigram,
            bigram_keys=self.bigram_keys, bigram_counts=self.bigram_counts,
            trigram_keys=self.trigram_keys, trigram_counts=self.trigram_counts,
        )
        return buffer.getvalue()


# ---------------------------------------------------------------------------- contexts


def context_buckets(older, prev, vocab_size: int, buckets: int, bos_id: int) -> np.ndarray:
    """Hashed trigram context of (t-2, t-1) arrays -> int64 bucket ids in [0, buckets).

    BOS rule first: where prev is BOS, older becomes BOS. Hash: k = older * V + prev as
    uint64, times HASH_MULTIPLIER modulo 2**64 (multiplicative / Fibonacci hashing), keep
    the high 32 bits (the well-mixed ones), then take them modulo `buckets`.
    """
    older = np.asarray(older, dtype=np.int64)
    prev = np.asarray(prev, dtype=np.int64)
    older = np.where(prev == bos_id, bos_id, older)
    key = (older * vocab_size + prev).astype(np.uint64)
    mixed = (key * HASH_MULTIPLIER) >> np.uint64(32)
    return (mixed % np.uint64(buckets)).astype(np.int64)


def stream_contexts(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(older, prev, target) int64 arrays for targets tokens[1:], each of length N - 1.

    older at the first target is BOS (no t-2 exists); the BOS rule is applied later,
    in `context_buckets`.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    older = np.concatenate([[bos_id], tokens[:-2]])
    return older, tokens[:-1], tokens[1:]


# ---------------------------------------------------------------------------- counting


def count_ngrams(pieces, vocab_size: int, buckets: int, bos_id: int) -> NgramTables:
    """Count orders 1-3 over consecutive pieces of one stream (uint16/int arrays).

    Pieces are read one at a time; the last two tokens of each are carried into the
    next, so the counts equal those of the concatenated stream.
    """
    _check_shape(vocab_size, buckets, bos_id)
    unigram = np.zeros(vocab_size, dtype=np.int64)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    bigram, trigram = empty, empty
    carry = np.zeros(0, dtype=np.int64)
    for piece in pieces:
        piece = np.asarray(piece)
        for start in range(0, len(piece), CHUNK_TOKENS):
            chunk = np.concatenate([carry, piece[start : start + CHUNK_TOKENS].astype(np.int64)])
            older, prev, target = stream_contexts(chunk, bos_id)
            skip = max(len(carry) - 1, 0)  # targets already counted with the previous chunk
            older, prev, target = older[skip:], prev[skip:], target[skip:]
            _check_ids(target, vocab_size)
            unigram += np.bincount(target, minlength=vocab_size)
            bigram = _merge_counts(bigram, _unique_counts(prev * vocab_size + target))
            bucket = context_buckets(older, prev, vocab_size, buckets, bos_id)
            trigram = _merge_counts(trigram, _unique_counts(bucket * vocab_size + target))
            carry = chunk[-2:]
    return NgramTables(
        unigram=unigram, bigram_keys=bigram[0], bigram_counts=bigram[1],
        trigram_keys=trigram[0], trigram_counts=trigram[1],
        vocab_size=vocab_size, buckets=buckets, bos_id=bos_id,
    )


def count_shards(paths, vocab_size: int, buckets: int, bos_id: int, progress: bool = True) -> NgramTables:
    """Count orders 1-3 over train shard files in order, one shard in memory at a time."""
    paths = list(paths)
    shards = (read_shard(p, vocab_size) for p in tqdm(paths, desc="ngrams: count", unit="shard", disable=not progress))
    return count_ngrams(shards, vocab_size, buckets, bos_id)


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, counts = np.unique(keys, return_counts=True)
    return unique.astype(np.int64), counts.astype(np.int64)


def _merge_counts(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sparse (sorted unique keys, counts) tables, adding counts of shared keys.

    A stable sort of two concatenated sorted runs is a linear merge (timsort finds runs).
    """
    keys = np.concatenate([a[0], b[0]])
    counts = np.concatenate([a[1], b[1]])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    if len(keys) == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


def _context_stats(keys, counts, vocab_size: int, num_contexts: int) -> tuple[np.ndarray, np.ndarray]:
    context = keys // vocab_size
    # float64 sums are exact below 2**53 tokens
    total = np.bincount(context, weights=counts, minlength=num_contexts).round().astype(np.int64)
    distinct = np.bincount(context, minlength=num_contexts).astype(np.int64)
    return total, distinct


# ---------------------------------------------------------------------------- scoring


def next_token_probs(tables: NgramTables, older, prev, target, order: int) -> np.ndarray:
    """Interpolated Witten-Bell P(target | context) of `order` (1, 2, 3), float64.

    older, prev, target: int arrays of one shape (older and prev unused below order 3/2).
    """
    return probs_by_order(tables, older, prev, target, order)[-1]


def probs_by_order(tables: NgramTables, older, prev, target, max_order: int = 3) -> list[np.ndarray]:
    """[P_1, ..., P_max_order] of the targets, each float64 of target's shape.

    Computes each order once; order k interpolates with order k - 1 (module docstring).
    """
    if max_order not in ORDERS:
        raise ValueError(f"n-gram order {max_order}: expected one of {ORDERS}")
    target = np.asarray(target, dtype=np.int64)
    probs = [_unigram_probs(tables, target)]
    if max_order >= 2:
        context = np.asarray(prev, dtype=np.int64)
        probs.append(_witten_bell(
            tables.bigram_keys, tables.bigram_counts, tables.bigram_context_stats,
            context, target, tables.vocab_size, probs[-1],
        ))
    if max_order >= 3:
        context = context_buckets(older, prev, tables.vocab_size, tables.buckets, tables.bos_id)
        probs.append(_witten_bell(
            tables.trigram_keys, tables.trigram_counts, tables.trigram_context_stats,
            context, target, tables.vocab_size, probs[-1],
        ))
    return probs


def _unigram_probs(tables: NgramTables, target: np.ndarray) -> np.ndarray:
    """Witten-Bell unigram: interpolated with the uniform 1/V (uniform when nothing was counted)."""
    seen = tables.unigram
    distinct = np.count_nonzero(seen)
    uniform = 1.0 / tables.vocab_size
    if distinct == 0:
        return np.full(target.shape, uniform)
    return (seen[target] + distinct * uniform) / (seen.sum() + distinct)


def _witten_bell(keys, counts, context_stats, context, target, vocab_size: int, lower) -> np.ndarray:
    """(c(h,w) + N1+(h.) * lower) / (c(h) + N1+(h.)); `lower` unchanged where c(h) = 0."""
    total, distinct = context_stats
    seen = _lookup(keys, counts, context * vocab_size + target)
    c_h, n_h = total[context], distinct[context]
    return np.where(c_h > 0, (seen + n_h * lower) / np.maximum(c_h + n_h, 1), lower)


def distribution(tables: NgramTables, older: int, prev: int, order: int) -> np.ndarray:
    """P(w | older, prev) for every w in the vocabulary: float64 [vocab_size]."""
    vocab = np.arange(tables.vocab_size, dtype=np.int64)
    return next_token_probs(tables, np.full_like(vocab, older), np.full_like(vocab, prev), vocab, order)


def score_nll(tables: NgramTables, tokens: np.ndarray, order: int) -> np.ndarray:
    """Per-target NLL in nats, float64 [N - 1], for targets tokens[1:] of a val stream."""
    tokens = np.asarray(tokens, dtype=np.int64)
    _check_ids(tokens, tables.vocab_size)
    older, prev, target = stream_contexts(tokens, tables.bos_id)
    return -np.log(next_token_probs(tables, older, prev, target, order))


def val_bpb(tables: NgramTables, byte_tables: bpb.ByteTables, tokens: np.ndarray) -> dict[int, float]:
    """{order: bits per byte} over every target of a val stream (all positions but the first).

    NLL is summed in chunks of CHUNK_TOKENS targets; the denominator is `bpb.stream_bytes`.
    """
    if byte_tables.vocab_size != tables.vocab_size:
        raise ValueError(
            f"byte tables cover {byte_tables.vocab_size} tokens, n-gram tables {tables.vocab_size}"
        )
    tokens = np.asarray(tokens, dtype=np.int64)
    _check_ids(tokens, tables.vocab_size)
    older, prev, target = stream_contexts(tokens, tables.bos_id)
    nll_nats = dict.fromkeys(ORDERS, 0.0)
    for start in range(0, len(target), CHUNK_TOKENS):
        span = slice(start, start + CHUNK_TOKENS)
        for order, probs in zip(ORDERS, probs_by_order(tables, older[span], prev[span], target[span])):
            nll_nats[order] += float(-np.log(probs).sum())
    num_bytes = bpb.stream_bytes(byte_tables, tokens)
    return {order: bpb.bits_per_byte(nll, num_bytes) for order, nll in nll_nats.items()}


def _lookup(keys: np.ndarray, counts: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Counts of `queries` in a sparse table (0 where absent), int64 of the queries' shape."""
    if len(keys) == 0:
        return np.zeros(queries.shape, dtype=np.int64)
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[index] == queries, counts[index], 0)


# ---------------------------------------------------------------------------- checks


def _check_shape(vocab_size: int, buckets: int, bos_id: int) -> None:
    if vocab_size <= 0 or vocab_size > 1 << 16:
        raise ValueError(f"n-gram vocab_size={vocab_size}: expected 1..65536 (uint16 shards)")
    if not 0 < buckets <= MAX_BUCKETS:
        raise ValueError(f"n-gram buckets={buckets}: expected 1..{MAX_BUCKETS} (32-bit hash)")
    if not 0 <= bos_id < vocab_size:
        raise ValueError(f"n-gram bos_id={bos_id}: expected an id in [0, {vocab_size})")


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids span [{tokens.min()}, {tokens.max()}], expected [0, {vocab_size}) "
            "(tokenizer and n-gram tables do not match)"
        )


def _tables_from_arrays(arrays: dict, path: Path) -> NgramTables:
    expected = {"meta", "unigram", "bigram_keys", "bigram_counts", "trigram_keys", "trigram_counts"}
    if set(arrays) != expected:
        raise ValueError(f"{path}: arrays {sorted(arrays)}, expected {sorted(expected)}")
    version, vocab_size, buckets, bos_id = (int(x) for x in arrays["meta"])
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
    _check_shape(vocab_size, buckets, bos_id)
    if arrays["unigram"].shape != (vocab_size,):
        raise ValueError(f"{path}: unigram shape {arrays['unigram'].shape}, expected ({vocab_size},)")
    for name, num_contexts in (("bigram", vocab_size), ("trigram", buckets)):
        _check_sparse(path, name, arrays[f"{name}_keys"], arrays[f"{name}_counts"], num_contexts * vocab_size)
    return NgramTables(
        **{name: arrays[name].astype(np.int64, copy=False) for name in expected - {"meta"}},
        vocab_size=vocab_size, buckets=buckets, bos_id=bos_id,
    )


def _check_sparse(path: Path, name: str, keys: np.ndarray, counts: np.ndarray, key_limit: int) -> None:
    if keys.shape != counts.shape or keys.ndim != 1:
        raise ValueError(f"{path}: {name} keys {keys.shape} and counts {counts.shape} differ")
    if keys.size and (keys[0] < 0 or keys[-1] >= key_limit or np.any(np.diff(keys) <= 0)):
        raise ValueError(
            f"{path}: {name} keys must be strictly increasing in [0, {key_limit}), found "
            f"[{keys[0]}, {keys[-1]}] (or out of order)"
        )
