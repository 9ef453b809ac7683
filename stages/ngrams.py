"""Stage `ngrams`: count unigram/bigram/hashed-trigram tables on train, score val_bpb on val.

These are the classical baselines every neural val_bpb is read against.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pgolf_core import bpb, ngrams
from pgolf_core.config import load_section
from pgolf_core.data import list_shards, load_split, read_header
from pgolf_core.io import atomic_path, provenance, sha256_tree, write_json_atomic
from pgolf_core.tokenizer import load_tokenizer


def run_ngrams(params: Path, shards: Path, tokenizer: Path, out: Path, metrics: Path) -> dict:
    """Count the train shards, save the tables to `out`, score val, write `metrics`."""
    cfg = load_section(params, "ngrams")
    sp = load_tokenizer(tokenizer)
    vocab_size, bos_id = sp.vocab_size(), sp.bos_id()
    train_files = list_shards(shards, "train")
    train_tokens = sum(read_header(p) for p in train_files)
    print(f"ngrams: counting {len(train_files)} train shards ({train_tokens:,} tokens) in {shards}, "
          f"vocab {vocab_size}, {cfg.trigram_buckets} trigram buckets")

    start = time.perf_counter()
    tables = ngrams.count_shards(train_files, vocab_size, cfg.trigram_buckets, bos_id)
    count_seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        tables.save(tmp)
    table_bytes = (out / ngrams.TABLES_FILE).stat().st_size
    print(f"ngrams: counted in {count_seconds:.1f} s; {len(tables.bigram_keys):,} bigrams, "
          f"{len(tables.trigram_keys):,} trigrams, {table_bytes:,} bytes -> {out}")

    val_tokens = load_split(shards, "val", vocab_size)
    byte_tables = bpb.byte_tables(sp)
    start = time.perf_counter()
    scores = ngrams.val_bpb(tables, byte_tables, val_tokens)
    score_seconds = time.perf_counter() - start
    result = {
        "val_bpb_unigram": scores[1],
        "val_bpb_bigram": scores[2],
        "val_bpb_trigram": scores[3],
        "table_bytes": table_bytes,
        "train_tokens": train_tokens,
        "val_tokens": int(len(val_tokens)),
        "val_bytes": bpb.stream_bytes(byte_tables, val_tokens),
        "count_seconds": count_seconds,
        "score_seconds": score_seconds,
        "provenance": provenance({"shards": sha256_tree(shards)}),
    }
    write_json_atomic(metrics, result)
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
