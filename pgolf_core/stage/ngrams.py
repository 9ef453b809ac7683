"""Stage `ngrams`: count n-gram tables (orders 1..max_order) on train, score val_bpb on val.

These are the classical baselines every neural val_bpb is read against.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pgolf_core import ngram_count, ngrams
from pgolf_core.config import NgramConfig
from pgolf_core.data import list_shards, read_header
from pgolf_core.io import atomic_path, sha256_tree
from pgolf_core.stage.result import StageResult
from pgolf_core.stage.validation import load_validation
from pgolf_core.tokenizer import load_tokenizer

ORDER_NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "order4", 5: "order5"}


@dataclasses.dataclass(frozen=True)
class NgramsPaths:
    shards: Path
    tokenizer: Path
    out: Path = dataclasses.field(metadata={"help": "output folder of the tables"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: NgramConfig, paths: NgramsPaths) -> StageResult:
    """Count the train shards, save the tables to `paths.out`, score val."""
    sp = load_tokenizer(paths.tokenizer)
    vocab_size, bos_id = sp.vocab_size(), sp.bos_id()
    train_files = list_shards(paths.shards, "train")
    train_tokens = sum(read_header(p) for p in train_files)
    print(f"ngrams: counting {len(train_files)} train shards ({train_tokens:,} tokens) in {paths.shards}, vocab "
          f"{vocab_size}, orders 1-{cfg.max_order}, buckets {cfg.buckets}, {cfg.num_workers} workers")

    start = time.perf_counter()
    tables = ngram_count.count_shards(train_files, vocab_size, cfg.buckets, bos_id, cfg.max_memory_mib << 20,
                                      cfg.num_workers)
    count_seconds = time.perf_counter() - start
    with atomic_path(paths.out) as tmp:
        tables.save(tmp)
    table_bytes = (paths.out / ngrams.TABLES_FILE).stat().st_size
    layout = "dense" if tables.top.is_dense else "sparse"
    print(f"ngrams: counted in {count_seconds:.1f} s ({layout}, buckets {tables.buckets}"
          f"{', hashed fallback' if tables.hash_fallback else ''}); {table_bytes:,} bytes -> {paths.out}")

    _, val_tokens, val_bytes = load_validation(paths.tokenizer, paths.shards)  # after counting: not held meanwhile
    start = time.perf_counter()
    scores = ngrams.val_bpb(tables, val_bytes, val_tokens)
    score_seconds = time.perf_counter() - start
    metrics = {
        **{f"val_bpb_{ORDER_NAMES[order]}": value for order, value in scores.items()},
        "table_bytes": table_bytes,
        "train_tokens": train_tokens,
        "val_tokens": int(len(val_tokens)),
        "val_bytes": int(val_bytes.sum()),
        "count_seconds": count_seconds,
        "score_seconds": score_seconds,
        "count_layout": layout,
        "hash_fallback": tables.hash_fallback,
        **{f"order{order}_buckets_counted": b for order, b in enumerate(tables.buckets, start=3)},
        "top_order_keys": tables.top.num_keys,
    }
    return StageResult(metrics, {"shards": sha256_tree(paths.shards)}, summary=[
        f"ngrams: scored {len(val_tokens):,} val tokens in {score_seconds:.1f} s: val_bpb "
        + ", ".join(f"order {k} {v:.4f}" for k, v in scores.items()) + f" -> {paths.metrics}"])
