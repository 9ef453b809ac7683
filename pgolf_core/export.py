"""Streaming shard export: documents -> [BOS] + tokens -> train/val shard files.

Memory stays bounded whatever the input size: documents are read one at a time,
encoded in batches by a pool of worker processes with a fixed number of batches in
flight, and tokens are flushed to a shard as soon as `shard_tokens` have gathered.
Order is preserved, so the output is byte-identical for any number of workers.
The first `val_documents` documents form the validation split (the FineWeb rule).
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from pgolf_core import data
from pgolf_core.tokenizer import encode_documents

BATCH_DOCUMENTS = 256  # documents per task sent to a worker
IN_FLIGHT_PER_WORKER = 4  # batches queued per worker: bounds memory, keeps workers busy


@dataclass
class SplitStats:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    shards: int = 0


@dataclass
class ExportStats:
    train: SplitStats = field(default_factory=SplitStats)
    val: SplitStats = field(default_factory=SplitStats)
    corpus_sha256: str = ""


class _ShardWriter:
    """Appends token arrays to a split and writes a shard whenever one is full."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, stats: SplitStats):
        self.directory, self.split, self.shard_tokens, self.stats = directory, split, shard_tokens, stats
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0

    def append(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled or not self.stats.shards:  # an empty split still gets one (empty) shard
            data.write_shard(self.directory / data.shard_name(self.split, self.stats.shards), self.buffer[: self.filled])
            self.stats.shards += 1
            self.stats.tokens += self.filled
            self.filled = 0


_worker_sp: spm.SentencePieceProcessor | None = None  # each worker process loads the model once


_worker_transform: Callable[[str], str] | None = None


def _init_worker(model_proto: bytes, transform: Callable[[str], str] | None) -> None:
    global _worker_sp, _worker_transform
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_proto)
    _worker_transform = transform


def _encode_batch(docs: list[str]) -> tuple[np.ndarray, int]:
    """([BOS] + tokens of each (transformed) document as one uint16 stream; UTF-8 bytes
    of the original documents)."""
    texts = [_worker_transform(d) for d in docs] if _worker_transform else docs
    return encode_documents(_worker_sp, texts), sum(len(d.encode("utf-8")) for d in docs)


def export_shards(docs: Iterable[str], model_proto: bytes, directory: str | Path, *, val_documents: int,
                  shard_tokens: int, num_workers: int = 1, transform: Callable[[str], str] | None = None,
                  progress: bool = True) -> ExportStats:
    """Encode `docs` (the first `val_documents` are validation) into shards in `directory`.

    Validation goes into as many `fineweb_val_*` shards as needed too (same size cap).
    `transform` (a module-level function, e.g. `caseops.encode`) is applied to each
    document before encoding; sizes and the corpus hash are of the original text.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stats = ExportStats()
    writers = {split: _ShardWriter(directory, split, shard_tokens, getattr(stats, split)) for split in ("val", "train")}
    digest = hashlib.sha256()
    bar = tqdm(desc="export", unit="doc", disable=not progress, smoothing=0.1)

    def batches() -> Iterator[tuple[str, list[str]]]:
        it = iter(docs)
        for split, limit in (("val", val_documents), ("train", None)):
            remaining = limit
            while remaining is None or remaining > 0:
                size = BATCH_DOCUMENTS if remaining is None else min(BATCH_DOCUMENTS, remaining)
                batch = list(itertools.islice(it, size))
                if not batch:
                    break
                for d in batch:
                    digest.update(d.encode("utf-8") + b"\0")
                if remaining is not None:
                    remaining -= len(batch)
                yield split, batch

    def consume(split: str, docs_in_batch: int, result: tuple[np.ndarray, int]) -> None:
        tokens, nbytes = result
        writers[split].append(tokens)
        split_stats = getattr(stats, split)
        split_stats.documents += docs_in_batch
        split_stats.bytes += nbytes
        bar.update(docs_in_batch)

    if num_workers <= 1:
        _init_worker(model_proto, transform)
        for split, batch in batches():
            consume(split, len(batch), _encode_batch(batch))
    else:
        # Spawned, not forked: the progress bar's monitor thread (and torch's threads, in a
        # process that imported it) are running by now, and a fork copies whatever lock
        # such a thread holds (Python 3.12 warns of the deadlock). A spawned worker imports
        # this module afresh, about 0.15 s, once per export.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                 initargs=(model_proto, transform)) as pool:
            pending: list[tuple[str, int, Future]] = []
            for split, batch in batches():
                pending.append((split, len(batch), pool.submit(_encode_batch, batch)))
                while len(pending) >= num_workers * IN_FLIGHT_PER_WORKER:
                    split0, n0, fut = pending.pop(0)
                    consume(split0, n0, fut.result())
            for split0, n0, fut in pending:
                consume(split0, n0, fut.result())
    bar.close()
    for writer in writers.values():
        writer.flush()
    stats.corpus_sha256 = digest.hexdigest()
    if stats.val.documents < val_documents:
        raise ValueError(f"the source has {stats.val.documents} documents, fewer than the "
                         f"{val_documents} validation documents asked for")
    if not stats.train.documents:
        raise ValueError(f"no training documents after the first {val_documents} (validation)")
    return stats
