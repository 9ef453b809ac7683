"""Stage `tokenize`: documents -> SentencePiece tokenizer + train/val shards."""

import argparse
import dataclasses
import itertools
import platform
import time
from pathlib import Path

from pgolf_core import config, corpus, export, io, tokenizer


def tokenize(cfg: config.TokenizeConfig, tokenizer_dir: Path, shards_dir: Path) -> dict:
    """Learn the tokenizer on training documents only (the first `val_documents` are
    validation), then stream every document into shards; returns the metrics."""
    start = time.perf_counter()

    def documents():
        return corpus.iter_documents(cfg.source, cfg.jsonl_path, cfg.min_doc_chars, cfg.max_documents)

    end = cfg.val_documents + cfg.tokenizer_train_documents if cfg.tokenizer_train_documents else None
    sample = list(itertools.islice(documents(), cfg.val_documents, end))
    if not sample:
        raise ValueError(f"tokenize: no training documents in {cfg.source} after {cfg.val_documents} validation ones")
    print(f"tokenize: learning a {cfg.vocab_size}-piece BPE on {len(sample):,} {cfg.source} training documents")
    model = tokenizer.train_tokenizer(sample, cfg.vocab_size, cfg.num_threads)
    del sample
    with io.atomic_path(tokenizer_dir) as tmp:
        tmp.mkdir()
        (tmp / tokenizer.MODEL_FILE).write_bytes(model)
    with io.atomic_path(shards_dir) as tmp:
        stats = export.export_shards(documents(), model, tmp, val_documents=cfg.val_documents,
                                     shard_tokens=cfg.shard_tokens, num_workers=cfg.num_workers)
    metrics = {
        "train": dataclasses.asdict(stats.train),
        "val": dataclasses.asdict(stats.val),
        "vocab_size": cfg.vocab_size,
        "corpus_sha256": stats.corpus_sha256,
        "python_version": platform.python_version(),
        "tokenize_seconds": round(time.perf_counter() - start, 3),
    }
    print(f"tokenize: {stats.train.documents:,} train docs / {stats.train.tokens:,} tokens, "
          f"{stats.val.documents:,} val docs / {stats.val.tokens:,} tokens in {metrics['tokenize_seconds']:.1f} s")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokenizer", type=Path, required=True, help="output folder of the tokenizer")
    parser.add_argument("--shards", type=Path, required=True, help="output folder of the shards")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    cfg = config.load_section(args.params, "tokenize")
    metrics = tokenize(cfg, args.tokenizer, args.shards)
    inputs = {"corpus": metrics["corpus_sha256"]}
    io.write_json_atomic(args.metrics, {**metrics, "provenance": io.provenance(inputs)})


if __name__ == "__main__":
    main()
