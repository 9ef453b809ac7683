"""Benchmark: streaming shard export (pgolf_core.export) against SentencePiece alone.

Builds a JSONL of about `--input-mb` MB by repeating a source corpus (the dev corpus of
../shared/data, or the embedded stdlib corpus), learns a tokenizer on a sample, then
measures in fresh subprocesses (so peak RSS is each run's own):
  - SentencePiece's single-thread encode rate on the same text (the reference);
  - the full export (read JSONL, encode, write shards) with 1 and 2 worker processes.
Prints one JSON line and writes bench/results/data_export.json.

    python -m bench.data_export --source data/dev_corpus/docs.jsonl --input-mb 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.header import RESULTS, header


def build_input(source: str, target_mb: float, out: Path) -> float:
    """Repeat the source documents until the JSONL holds `target_mb` MB of text."""
    from pgolf_core import corpus

    docs = list(corpus.iter_jsonl_documents(source)) if source != "embedded" else list(corpus.embedded_documents())
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    written = 0.0
    with open(out, "w", encoding="utf-8") as f:
        while written < target_mb:
            f.writelines(lines)
            written += text_mb
    return written


def child_sentencepiece(model: str, jsonl: str, sample_mb: float) -> dict:
    """SentencePiece alone, one thread, on the first `sample_mb` MB of the same documents."""
    import sentencepiece as spm

    from pgolf_core import corpus

    sp = spm.SentencePieceProcessor(model_file=model)
    docs, size = [], 0
    for d in corpus.iter_jsonl_documents(jsonl):
        docs.append(d)
        size += len(d.encode())
        if size >= sample_mb * 1e6:
            break
    start = time.perf_counter()
    for i in range(0, len(docs), 256):
        sp.encode(docs[i : i + 256], num_threads=1)
    seconds = time.perf_counter() - start
    return {"mb": size / 1e6, "seconds": seconds}


def child_export(model: str, jsonl: str, workers: int, out_dir: str) -> dict:
    from pgolf_core import corpus, export

    start = time.perf_counter()
    stats = export.export_shards(corpus.iter_jsonl_documents(jsonl), Path(model).read_bytes(), out_dir,
                                 val_documents=250, shard_tokens=100_000_000, num_workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"mb": (stats.train.bytes + stats.val.bytes) / 1e6, "seconds": seconds,
            "tokens": stats.train.tokens + stats.val.tokens}


def run_child(*args: str) -> dict:
    """Run this script in child mode; its result plus the peak RSS of it and its workers."""
    out = subprocess.run([sys.executable, "-m", "bench.data_export", "--child", *args], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="data/dev_corpus/docs.jsonl", help="JSONL or 'embedded'")
    parser.add_argument("--input-mb", type=float, default=1024.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--sp-sample-mb", type=float, default=100.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_sentencepiece(rest[0], rest[1], float(rest[2])) if kind == "sp" else \
            child_export(rest[0], rest[1], int(rest[2]), rest[3])
        self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({**result, "peak_rss_mib": (self_kib + children_kib) / 1024}))
        return

    from pgolf_core import corpus, tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pgolf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "input.jsonl"
    input_mb = build_input(args.source, args.input_mb, jsonl)
    sample = list(corpus.iter_documents("jsonl", str(jsonl), max_documents=5000))
    model = work / "tokenizer.model"
    model.write_bytes(tokenizer.train_tokenizer(sample, args.vocab_size, num_threads=os.cpu_count() or 1))
    sp = run_child("sp", str(model), str(jsonl), str(args.sp_sample_mb))
    runs = {w: run_child("export", str(model), str(jsonl), str(w), str(work / f"shards{w}")) for w in (1, 2)}
    sp_rate = sp["mb"] / sp["seconds"]
    rate = {w: r["mb"] / r["seconds"] for w, r in runs.items()}
    result = {
        **header(),
        "input_mb": round(input_mb, 1),
        "source": args.source,
        "vocab_size": args.vocab_size,
        "cpu_count": os.cpu_count(),
        "sentencepiece_mb_per_second": round(sp_rate, 3),
        "mb_per_second_per_core": round(rate[1], 3),
        "mb_per_second_2_processes": round(rate[2], 3),
        "ratio_to_sentencepiece": round(rate[1] / sp_rate, 3),
        "scaling_2_processes": round(rate[2] / rate[1], 3),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs.values()), 1),
        "peak_rss_mib_per_run": {str(w): round(r["peak_rss_mib"], 1) for w, r in runs.items()},
        "tokens": runs[1]["tokens"],
        "seconds": {str(w): round(r["seconds"], 1) for w, r in runs.items()},
    }
    line = json.dumps(result)
    print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_export.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
