"""Stage `ngrams`: count n-gram tables (orders 1..max_order) on train, score val_bpb on val.

These are the classical baselines every neural val_bpb is read against.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pgolf_core import ngram_count, ngrams
from pgolf_core.bpb import val_byte_counts
from pgolf_core.config import load_section
from pgolf_core.data import list_shards, load_split, read_header
from pgolf_core.io import atomic_path, sha256_tree, write_stage_report
from pgolf_core.tokenizer import load_tokenizer

ORDER_NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "order4", 5: "order5"}


def run_ngrams(params: Path, shards: Path, tokenizer: Path, out: Path, metrics: Path) -> dict:
    """Count the train shards, save the tables to `out`, score val, write `metrics`."""
    cfg = load_section(params, "ngrams")
    sp = load_tokenizer(tokenizer)
    vocab_size, bos_id = sp.vocab_size(), sp.bos_id()
    train_files = list_shards(shards, "train")
    train_tokens = sum(read_header(p) for p in train_files)
    print(f"ngrams: counting {len(train_files)} train shards ({train_tokens:,} tokens) in {shards}, vocab "
          f"{vocab_size}, orders 1-{cfg.max_order}, buckets {cfg.buckets}, {cfg.num_workers} workers")

    start = time.perf_counter()
    tables = ngram_count.count_shards(train_files, vocab_size, cfg.buckets, bos_id, cfg.max_memory_mib << 20,
                                      cfg.num_workers)
    count_seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        tables.save(tmp)
    table_bytes = (out / ngrams.TABLES_FILE).stat().st_size
    layout = "dense" if tables.top.is_dense else "sparse"
    print(f"ngrams: counted in {count_seconds:.1f} s ({layout}, buckets {tables.buckets}"
          f"{', hashed fallback' if tables.hash_fallback else ''}); {table_bytes:,} bytes -> {out}")

    val_tokens = load_split(shards, "val", vocab_size)
    val_bytes = val_byte_counts(sp, shards, val_tokens)
    start = time.perf_counter()
    scores = ngrams.val_bpb(tables, val_bytes, val_tokens)
    score_seconds = time.perf_counter() - start
    result = {
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
    write_stage_report(metrics, result, {"shards": sha256_tree(shards)})
    print(f"ngrams: scored {len(val_tokens):,} val tokens in {score_seconds:.1f} s: val_bpb "
          + ", ".join(f"order {k} {v:.4f}" for k, v in scores.items()) + f" -> {metrics}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    run_ngrams(args.params, args.shards, args.tokenizer, args.out, args.metrics)


if __name__ == "__main__":
    main()
