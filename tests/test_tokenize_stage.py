"""The tokenize stage on each source: embedded, local JSONL, the docs cache and the
published shards (the last two from the loopback fake hub)."""

import hashlib
import json
import os

import numpy as np

from pgolf_core import config, data, hub, tokenizer
from pgolf_core.stage.tokenize import TokenizePaths, run

DOCS = [f"Document number {i} talks about {'shards' if i % 2 else 'tokens'} and the Python standard "
        f"library, version {i % 7}.{i % 5}, with some more words to learn from." for i in range(300)]


def cfg(**values):
    return config.build_section("tokenize", {"vocab_size": 300, "val_documents": 20, "num_workers": 1, **values})


def paths(root, downloads):
    return TokenizePaths(tokenizer=root / "tok", shards=root / "shards", downloads=downloads,
                         metrics=root / "tokenize.json")


def test_local_jsonl_source_splits_first_documents_into_val(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    metrics = run(cfg(source="jsonl", jsonl_path=str(path)), paths(tmp_path, tmp_path / "dl")).metrics
    assert metrics["val"]["documents"] == 20 and metrics["train"]["documents"] == 280
    sp = tokenizer.load_tokenizer(tmp_path / "tok")
    val = data.load_split(tmp_path / "shards", "val")
    assert sp.decode(val[1:].tolist()).startswith(DOCS[0])
    assert metrics["val"]["bytes"] == sum(len(d.encode()) for d in DOCS[:20])
    assert data.read_source(tmp_path / "shards") == {"source": "jsonl", "repo": "", "challenge_data": False}


def test_retokenizing_twice_gives_identical_shards(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    for name in ("a", "b"):
        run(cfg(source="jsonl", jsonl_path=str(path), num_workers=2), paths(tmp_path / name, tmp_path / "dl"))
    for name in ("tok/tokenizer.model", "shards/fineweb_train_000000.bin", "shards/fineweb_val_000000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_docs_cache_source_downloads_then_retokenizes(fake_hub, tmp_path):
    """The challenge's documents are encoded as they are, as its export does: an empty
    one and one that opens with spaces stay where they are in the validation split."""
    docs = ["", "  Leading spaces. " + DOCS[1], *DOCS[2:]]
    content = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    fake_hub.repos["willdepueoai/parameter-golf"] = {
        f"datasets/{hub.DOCS_FILE}": content,
        f"datasets/{hub.DOCS_MANIFEST_FILE}": json.dumps({"docs_sha256": hashlib.sha256(content).hexdigest()}).encode()}
    metrics = run(cfg(source="docs_cache"), paths(tmp_path, tmp_path / "dl")).metrics
    assert metrics["val"]["documents"] == 20 and (tmp_path / "dl" / hub.DOCS_FILE).read_bytes() == content
    assert metrics["val"]["bytes"] == sum(len(d.encode()) for d in docs[:20])
    sp = tokenizer.load_tokenizer(tmp_path / "tok")
    val = data.load_split(tmp_path / "shards", "val").tolist()
    starts = [i for i, t in enumerate(val) if t == tokenizer.BOS_ID] + [len(val)]
    assert len(starts) == 21 and starts[1] == 1  # the empty document: BOS alone
    assert sp.decode(val[starts[1] + 1:starts[2]]) == docs[1]
    # the docs cache the challenge's export comes from
    assert data.read_source(tmp_path / "shards") == {"source": "docs_cache", "repo": "willdepueoai/parameter-golf",
                                                     "challenge_data": True}


def test_published_source_links_shards_and_tokenizer(fake_hub, tmp_path, tiny_tokenizer_dir, tiny_sp, embedded_docs):
    model = (tiny_tokenizer_dir / tokenizer.MODEL_FILE).read_bytes()
    def shard(docs):
        stream = tokenizer.encode_documents(tiny_sp, docs)
        header = np.zeros(data.HEADER_INTS, dtype="<i4")
        header[:3] = (data.SHARD_MAGIC, data.SHARD_VERSION, len(stream))
        return header.tobytes() + stream.astype("<u2").tobytes()
    manifest = {"datasets": [{"name": "tiny", "tokenizer": "tokenizers/tiny.model", "files_train": 2, "files_val": 1}]}
    fake_hub.repos["someone/golf"] = {
        "datasets/manifest.json": json.dumps(manifest).encode(), "datasets/tokenizers/tiny.model": model,
        "datasets/datasets/tiny/fineweb_val_000000.bin": shard(embedded_docs[:5]),
        "datasets/datasets/tiny/fineweb_train_000000.bin": shard(embedded_docs[5:20]),
        "datasets/datasets/tiny/fineweb_train_000001.bin": shard(embedded_docs[20:40])}
    metrics = run(cfg(source="published", hub_repo="someone/golf", hub_dataset="tiny", train_shards=1),
                  paths(tmp_path, tmp_path / "dl")).metrics
    assert metrics["val"]["documents"] == 5 and metrics["train"]["shards"] == 1
    assert metrics["val"]["bytes"] == sum(len(d.encode()) for d in embedded_docs[:5])
    linked = tmp_path / "shards" / "fineweb_train_000000.bin"
    downloaded = tmp_path / "dl" / "datasets" / "tiny" / "fineweb_train_000000.bin"
    assert os.path.samefile(linked, downloaded)  # a hard link: the bytes exist once
    assert (tmp_path / "tok" / tokenizer.MODEL_FILE).read_bytes() == model
    # another repository's "published" data is not the challenge's
    assert data.read_source(tmp_path / "shards") == {"source": "published", "repo": "someone/golf",
                                                     "challenge_data": False}
