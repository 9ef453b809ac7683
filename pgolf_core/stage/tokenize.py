"""Stage `tokenize`: documents -> SentencePiece tokenizer + train/val shards, or the
challenge's published shards and tokenizer fetched from the hub."""

from __future__ import annotations

import dataclasses
import itertools
import platform
import time
from pathlib import Path

from pgolf_core import caseops, corpus, data, export, io, tokenizer
from pgolf_core.bpb import write_byte_sidecars
from pgolf_core.config import TokenizeConfig
from pgolf_core.stage.result import StageResult


@dataclasses.dataclass(frozen=True)
class TokenizePaths:
    tokenizer: Path = dataclasses.field(metadata={"help": "output folder of the tokenizer"})
    shards: Path = dataclasses.field(metadata={"help": "output folder of the shards"})
    downloads: Path = dataclasses.field(metadata={"help": "hub downloads (kept across runs: resumable)"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: TokenizeConfig, paths: TokenizePaths) -> StageResult:
    """Write the tokenizer and the shards; the metrics are the documents, tokens and bytes
    of each split, with the corpus's hash as the provenance's input."""
    start = time.perf_counter()
    metrics = _tokenize(cfg, paths.tokenizer, paths.shards, paths.downloads)
    metrics.update(python_version=platform.python_version(), tokenize_seconds=round(time.perf_counter() - start, 3))
    return StageResult(metrics, {"corpus": metrics["corpus_sha256"]}, summary=[
        f"tokenize: {metrics['train']['tokens']:,} train / {metrics['val']['tokens']:,} val tokens "
        f"in {metrics['tokenize_seconds']:.1f} s"])


def _tokenize(cfg: TokenizeConfig, tokenizer_dir: Path, shards_dir: Path, downloads: Path) -> dict:
    """Learn the tokenizer on training documents only (the first `val_documents` are
    validation), then stream every document into shards; returns the metrics."""
    jsonl_path, repo, challenge_data = cfg.jsonl_path, "", False
    if cfg.source in ("docs_cache", "published"):
        from pgolf_core import hub  # needs huggingface_hub, which GPU benchmark machines lack

        repo = cfg.hub_repo or hub.DEFAULT_REPOS[cfg.source]
        # the challenge's FineWeb: its published export, or the docs cache that was tokenized from
        challenge_data = repo == hub.DEFAULT_REPOS[cfg.source]
        if cfg.source == "published":
            published = hub.download_published(repo, cfg.hub_dataset, cfg.train_shards, downloads, cfg.hub_revision)
            with io.atomic_path(tokenizer_dir) as tok_tmp, io.atomic_path(shards_dir) as shard_tmp:
                hub.install_published(published, tok_tmp, shard_tmp)
                data.write_source(shard_tmp, cfg.source, repo, challenge_data)
            return hub.installed_sizes(tokenizer_dir, shards_dir, published.commit)
        jsonl_path = str(hub.download_docs_cache(repo, downloads, cfg.hub_revision).docs)

    def documents():
        return corpus.iter_documents("embedded" if cfg.source == "embedded" else "jsonl", jsonl_path,
                                     cfg.min_doc_chars, cfg.max_documents, as_is=cfg.source == "docs_cache")

    transform = caseops.encode if cfg.case_transform == "caseops" else None
    end = cfg.val_documents + cfg.tokenizer_train_documents if cfg.tokenizer_train_documents else None
    sample = [transform(d) if transform else d for d in itertools.islice(documents(), cfg.val_documents, end)]
    if not sample:
        raise ValueError(f"tokenize: no training documents in {cfg.source} after {cfg.val_documents} validation ones")
    print(f"tokenize: learning a {cfg.vocab_size}-piece BPE on {len(sample):,} {cfg.source} training documents")
    model = tokenizer.train_tokenizer(sample, cfg.vocab_size, cfg.num_threads,
                                      reserved=caseops.OPERATORS if transform else ())
    del sample
    with io.atomic_path(tokenizer_dir) as tmp:
        tmp.mkdir()
        (tmp / tokenizer.MODEL_FILE).write_bytes(model)
    with io.atomic_path(shards_dir) as tmp:
        stats = export.export_shards(documents(), model, tmp, val_documents=cfg.val_documents,
                                     shard_tokens=cfg.shard_tokens, num_workers=cfg.num_workers, transform=transform)
        data.write_source(tmp, cfg.source, repo, challenge_data)
        if transform and write_byte_sidecars(tokenizer.load_tokenizer(tokenizer_dir), tmp) != stats.val.bytes:
            raise ValueError("CaseOps byte sidecars do not add up to the validation text's UTF-8 length")
    return {"train": dataclasses.asdict(stats.train), "val": dataclasses.asdict(stats.val),
            "vocab_size": cfg.vocab_size, "case_transform": cfg.case_transform, "corpus_sha256": stats.corpus_sha256}
