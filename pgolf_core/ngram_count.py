"""Counting n-gram tables over a train stream in bounded memory, on any number of workers.

Stream, context and table conventions are those of `pgolf_core.ngrams`, whose
`NgramTables` a count returns. Only the top order is counted (`StreamCounter`), piece by
piece, each piece starting from the last `max_order - 1` tokens of the one before, so
shard boundaries are invisible; every lower order is derived from it exactly.

Plan (`plan_counts`), fixed before counting: the top table is dense (uint32, every cell)
when it fits the memory cap, sparse (sorted unique keys + counts) when the cells far
outnumber the targets or only the observed keys fit (there are at most as many as
targets); when neither fits, the plan halves the largest S_n until the dense table does
(`hash_fallback`): a fixed-size hashed table, never out of memory. The plan depends on
sizes and the cap only, so the counts never depend on the workers.

Workers (`count_shards`): each process counts a contiguous group of shards, starting from
the tokens before its first shard; the groups' tables are summed, so the counts equal a
single process's.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pgolf_core.data import read_header, read_shard
from pgolf_core.ngrams import (
    CHUNK_TOKENS,
    DENSE_DTYPE,
    CountTable,
    NgramTables,
    aggregate_keys,
    check_ids,
    check_shape,
    context_ids,
    merge_keys,
    stream_windows,
)

MAX_KEY = 1 << 62  # table keys stay int64
DENSE_CELLS_PER_TARGET = 64  # sparser than this, sorting the keys beats zeroing and summing every cell
SPARSE_BYTES_PER_KEY = 64  # sparse counting: keys, counts and merge temporaries, per distinct key


# ---------------------------------------------------------------------------- counting plan


@dataclass(frozen=True)
class CountPlan:
    """How a stream is counted: decided before counting from the sizes and the memory cap
    alone, so the counts never depend on the number of workers."""

    vocab_size: int
    bos_id: int
    buckets: tuple[int, ...]  # S_3..S_N as counted
    requested_buckets: tuple[int, ...]
    dense: bool  # dense top table (else sparse)
    num_workers: int  # processes counting at once (fewer than asked when tables would pass the cap)

    @property
    def num_contexts(self) -> int:
        return self.vocab_size * math.prod(self.buckets)

    @property
    def span(self) -> int:
        return len(self.buckets) + 1

    @property
    def hash_fallback(self) -> bool:
        return self.buckets != self.requested_buckets


def plan_counts(vocab_size: int, bos_id: int, buckets, num_targets: int, max_memory_bytes: int,
                num_workers: int = 1) -> CountPlan:
    """Dense if the top table and its derived lower orders fit the cap (unless sparse fits
    and the cells far outnumber the targets); else sparse if every target being a distinct
    key would fit; else fold the buckets (halving the largest S_n, the highest order on
    ties) until the dense tables fit."""
    buckets = tuple(int(b) for b in buckets)
    check_shape(vocab_size, bos_id, buckets)
    itemsize = np.dtype(DENSE_DTYPE).itemsize

    def dense_bytes(ways) -> int:  # the top table and each distinct derived table
        cells = total = vocab_size * vocab_size * math.prod(ways)
        for split in reversed(ways):
            cells //= split
            total += cells if split > 1 else 0
        return total * itemsize

    counted = buckets
    sparse_fits = num_targets * SPARSE_BYTES_PER_KEY * (len(buckets) + 1) <= max_memory_bytes  # keys <= targets
    few_targets = dense_bytes(buckets) // itemsize > DENSE_CELLS_PER_TARGET * num_targets
    dense = dense_bytes(buckets) <= max_memory_bytes and not (sparse_fits and few_targets)
    if not dense and not sparse_fits:  # the hashed fixed-size fallback
        dense = True
        while dense_bytes(counted) > max_memory_bytes:
            if max(counted, default=1) == 1:
                raise ValueError(
                    f"ngrams.max_memory_mib={max_memory_bytes / 2**20:.1f}: too small for a dense bigram "
                    f"table of vocab {vocab_size} ({dense_bytes(counted) / 2**20:.1f} MiB) or sparse "
                    f"tables of {num_targets:,} targets"
                )
            largest = max(range(len(counted)), key=lambda i: (counted[i], i))
            counted = counted[:largest] + (counted[largest] // 2,) + counted[largest + 1 :]
    if vocab_size * vocab_size * math.prod(counted) >= MAX_KEY:
        raise ValueError(f"n-gram buckets {counted} with vocab {vocab_size}: keys pass 2**62, lower the buckets")
    workers = max(1, num_workers)
    if dense:
        per_worker = vocab_size * vocab_size * math.prod(counted) * itemsize
        workers = max(1, min(workers, max_memory_bytes // per_worker))
    return CountPlan(vocab_size, bos_id, counted, buckets, dense, workers)


# ---------------------------------------------------------------------------- counting


class StreamCounter:
    """Counts the top-order table of a plan over consecutive pieces of one stream.

    Dense: one in-place scatter-add per target (`np.add.at` takes its fast path when the
    increment has the table's dtype). Sparse: per-chunk unique keys merged into a run.
    """

    def __init__(self, plan: CountPlan, carry: np.ndarray | None = None, chunk_tokens: int = CHUNK_TOKENS):
        self.plan, self.carry, self.chunk_tokens = plan, carry, chunk_tokens
        cells = plan.num_contexts * plan.vocab_size if plan.dense else 0
        self.counts = np.empty(cells, dtype=DENSE_DTYPE if plan.dense else np.int64)
        self.counts.fill(0)  # touch every page now, in order: random first touches cost ~3x more
        self.keys = None if plan.dense else np.zeros(0, dtype=np.int64)
        self.one = np.ones(1, dtype=self.counts.dtype)[0]
        self.pending = []  # sparse: per-chunk (keys, counts) not yet merged into the run
        self.num_targets = 0

    def update(self, piece: np.ndarray) -> None:
        """Count the targets of the next piece of the stream (uint16 or int tokens)."""
        plan = self.plan
        windows = stream_windows([piece], plan.span, plan.bos_id, self.chunk_tokens, self.carry)
        for x in windows:
            check_ids(x, plan.vocab_size)
            keys = context_ids(x, plan.vocab_size, plan.bos_id, plan.buckets)[-1]
            keys *= plan.vocab_size
            keys += x[plan.span :]
            if plan.dense:
                np.add.at(self.counts, keys, self.one)
            else:
                self.pending.append(aggregate_keys(keys))
                if sum(len(k) for k, _ in self.pending) >= len(self.keys):
                    self._merge_pending()  # merges cost O(run) each, so runs double: O(n log n)
            self.carry = x[len(x) - plan.span :]
            self.num_targets += len(x) - plan.span
        if self.carry is None and len(piece):  # a 1-token stream start: no target, but a carry
            self.carry = np.concatenate([np.full(plan.span - 1, plan.bos_id), np.asarray(piece[:1])])

    def table(self) -> CountTable:
        self._merge_pending()
        return CountTable(self.plan.num_contexts, self.plan.vocab_size, self.counts, self.keys)

    def _merge_pending(self) -> None:
        if self.pending:
            keys, counts = (np.concatenate(a) for a in zip(*self.pending))
            self.keys, self.counts = merge_keys((self.keys, self.counts), aggregate_keys(keys, counts))
            self.pending = []


def count_ngrams(pieces, vocab_size: int, buckets, bos_id: int, max_memory_bytes: int = 1 << 30,
                 chunk_tokens: int = CHUNK_TOKENS) -> NgramTables:
    """Count orders 1..len(buckets)+2 over consecutive in-memory pieces of one stream."""
    pieces = [np.asarray(p) for p in pieces]
    num_targets = max(sum(len(p) for p in pieces) - 1, 0)
    plan = plan_counts(vocab_size, bos_id, buckets, num_targets, max_memory_bytes)
    counter = StreamCounter(plan, chunk_tokens=chunk_tokens)
    for piece in pieces:
        counter.update(piece)
    return tables_from_counts(plan, counter.table(), counter.num_targets)


def count_shards(paths, vocab_size: int, buckets, bos_id: int, max_memory_bytes: int = 1 << 30,
                 num_workers: int = 1, progress: bool = True, chunk_tokens: int = CHUNK_TOKENS) -> NgramTables:
    """Count train shard files (in stream order) in bounded memory, over `num_workers`
    processes that each count a contiguous group of shards; the groups' tables are summed,
    so the counts equal a single process's."""
    paths = [Path(p) for p in paths]
    sizes = [read_header(p) for p in paths]
    num_targets = max(sum(sizes) - 1, 0)
    plan = plan_counts(vocab_size, bos_id, buckets, num_targets, max_memory_bytes, num_workers)
    if plan.num_workers < num_workers:
        warnings.warn(f"ngrams: {num_workers} workers' tables would pass the memory cap "
                      f"({max_memory_bytes / 2**20:.0f} MiB); counting with {plan.num_workers}")
    carries = _shard_carries(paths, sizes, plan)
    groups = _split_groups(sizes, plan.num_workers)
    if len(groups) == 1:
        table = _count_group(plan, paths, carries, chunk_tokens, progress)
        return tables_from_counts(plan, table, num_targets)
    with tempfile.TemporaryDirectory(prefix="ngrams-") as scratch:
        outs = [Path(scratch) / f"group{i}" for i in range(len(groups))]
        jobs = [(plan, [paths[i] for i in g], [carries[i] for i in g], chunk_tokens, False, out)
                for g, out in zip(groups, outs)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
            for _ in tqdm(pool.map(_count_group, *zip(*jobs)), total=len(jobs),
                          desc="ngrams: count", unit="group", disable=not progress):
                pass
        table = _merge_files(plan, outs)
    return tables_from_counts(plan, table, num_targets)


def tables_from_counts(plan: CountPlan, top: CountTable, num_targets: int) -> NgramTables:
    """The tables of a finished count, lower orders derived (and checked: `orders`)."""
    tables = NgramTables(top=top, num_targets=num_targets, vocab_size=plan.vocab_size, bos_id=plan.bos_id,
                         buckets=plan.buckets, requested_buckets=plan.requested_buckets)
    tables.orders  # derive (and check) the lower orders now: a wrapped count fails here, not in scoring
    return tables


def _count_group(plan, paths, carries, chunk_tokens, progress, out: Path | None = None) -> CountTable | None:
    """Count consecutive shards (the first one's carry given) into one table; a worker
    process saves it to `out` (.counts.npy, .keys.npy) instead of returning it."""
    counter = StreamCounter(plan, carries[0] if carries else None, chunk_tokens)
    for path in tqdm(paths, desc="ngrams: count", unit="shard", disable=not progress):
        counter.update(read_shard(path, mmap=True))
    table = counter.table()
    if out is None:
        return table
    np.save(out.with_suffix(".counts.npy"), table.counts)
    np.save(out.with_suffix(".keys.npy"), table.keys if table.keys is not None else np.zeros(0, np.int64))
    return None


def _merge_files(plan: CountPlan, outs) -> CountTable:
    """Sum the groups' tables, reading one memory-mapped file at a time."""
    total = None
    for out in outs:
        counts = np.load(out.with_suffix(".counts.npy"), mmap_mode="r")
        keys = np.load(out.with_suffix(".keys.npy"), mmap_mode="r")
        if plan.dense:
            total = np.array(counts) if total is None else np.add(total, counts, out=total)
        else:
            total = merge_keys(total or (keys[:0], counts[:0]), (keys, counts))
    if plan.dense:
        return CountTable(plan.num_contexts, plan.vocab_size, total)
    return CountTable(plan.num_contexts, plan.vocab_size, total[1], total[0])


def _shard_carries(paths, sizes, plan: CountPlan) -> list[np.ndarray | None]:
    """The `span` stream tokens before each shard (BOS-padded near the start; None before
    the first token), read from the previous shards' tails."""
    carries, tail, seen = [], np.zeros(0, dtype=np.int64), 0
    for path, size in zip(paths, sizes):
        if seen == 0:
            carries.append(None)
        else:
            carries.append(np.concatenate([np.full(plan.span, plan.bos_id), tail])[-plan.span :])
        if size:
            end = read_shard(path, mmap=True)[max(size - plan.span, 0) :].astype(np.int64)
            tail = np.concatenate([tail, end])[-plan.span :]
        seen += size
    return carries


def _split_groups(sizes, num_groups: int) -> list[list[int]]:
    """Contiguous shard index groups of about equal token counts (empty groups dropped)."""
    bounds = np.cumsum([0, *sizes])
    cuts = np.searchsorted(bounds, np.linspace(0, bounds[-1], num_groups + 1)[1:-1], side="right") - 1
    groups = np.split(np.arange(len(sizes)), cuts)
    return [g.tolist() for g in groups if len(g)] or [[]]
