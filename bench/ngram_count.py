"""Benchmark: count unigram + bigram + hashed trigram tables on synthetic tokens.

Tokens come from a Markov-ish generator (Zipf unigrams; half the tokens follow their
predecessor to one of a few Zipf-drawn successors; documents of ~1000 tokens start with
BOS), generated chunk by chunk and never materialised at once. `tokens_per_second` is
one process's counting rate: `StreamCounter.update` (hash + scatter-add into the dense
top table) plus the derivation of the bigram and unigram tables, generation excluded.
The 2-process figure runs two such processes at once, each on half the tokens (the
`ngrams.num_workers: 2` case; merging their tables is not timed).

    python -m bench.ngram_count                 # 1e9 tokens, vocab 8192, 8 buckets/token
    python -m bench.ngram_count --tokens 1e8    # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np

from bench.header import RESULTS, header
from pgolf_core import ngram_count, ngrams

BOS = 1
ZIPF_EXPONENT = 1.1
LUT_BITS = 20  # Zipf sampling by table lookup: 2**20 slots, each a token id
FOLLOW_PROB = 0.5  # share of tokens drawn from their predecessor's successors
FOLLOW_PASSES = 6  # chains of "follow" tokens are resolved this deep
DOC_TOKENS = 1000  # mean document length


class MarkovishTokens:
    """Chunks of a synthetic token stream with a realistic key distribution."""

    def __init__(self, vocab_size: int, seed: int):
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        cdf = np.cumsum(ranks**-ZIPF_EXPONENT)
        slots = (np.arange(1 << LUT_BITS) + 0.5) / (1 << LUT_BITS) * cdf[-1]
        ids = np.random.default_rng(0).permutation(vocab_size)  # the same language for every seed
        self.lut = ids[np.searchsorted(cdf, slots)].astype(np.uint16)

    def chunk(self, num_tokens: int) -> np.ndarray:
        rng, mask = self.rng, np.uint32((1 << LUT_BITS) - 1)
        tokens = self.lut[rng.integers(0, 1 << LUT_BITS, num_tokens, dtype=np.uint32)]
        follow = np.flatnonzero(rng.random(num_tokens, dtype=np.float32) < FOLLOW_PROB)
        follow = follow[follow > 0]
        rank = np.minimum(rng.geometric(0.5, len(follow)), 8).astype(np.uint32)
        for _ in range(FOLLOW_PASSES):
            prev = tokens[follow - 1].astype(np.uint32)
            slot = (prev * np.uint32(0x9E3779B1) + rank * np.uint32(0x85EBCA6B)) >> np.uint32(32 - LUT_BITS)
            tokens[follow] = self.lut[slot & mask]
        tokens[rng.random(num_tokens, dtype=np.float32) < 1 / DOC_TOKENS] = BOS
        return tokens


def count(num_tokens: int, vocab_size: int, buckets: int, chunk_tokens: int, seed: int, save: bool = False) -> dict:
    """Count `num_tokens` synthetic tokens in this process; returns its figures (and
    those of saving the tables, when asked)."""
    plan = ngram_count.plan_counts(vocab_size, BOS, (buckets,), num_tokens, 1 << 40)
    source = MarkovishTokens(vocab_size, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    counter = ngram_count.StreamCounter(plan)  # allocates (and touches) the dense table
    alloc_seconds = count_seconds = time.perf_counter() - t0
    count_cpu_seconds = time.process_time() - c0
    generate_seconds = 0.0
    for start in range(0, num_tokens, chunk_tokens):
        t0 = time.perf_counter()
        piece = source.chunk(min(chunk_tokens, num_tokens - start))
        t1, c1 = time.perf_counter(), time.process_time()
        counter.update(piece)
        count_seconds += time.perf_counter() - t1
        count_cpu_seconds += time.process_time() - c1
        generate_seconds += t1 - t0
    t0, c0 = time.perf_counter(), time.process_time()
    tables = ngram_count.tables_from_counts(plan, counter.table(), counter.num_targets)
    bigram, unigram = tables.orders[2], tables.unigram
    derive_seconds = time.perf_counter() - t0
    count_cpu_seconds += time.process_time() - c0
    assert int(unigram.sum()) == num_tokens - 1 and int(bigram.counts.sum(dtype=np.int64)) == num_tokens - 1
    saved = {}
    if save:
        with tempfile.TemporaryDirectory() as scratch:
            t0 = time.perf_counter()
            path = tables.save(scratch)
            saved = {"save_seconds": time.perf_counter() - t0, "table_bytes": path.stat().st_size}
    return {
        "tokens": num_tokens,
        "count_seconds": count_seconds + derive_seconds,
        "count_cpu_seconds": count_cpu_seconds,  # below count_seconds when other work shared the core
        "alloc_seconds": alloc_seconds,
        "derive_seconds": derive_seconds,
        "generate_seconds": generate_seconds,
        "tokens_per_second": num_tokens / (count_seconds + derive_seconds),
        "tokens_per_second_loop": num_tokens / (count_seconds - alloc_seconds),  # hash + scatter-add only
        "trigram_keys": tables.top.num_keys,
        "bigram_keys": bigram.num_keys,
        "layout": "dense" if tables.top.is_dense else "sparse",
        "table_mib": tables.top.counts.nbytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **saved,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9, help="synthetic tokens counted per run")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--buckets", type=int, default=8, help="order-3 hashed buckets per previous token")
    parser.add_argument("--chunk", type=int, default=1 << 22, help="tokens generated (and handed over) at once")
    parser.add_argument("--no-two-process", action="store_true", help="skip the 2-process run")
    args = parser.parse_args(argv)
    num_tokens = int(args.tokens)
    config = (args.vocab, args.buckets, args.chunk)
    load_before = os.getloadavg()[0]
    single = count(num_tokens, *config, seed=1, save=True)
    result = {
        **header(),
        "tokens_per_second": single["tokens_per_second"],
        "peak_rss_mib": single["peak_rss_mib"],
        "tokens": num_tokens,
        "vocab_size": args.vocab,
        "trigram_contexts": args.vocab * args.buckets,
        "count_dtype": np.dtype(ngrams.DENSE_DTYPE).name,
        "single_process": single,
        "num_cpus": multiprocessing.cpu_count(),
    }
    if not args.no_two_process:
        context = multiprocessing.get_context("spawn")
        with context.Pool(2) as pool:
            start = time.perf_counter()
            runs = pool.starmap(count, [(num_tokens // 2, *config, seed) for seed in (2, 3)])
            wall = time.perf_counter() - start
        result["two_process"] = {
            "tokens_per_second_per_process": [r["tokens_per_second"] for r in runs],
            "tokens_per_second_total": num_tokens // 2 * 2 / max(r["count_seconds"] for r in runs),
            "wall_seconds_with_generation": wall,
            "peak_rss_mib_per_process": [r["peak_rss_mib"] for r in runs],
        }
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]  # other work on the machine, before/after
    line = json.dumps(result)
    print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ngram_count.json").write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
