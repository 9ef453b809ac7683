"""Classical n-gram baselines (orders 1-5): the numbers every neural val_bpb is read against.

A neural model that cannot beat a counted n-gram has learnt nothing worth its bytes, so
the `ngrams` stage counts the train shards (`pgolf_core.ngram_count`) and scores the
validation stream here with an interpolated Witten-Bell model of orders 1 to `max_order`
(3, 4 or 5). This module holds the tables, their file format and the scoring.

Stream conventions (shared by counting and scoring, so the two cannot disagree):
- The train (or val) split is one token stream cut into shards; counting carries the
  last `max_order - 1` tokens of one piece into the next, so shard boundaries are
  invisible. Targets are every position but the first (as `bpb.position_bytes`).
- Positions before the stream start read as BOS, and so does every context token older
  than the latest BOS in the context: no context leaks across a document boundary.

Contexts (nested hashing; the continuation is always exact):
- Order 2: the context id is the previous token, one of V.
- Order n >= 3: id_n = id_{n-1} * S_n + sub_n, where S_n (`buckets[n - 3]`, a power of
  two) splits each order-(n-1) context into hashed sub-buckets and sub_n is the top
  log2(S_n) bits of (k * HASH_MULTIPLIER mod 2**64), k = sum_j c_j * V**(n-1-j) being the
  exact context c_1..c_{n-1} (oldest first, prev = c_{n-1}). So order n has
  V * S_3 * ... * S_n contexts and its table refines order n-1's: only the top order is
  counted, every lower order (and the unigram) is its exact sum over sub-buckets.
- Table of order n: num_contexts * V cells, key = id * V + w, either dense (uint32,
  every cell) or sparse (sorted unique keys + counts). Which one, and whether the
  memory cap folds the buckets (`hash_fallback`), is the counting plan's choice
  (`ngram_count.plan_counts`).

Smoothing: interpolated Witten-Bell, recursive. For a context h with c(h) tokens seen
after it and N1+(h.) distinct continuations,
    P_n(w | h) = (c(h, w) + N1+(h.) * P_{n-1}(w | h')) / (c(h) + N1+(h.)),
with h' the order-(n-1) context and P_1 interpolating the unigram with 1/V. Where
c(h) = 0 the lower order is used unchanged. Each order is a proper distribution over the
vocabulary because sum_w c(h, w) = c(h) and P_{n-1} sums to 1.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pgolf_core import bpb

TABLES_FILE = "tables.npz"
FORMAT_VERSION = 2
MAX_ORDERS = (3, 4, 5)  # highest orders supported (the metrics need the trigram)
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Knuth, Fibonacci hashing)
CHUNK_TOKENS = 1 << 16  # tokens hashed at once: temporaries stay in L2 (512 KiB per int64 array)
DENSE_DTYPE = np.uint32  # a cell holds < 2**32 counts; `_check_total` proves none wrapped
BLOCK_CELLS = 1 << 24  # dense tables are summarised and saved this many cells at a time
SAVE_COMPRESSLEVEL = 1  # deflate level of tables.npz: level 6 is ~6x slower for ~10% fewer bytes


# ---------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class CountTable:
    """Counts c(h, w) of one order over num_contexts * vocab_size cells, key = h * V + w.

    Dense: `counts` holds every cell (uint32) and `keys` is None. Sparse:
    `keys` are sorted unique int64 and `counts` their int64 counts.
    """

    num_contexts: int
    vocab_size: int
    counts: np.ndarray
    keys: np.ndarray | None = None

    @property
    def is_dense(self) -> bool:
        return self.keys is None

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Counts of int64 `keys` (0 where never seen), int64 of the keys' shape."""
        if self.is_dense:
            return self.counts[keys].astype(np.int64)
        if len(self.keys) == 0:
            return np.zeros(keys.shape, dtype=np.int64)
        index = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[index] == keys, self.counts[index], 0)

    @property
    def num_keys(self) -> int:
        """Cells with a nonzero count."""
        return int(np.count_nonzero(self.counts)) if self.is_dense else len(self.keys)

    def to_sparse(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique int64 keys, int64 counts) of the nonzero cells."""
        keys = np.flatnonzero(self.counts != 0) if self.is_dense else self.keys
        return keys, (self.counts[keys] if self.is_dense else self.counts).astype(np.int64)

    def nonzero_blocks(self):
        """Yield (int64 keys, counts) of the nonzero cells in key order, a block at a time."""
        if not self.is_dense:
            for start in range(0, len(self.keys), BLOCK_CELLS):
                yield self.keys[start : start + BLOCK_CELLS], self.counts[start : start + BLOCK_CELLS]
            return
        for start in range(0, len(self.counts), BLOCK_CELLS):
            block = self.counts[start : start + BLOCK_CELLS]
            index = np.flatnonzero(block != 0)  # 3x faster than on the counts themselves
            if len(index):
                yield index + start, block[index]

    def coarsen(self, ways: int) -> "CountTable":
        """The table over num_contexts // ways contexts, summing each run of `ways` contexts."""
        contexts, vocab = self.num_contexts // ways, self.vocab_size
        if ways == 1:
            return self
        if self.is_dense:
            counts = self.counts.reshape(contexts, ways, vocab).sum(axis=1, dtype=self.counts.dtype)
            return CountTable(contexts, vocab, counts.reshape(-1))
        keys, counts = aggregate_keys(self.keys // (ways * vocab) * vocab + self.keys % vocab, self.counts)
        return CountTable(contexts, vocab, counts, keys)

    def context_stats(self) -> "ContextStats":
        """c(h) and N1+(h.) of every context seen (dense: of every context)."""
        if not self.is_dense:
            contexts, starts = np.unique(self.keys // self.vocab_size, return_index=True)
            total = np.add.reduceat(self.counts, starts) if len(starts) else np.zeros(0, np.int64)
            return ContextStats(total, np.diff(starts, append=len(self.keys)), contexts)
        rows = self.counts.reshape(self.num_contexts, self.vocab_size)
        total = rows.sum(axis=1, dtype=np.int64)
        distinct = np.empty(self.num_contexts, dtype=np.int64)
        step = max(1, BLOCK_CELLS // self.vocab_size)
        for start in range(0, self.num_contexts, step):
            distinct[start : start + step] = np.count_nonzero(rows[start : start + step], axis=1)
        return ContextStats(total, distinct)


@dataclass(frozen=True, eq=False)
class ContextStats:
    """Per context h: total c(h) and distinct continuations N1+(h.), int64. Indexed by h
    when `contexts` is None, else by position in the sorted `contexts`."""

    total: np.ndarray
    distinct: np.ndarray
    contexts: np.ndarray | None = None

    def __call__(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(c(h), N1+(h.)) of int64 context ids (0, 0 for a context never seen)."""
        if self.contexts is None:
            return self.total[context], self.distinct[context]
        if len(self.contexts) == 0:
            return np.zeros(context.shape, np.int64), np.zeros(context.shape, np.int64)
        index = np.minimum(np.searchsorted(self.contexts, context), len(self.contexts) - 1)
        found = self.contexts[index] == context
        return np.where(found, self.total[index], 0), np.where(found, self.distinct[index], 0)


@dataclass(frozen=True, eq=False)
class NgramTables:
    """Counts of orders 1..max_order over the targets of a train stream (module docstring)."""

    top: CountTable  # counts of order max_order; every lower order is derived from it
    num_targets: int  # targets counted: every order's counts sum to it
    vocab_size: int
    bos_id: int
    buckets: tuple[int, ...]  # S_3..S_max_order as counted (after any fallback folding)
    requested_buckets: tuple[int, ...]  # S_3..S_max_order as asked for

    @property
    def max_order(self) -> int:
        return len(self.buckets) + 2

    @property
    def hash_fallback(self) -> bool:
        """True when the memory cap folded the hashed buckets below what was asked for."""
        return self.buckets != self.requested_buckets

    @cached_property
    def orders(self) -> dict[int, CountTable]:
        """{order: table} for orders 2..max_order, each derived exactly from the one above.

        Checks that the bigram counts sum to the targets: every cell of every order is at
        most its bigram cell, so this proves that no uint32 cell wrapped anywhere.
        """
        tables = {self.max_order: self.top}
        for order in range(self.max_order, 2, -1):
            tables[order - 1] = tables[order].coarsen(self.buckets[order - 3])
        _check_total(tables[2], self.num_targets, 2)
        return tables

    @cached_property
    def unigram(self) -> np.ndarray:
        """int64 [vocab_size]: target counts (column sums of the bigram table)."""
        bigram = self.orders[2]
        if bigram.is_dense:
            return bigram.counts.reshape(self.vocab_size, self.vocab_size).sum(axis=0, dtype=np.int64)
        weights = bigram.counts.astype(np.float64)  # exact below 2**53 tokens
        return np.bincount(bigram.keys % self.vocab_size, weights, self.vocab_size).round().astype(np.int64)

    @cached_property
    def stats(self) -> dict[int, ContextStats]:
        """{order: (c(h), N1+(h.))} for orders 2..max_order."""
        return {order: table.context_stats() for order, table in self.orders.items()}

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/tables.npz` (no pickle): the top-order table's nonzero cells as
        delta-coded sorted keys and counts, each in the smallest unsigned dtype that holds
        it, deflated. Streamed a block at a time: memory stays bounded by the table."""
        path = Path(directory) / TABLES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        num_keys, max_delta, max_count = 0, 0, 0
        for deltas, counts in _delta_blocks(self.top):
            num_keys += len(deltas)
            max_delta, max_count = max(max_delta, int(deltas.max())), max(max_count, int(counts.max()))
        meta = [FORMAT_VERSION, self.vocab_size, self.bos_id, self.max_order, self.num_targets]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=SAVE_COMPRESSLEVEL) as zf:
            small = {"meta": meta, "buckets": self.buckets, "requested_buckets": self.requested_buckets}
            for name, values in small.items():
                with zf.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, np.array(values, dtype=np.int64), allow_pickle=False)
            for index, name, top in ((0, "key_deltas", max_delta), (1, "counts", max_count)):
                blocks = (pair[index] for pair in _delta_blocks(self.top))
                _write_streamed(zf, name, _smallest_uint(top), num_keys, blocks)
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


# ---------------------------------------------------------------------------- contexts


def context_ids(x: np.ndarray, vocab_size: int, bos_id: int, buckets: tuple[int, ...]) -> list[np.ndarray]:
    """[id_2, ..., id_N] (N = len(buckets) + 2), int64 context ids of the targets x[N-1:].

    x holds the N - 1 tokens before the first target, then the targets (module docstring).
    """
    span = len(buckets) + 1  # context length of the top order
    num = len(x) - span
    prev = x[span - 1 : span - 1 + num]
    ids = [prev.astype(np.int64)]
    cut = prev == bos_id  # from here back, every context token reads as BOS
    key = prev.astype(np.uint64)
    scale = np.uint64(1)
    for distance, ways in enumerate(buckets, start=2):
        scale *= np.uint64(vocab_size)
        token = np.where(cut, bos_id, x[span - distance : span - distance + num])
        if distance <= len(buckets):
            cut |= token == bos_id
        key += token.astype(np.uint64) * scale
        bits = ways.bit_length() - 1
        context = ids[-1] * ways
        if bits:
            context += ((key * HASH_MULTIPLIER) >> np.uint64(64 - bits)).astype(np.int64)
        ids.append(context)
    return ids


def stream_windows(pieces, span: int, bos_id: int, chunk_tokens: int, carry: np.ndarray | None = None):
    """Yield int arrays x = (span tokens before the first target) + (next targets).

    Pieces are consecutive parts of one stream; `carry` is the `span` stream tokens before
    the first piece (None: the pieces start the stream, so the first token is no target).
    """
    for piece in pieces:
        for start in range(0, len(piece), chunk_tokens):
            chunk = np.asarray(piece[start : start + chunk_tokens])
            if carry is None:
                carry = np.concatenate([np.full(span - 1, bos_id, dtype=chunk.dtype), chunk[:1]])
                chunk = chunk[1:]
            x = np.concatenate([carry.astype(chunk.dtype, copy=False), chunk])
            carry = x[len(x) - span :]
            if len(chunk):
                yield x


# ---------------------------------------------------------------------------- sparse keys


def aggregate_keys(keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, summed counts) of possibly repeated keys (counts default 1)."""
    if counts is None:
        unique, summed = np.unique(keys, return_counts=True)
        return unique.astype(np.int64), summed.astype(np.int64)
    return merge_keys((keys[:0], counts[:0]), (keys, counts), presorted=False)


def merge_keys(a, b, presorted: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (keys, counts) tables, adding counts of shared keys; sorted unique out.

    A stable sort of two concatenated sorted runs is a linear merge (timsort finds runs).
    """
    keys = np.concatenate([a[0], b[0]]).astype(np.int64, copy=False)
    counts = np.concatenate([a[1], b[1]]).astype(np.int64, copy=False)
    order = np.argsort(keys, kind="stable" if presorted else None)
    keys, counts = keys[order], counts[order]
    if len(keys) == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


# ---------------------------------------------------------------------------- scoring


def probs_by_order(tables: NgramTables, ids: list[np.ndarray], target: np.ndarray) -> list[np.ndarray]:
    """[P_1, ..., P_max_order] of the targets given their context ids, float64 each."""
    target = np.asarray(target, dtype=np.int64)
    probs = [_unigram_probs(tables.unigram, target)]
    for order, context in enumerate(ids, start=2):
        seen = tables.orders[order].lookup(context * tables.vocab_size + target)
        c_h, n_h = tables.stats[order](context)
        lower = probs[-1]
        probs.append(np.where(c_h > 0, (seen + n_h * lower) / np.maximum(c_h + n_h, 1), lower))
    return probs


def _unigram_probs(unigram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Witten-Bell unigram: interpolated with the uniform 1/V (uniform when nothing was counted)."""
    distinct = np.count_nonzero(unigram)
    uniform = 1.0 / len(unigram)
    if distinct == 0:
        return np.full(target.shape, uniform)
    return (unigram[target] + distinct * uniform) / (unigram.sum() + distinct)


def distribution(tables: NgramTables, context, order: int) -> np.ndarray:
    """P(w | context) for every w, float64 [vocab_size]; context = tokens, oldest first
    (BOS-padded on the left to max_order - 1 tokens, as at a stream start)."""
    if not 1 <= order <= tables.max_order:
        raise ValueError(f"n-gram order {order}: expected 1..{tables.max_order}")
    span = tables.max_order - 1
    context = [tables.bos_id] * span + [int(t) for t in context]
    x = np.array(context[len(context) - span :] + [0], dtype=np.int64)
    ids = context_ids(x, tables.vocab_size, tables.bos_id, tables.buckets)
    vocab = np.arange(tables.vocab_size, dtype=np.int64)
    ids = [np.broadcast_to(i, vocab.shape) for i in ids]
    return probs_by_order(tables, ids, vocab)[order - 1]


def score_nll(tables: NgramTables, tokens: np.ndarray, order: int) -> np.ndarray:
    """Per-target NLL in nats, float64 [N - 1], for targets tokens[1:] of a val stream."""
    nll = [np.concatenate(parts) for parts in zip(*_chunk_nll(tables, tokens))]
    return nll[order - 1] if nll else np.zeros(0)


def val_bpb(tables: NgramTables, byte_counts: np.ndarray, tokens: np.ndarray) -> dict[int, float]:
    """{order: bits per byte} for orders 1..max_order over every target of a val stream
    (all positions but the first); `byte_counts` are the bytes of each position's target
    (`bpb.val_byte_counts`, 0 at position 0). NLL is summed in chunks."""
    if len(byte_counts) != len(tokens):
        raise ValueError(f"{len(byte_counts)} byte counts for {len(tokens)} val tokens")
    nll_nats = [0.0] * tables.max_order
    for parts in _chunk_nll(tables, tokens):
        nll_nats = [total + float(part.sum()) for total, part in zip(nll_nats, parts)]
    num_bytes = int(np.sum(byte_counts[1:], dtype=np.int64))
    return {order: bpb.bits_per_byte(nll, num_bytes) for order, nll in enumerate(nll_nats, start=1)}


def _chunk_nll(tables: NgramTables, tokens: np.ndarray):
    """Yield, per chunk of targets, [NLL of order 1, ..., NLL of order max_order]."""
    span = tables.max_order - 1
    for x in stream_windows([np.asarray(tokens)], span, tables.bos_id, CHUNK_TOKENS):
        check_ids(x, tables.vocab_size)
        ids = context_ids(x, tables.vocab_size, tables.bos_id, tables.buckets)
        yield [-np.log(p) for p in probs_by_order(tables, ids, x[span:])]


# ---------------------------------------------------------------------------- checks


def check_shape(vocab_size: int, bos_id: int, buckets: tuple[int, ...]) -> None:
    """Raise ValueError unless the vocab fits uint16 shards, bos_id is in it, and there is one
    power-of-two bucket count per order 3..max_order, max_order in MAX_ORDERS."""
    if vocab_size <= 0 or vocab_size > 1 << 16:
        raise ValueError(f"n-gram vocab_size={vocab_size}: expected 1..65536 (uint16 shards)")
    if not 0 <= bos_id < vocab_size:
        raise ValueError(f"n-gram bos_id={bos_id}: expected an id in [0, {vocab_size})")
    if len(buckets) + 2 not in MAX_ORDERS:
        raise ValueError(f"n-gram buckets {buckets}: expected one per order 3..max_order, max_order in {MAX_ORDERS}")
    if any(b <= 0 or b & (b - 1) for b in buckets):
        raise ValueError(f"n-gram buckets {buckets}: each must be a power of two (1, 2, 4, ...)")


def check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    """Raise ValueError if a token id is outside [0, vocab_size) (tokenizer/tables mismatch)."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"token ids reach {int(tokens.max())}, expected [0, {vocab_size}) "
            "(tokenizer and n-gram tables do not match)"
        )


def _check_total(table: CountTable, num_targets: int, order: int, where: Path | None = None) -> None:
    total = int(table.counts.sum(dtype=np.int64))
    if total != num_targets:
        raise ValueError(
            f"{where or 'n-gram tables'}: order-{order} counts sum to {total:,}, expected {num_targets:,} "
            f"targets (a {DENSE_DTYPE.__name__} cell passed its limit, or the file is corrupt)"
        )


def _delta_blocks(table: CountTable):
    """Yield (key gaps, counts) of the nonzero cells, block by block; the first gap is the first key."""
    last = 0
    for keys, counts in table.nonzero_blocks():
        yield np.diff(keys, prepend=last), counts
        last = int(keys[-1])


def _write_streamed(zf: zipfile.ZipFile, name: str, dtype, length: int, blocks) -> None:
    """Write a 1-D `.npy` member of `length` values from consecutive blocks."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for block in blocks:
            f.write(block.astype(dtype).tobytes())


def _smallest_uint(top: int):
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)


def _tables_from_arrays(arrays: dict, path: Path) -> NgramTables:
    expected = {"meta", "buckets", "requested_buckets", "key_deltas", "counts"}
    if set(arrays) != expected:
        raise ValueError(f"{path}: arrays {sorted(arrays)}, expected {sorted(expected)}")
    version, vocab_size, bos_id, max_order, num_targets = (int(v) for v in arrays["meta"])
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
    buckets = tuple(int(b) for b in arrays["buckets"])
    check_shape(vocab_size, bos_id, buckets)
    if len(buckets) + 2 != max_order:
        raise ValueError(f"{path}: {len(buckets)} bucket counts for max_order {max_order}")
    deltas, counts = arrays["key_deltas"], arrays["counts"]
    keys = np.cumsum(deltas, dtype=np.int64)
    limit = vocab_size * vocab_size * math.prod(buckets)
    if deltas.shape != counts.shape or deltas.ndim != 1:
        raise ValueError(f"{path}: key_deltas {deltas.shape} and counts {counts.shape} differ")
    if keys.size and (np.any(deltas[1:] == 0) or keys[-1] >= limit or counts.min() == 0):
        raise ValueError(
            f"{path}: keys must be strictly increasing in [0, {limit}) with positive counts, "
            f"found last key {keys[-1]} (or repeated keys / zero counts)"
        )
    top = CountTable(vocab_size * math.prod(buckets), vocab_size, counts.astype(np.int64), keys)
    _check_total(top, num_targets, max_order, path)
    requested = tuple(int(b) for b in arrays["requested_buckets"])
    return NgramTables(top=top, num_targets=num_targets, vocab_size=vocab_size, bos_id=bos_id,
                       buckets=buckets, requested_buckets=requested)
