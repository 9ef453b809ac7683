"""pgolf_core.hub against a fake Hugging Face hub on loopback (tests/fake_hub.py), reached the
way users reach a mirror: `HF_ENDPOINT`. Also the streaming JSONL reader for the docs cache."""

import hashlib
import json
import socket
import time

import numpy as np
import pytest
from huggingface_hub import constants

from fake_hub import FakeHub
from pgolf_core import corpus, data, hub

REPO = "kevclark/parameter-golf"
DATASET = "fineweb10B_sp8192"
ROOT = "datasets"
SHARDS = f"datasets/{DATASET}"


def shard_bytes(num_tokens: int, seed: int) -> bytes:
    header = np.zeros(data.HEADER_INTS, dtype="<i4")
    header[:3] = (data.SHARD_MAGIC, data.SHARD_VERSION, num_tokens)
    tokens = np.random.default_rng(seed).integers(0, 8192, num_tokens).astype("<u2")
    return header.tobytes() + tokens.tobytes()


def publish(server: FakeHub, num_train: int = 3, manifest: dict | None = None) -> dict[str, bytes]:
    """The published sp8192 layout: 2 val shards, `num_train` train shards, a tokenizer, the manifest."""
    files = {f"{SHARDS}/{data.shard_name('val', i)}": shard_bytes(300, 100 + i) for i in range(2)}
    files.update({f"{SHARDS}/{data.shard_name('train', i)}": shard_bytes(500, i) for i in range(num_train)})
    files["tokenizers/fineweb_8192_bpe.model"] = b"sentencepiece model proto" * 10
    files["tokenizers/fineweb_8192_bpe.vocab"] = b"<unk>\t0\n"
    manifest = manifest or {  # the shape the challenge's exporter writes
        "version": "10B",
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {}},
                     {"name": DATASET, "tokenizer_name": "sp_bpe_8192", "vocab_size": 8192,
                      "stats": {"files_train": num_train, "files_val": 2, "tokens_train": 500 * num_train}}],
        "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model",
                        "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"}],
    }
    files["manifest.json"] = json.dumps(manifest).encode()
    server.repos[REPO] = {f"{ROOT}/{path}": content for path, content in files.items()}
    return files


def local_bins(dest) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*.bin"))


def test_happy_path_lands_verified_files_in_the_challenge_layout(fake_hub, tmp_path):
    files = publish(fake_hub)
    result = hub.download_published(REPO, DATASET, 2, tmp_path, progress=False)
    assert result.commit == fake_hub.commit(REPO)
    assert [p.name for p in result.val_files] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in result.train_files] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [p.name for p in result.tokenizer_files] == ["fineweb_8192_bpe.model", "fineweb_8192_bpe.vocab"]
    assert result.vocab_size == 8192 and result.manifest == tmp_path / "manifest.json"
    for path in (*result.val_files, *result.train_files, *result.tokenizer_files, result.manifest):
        assert path.read_bytes() == files[str(path.relative_to(tmp_path))]
    assert data.list_shards(tmp_path / SHARDS, "train") == list(result.train_files)  # third shard not fetched
    assert data.load_split(tmp_path / SHARDS, "val").size == 600
    assert len(result.downloaded) == 7 and not (tmp_path / hub.STAGING_DIR).exists()


def test_rerun_downloads_nothing(fake_hub, tmp_path):
    publish(fake_hub)
    hub.download_published(REPO, DATASET, 3, tmp_path, progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    fake_hub.requests.clear()
    result = hub.download_published(REPO, DATASET, 3, tmp_path, progress=False)
    assert result.downloaded == () and fake_hub.downloads() == []
    assert [m for m, _ in fake_hub.requests] == ["GET"]  # only the listing of the commit
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_interrupted_run_resumes(fake_hub, tmp_path):
    files = publish(fake_hub)
    done, partial = f"{SHARDS}/fineweb_val_000000.bin", f"{SHARDS}/fineweb_train_000000.bin"
    (tmp_path / SHARDS).mkdir(parents=True)
    (tmp_path / done).write_bytes(files[done])
    (tmp_path / partial).write_bytes(files[partial][:1500])  # a copy cut short by a kill
    leftover = tmp_path / hub.STAGING_DIR / ".cache/huggingface/download/x.incomplete"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    result = hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)
    assert done not in result.downloaded and partial in result.downloaded
    assert (tmp_path / partial).read_bytes() == files[partial]
    assert not (tmp_path / hub.STAGING_DIR).exists()


def test_a_new_commit_refetches_only_the_files_that_changed(fake_hub, tmp_path):
    files = publish(fake_hub)
    hub.download_published(REPO, DATASET, 2, tmp_path, progress=False)
    changed = f"{SHARDS}/fineweb_train_000001.bin"
    fake_hub.repos[REPO][f"{ROOT}/{changed}"] = shard_bytes(500, 99)  # same name and size, new content
    result = hub.download_published(REPO, DATASET, 2, tmp_path, progress=False)
    assert result.downloaded == (changed,) and result.commit == fake_hub.commit(REPO)
    assert (tmp_path / changed).read_bytes() != files[changed]


def test_missing_file_on_the_hub_is_named_before_anything_is_fetched(fake_hub, tmp_path):
    publish(fake_hub)
    del fake_hub.repos[REPO][f"{ROOT}/{SHARDS}/fineweb_train_000001.bin"]
    with pytest.raises(FileNotFoundError, match=rf"{ROOT}/{SHARDS}/fineweb_train_000001.bin") as e:
        hub.download_published(REPO, DATASET, 3, tmp_path, progress=False)
    assert REPO in str(e.value) and "main" in str(e.value)
    assert local_bins(tmp_path) == []


@pytest.mark.parametrize("repo, revision, message", [
    ("nobody/nothing", "main", "'nobody/nothing' on http://127.0.0.1:.* not found"),
    (REPO, "v999", "revision 'v999' not found in dataset repo 'kevclark/parameter-golf'"),
])
def test_unknown_repo_or_revision_is_named(fake_hub, tmp_path, repo, revision, message):
    publish(fake_hub)
    with pytest.raises(FileNotFoundError, match=message):
        hub.download_published(repo, DATASET, 1, tmp_path, revision=revision, progress=False)


def test_unreachable_hub_is_named(fake_hub, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(ValueError, match=f"could not list dataset repo '{REPO}' on {closed} at 'main'"):
        hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)


def test_unknown_dataset_lists_the_published_ones(fake_hub, tmp_path):
    publish(fake_hub)
    with pytest.raises(ValueError, match="no entry named 'fineweb10B_sp4096' .found: fineweb10B_sp1024, fineweb10B_sp8192"):
        hub.download_published(REPO, "fineweb10B_sp4096", 1, tmp_path, progress=False)
    with pytest.raises(ValueError, match="has 3 train shards, 4 were asked for"):
        hub.download_published(REPO, DATASET, 4, tmp_path, progress=False)


def test_transfer_cut_mid_stream_is_an_error_and_leaves_no_file(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's own resume retries
    publish(fake_hub)
    fake_hub.faults[f"{ROOT}/{SHARDS}/fineweb_val_000000.bin"] = ("drop", 700)
    with pytest.raises(ValueError, match=r"fineweb_val_000000.bin from kevclark/parameter-golf@main.*download failed"):
        hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)
    assert local_bins(tmp_path) == []
    del fake_hub.faults[f"{ROOT}/{SHARDS}/fineweb_val_000000.bin"]  # the network recovers: a rerun completes
    assert len(hub.download_published(REPO, DATASET, 1, tmp_path, progress=False).val_files) == 2


def test_truncated_shard_on_the_hub_fails_the_header_check(fake_hub, tmp_path):
    publish(fake_hub)
    name = f"{ROOT}/{SHARDS}/fineweb_train_000000.bin"
    fake_hub.repos[REPO][name] = fake_hub.repos[REPO][name][:-100]  # listing and transfer agree; the file is short
    with pytest.raises(ValueError, match="header promises 500 tokens.*truncated"):
        hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)
    assert "fineweb_train_000000.bin" not in " ".join(local_bins(tmp_path))
    assert fake_hub.downloads().count(f"/{name.replace(ROOT, REPO + '/' + ROOT, 1)}") == 2  # fetched once more


def test_checksum_mismatch_against_the_manifest(fake_hub, tmp_path):
    good = shard_bytes(500, 0)
    manifest = {"datasets": {DATASET: {  # the other accepted shape: a mapping, file lists, checksums
        "train_files": [{"name": "fineweb_train_000000.bin", "sha256": hashlib.sha256(good).hexdigest(), "size": len(good)}],
        "val_files": ["fineweb_val_000000.bin", "fineweb_val_000001.bin"],
        "tokenizer": ["fineweb_8192_bpe.model"]}}}
    publish(fake_hub, num_train=1, manifest=manifest)
    fake_hub.repos[REPO][f"{ROOT}/{SHARDS}/fineweb_train_000000.bin"] = shard_bytes(500, 7)  # valid, but not it
    with pytest.raises(ValueError, match="sha256 .* where the manifest says .*checksum mismatch"):
        hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)
    assert local_bins(tmp_path) == [f"{SHARDS}/fineweb_val_000000.bin", f"{SHARDS}/fineweb_val_000001.bin"]


def test_corrupt_transfer_fails_the_hub_checksum(fake_hub, tmp_path):
    files = publish(fake_hub)
    name = f"{SHARDS}/fineweb_val_000001.bin"
    fake_hub.faults[f"{ROOT}/{name}"] = ("body", files[name][:-2] + b"\xff\xff")  # same size, one token flipped
    with pytest.raises(ValueError, match="where the hub says .*checksum mismatch"):
        hub.download_published(REPO, DATASET, 1, tmp_path, progress=False)
    assert local_bins(tmp_path) == [f"{SHARDS}/fineweb_val_000000.bin"]


def publish_docs(server: FakeHub, docs: list[str], sidecar: dict | None = None) -> bytes:
    content = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    sidecar = sidecar or {"docs_sha256": hashlib.sha256(content).hexdigest(), "num_docs": len(docs), "docs_val": 2}
    server.repos["willdepueoai/parameter-golf"] = {
        f"{ROOT}/{hub.DOCS_FILE}": content, f"{ROOT}/{hub.DOCS_MANIFEST_FILE}": json.dumps(sidecar).encode()}
    return content


def test_docs_cache_downloads_verifies_and_streams(fake_hub, tmp_path):
    docs = ["first document", "second, with ünïcode", "third\nline"]
    content = publish_docs(fake_hub, docs)
    result = hub.download_docs_cache("willdepueoai/parameter-golf", tmp_path, progress=False)
    assert result.docs.read_bytes() == content and (result.num_docs, result.docs_val) == (3, 2)
    assert result.docs_sha256 == hashlib.sha256(content).hexdigest()
    assert list(corpus.iter_jsonl_documents(result.docs)) == docs
    again = hub.download_docs_cache("willdepueoai/parameter-golf", tmp_path, progress=False)
    assert again.downloaded == ()


def test_docs_cache_sha256_mismatch_is_named(fake_hub, tmp_path):
    publish_docs(fake_hub, ["a", "b"], sidecar={"docs_sha256": "0" * 64, "num_docs": 2})
    with pytest.raises(ValueError, match="docs_selected.jsonl .* where the manifest says 0{64}"):
        hub.download_docs_cache("willdepueoai/parameter-golf", tmp_path, progress=False)
    assert not (tmp_path / hub.DOCS_FILE).exists()


def test_read_manifest_accepts_counts_lists_and_tokenizer_forms():
    spec = hub.read_manifest({"datasets": [{"name": "d", "files_train": 2, "files_val": 1, "tokenizer": "t.model"}]}, "d")
    assert [f.path for f in spec.train] == ["datasets/d/fineweb_train_000000.bin", "datasets/d/fineweb_train_000001.bin"]
    assert [f.path for f in spec.tokenizer] == ["tokenizers/t.model"] and spec.vocab_size is None
    spec = hub.read_manifest({"datasets": {"d": {"train_files": ["other/x.bin"], "val_files": [{"path": "v/y.bin", "size": 9}],
                                                 "tokenizer": {"model_path": "tok/m.model"}}}}, "d")
    assert [f.path for f in spec.train] == ["other/x.bin"] and spec.val[0].size == 9
    assert [f.path for f in spec.tokenizer] == ["tok/m.model"]


@pytest.mark.parametrize("manifest, message", [
    ([], "expected a JSON object, found list"),
    ({"dataset": []}, "no 'datasets' list or mapping"),
    ({"datasets": [{"name": "d", "files_val": 1, "tokenizer": "t"}]}, "no train shard count or list .looked for train_files, files_train, stats.files_train"),
    ({"datasets": [{"name": "d", "files_train": 1, "stats": {"files_val": 0}, "tokenizer": "t"}]}, "no validation shards"),
    ({"datasets": [{"name": "d", "files_train": "many", "files_val": 1}]}, "files_train='many' is neither a count nor a list"),
    ({"datasets": [{"name": "d", "files_train": 1, "files_val": 1}]}, "names no tokenizer"),
    ({"datasets": [{"name": "d", "files_train": 1, "files_val": 1, "tokenizer_name": "x"}], "tokenizers": []}, "'tokenizers' has no entry named 'x'"),
    ({"datasets": [{"name": "d", "files_train": 1, "files_val": 1, "tokenizer": {"name": "x"}}]}, "tokenizer lists no files"),
    ({"datasets": [{"name": "d", "files_train": ["../../etc/passwd"], "files_val": 1, "tokenizer": "t"}]}, "must be relative and stay inside"),
    ({"datasets": [{"name": "d", "files_train": [{"name": "a.bin", "sha256": "abc"}], "files_val": 1, "tokenizer": "t"}]}, "sha256='abc' is not"),
])
def test_read_manifest_names_what_is_missing(manifest, message):
    with pytest.raises(ValueError, match=message):
        hub.read_manifest(manifest, "d", "manifest.json")


def test_iter_jsonl_documents_streams_and_names_bad_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\nnot json\n")
    stream = corpus.iter_jsonl_documents(path)
    assert next(stream) == "one" and next(stream) == "two"  # read lazily: the bad line is not reached yet
    with pytest.raises(ValueError, match=r"docs.jsonl:4: expected a JSON object"):
        next(stream)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        next(corpus.iter_jsonl_documents(tmp_path / "missing.jsonl"))
