"""Stage `tokenize`: documents -> SentencePiece tokenizer + train/val shards."""

import argparse
import platform
import time
from pathlib import Path

from pgolf_core import config, corpus, data, io, tokenizer


def tokenize(cfg: config.TokenizeConfig, tokenizer_dir: Path, shards_dir: Path) -> dict:
    """Split the documents (first `val_documents` = validation), learn the tokenizer on
    the training documents only, write both splits as shards; returns the metrics."""
    start = time.perf_counter()
    docs = corpus.load_documents(cfg.source, cfg.jsonl_path, cfg.min_doc_chars, cfg.max_documents)
    if len(docs) <= cfg.val_documents:
        raise ValueError(f"{len(docs)} documents: none left for training after {cfg.val_documents} validation ones")
    val_docs, train_docs = docs[: cfg.val_documents], docs[cfg.val_documents :]
    print(f"tokenize: {len(docs)} documents from {cfg.source} ({len(val_docs)} val), "
          f"learning a {cfg.vocab_size}-piece BPE on the train split")
    model = tokenizer.train_tokenizer(train_docs, cfg.vocab_size, cfg.num_threads)
    with io.atomic_path(tokenizer_dir) as tmp:
        tmp.mkdir()
        (tmp / tokenizer.MODEL_FILE).write_bytes(model)
    sp = tokenizer.load_tokenizer(tokenizer_dir)
    metrics = {}
    with io.atomic_path(shards_dir) as tmp:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            stream = tokenizer.encode_documents(sp, split_docs, cfg.num_threads)
            shard_tokens = cfg.shard_tokens if split == "train" else len(stream)
            data.write_split(tmp, split, stream, shard_tokens)
            metrics[split] = {
                "documents": len(split_docs),
                "bytes": sum(len(d.encode("utf-8")) for d in split_docs),
                "tokens": int(len(stream)),
            }
    metrics.update(
        vocab_size=sp.vocab_size(),
        corpus_sha256=corpus.corpus_sha256(docs),
        python_version=platform.python_version(),
        tokenize_seconds=round(time.perf_counter() - start, 3),
    )
    print(f"tokenize: {metrics['train']['tokens']:,} train / {metrics['val']['tokens']:,} val tokens "
          f"in {metrics['tokenize_seconds']:.1f} s")
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
