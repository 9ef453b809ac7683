"""The challenge's published data, downloaded from Hugging Face hub dataset repositories.

Hub layout (`willdepueoai/parameter-golf`: docs cache, sp1024; `kevclark/parameter-golf`:
sp8192), under a remote root folder, `datasets/` by default:

    manifest.json                                  what each dataset holds (read_manifest)
    datasets/<dataset>/fineweb_{train,val}_NNNNNN.bin
    tokenizers/<the files the manifest names>
    docs_selected.jsonl, docs_selected.source_manifest.json

Files land under `dest` at the same paths minus the remote root (the challenge's own
`data/` layout), so a published export drops in unchanged.

Every file is read at one hub commit: `revision` is resolved once, so a branch that moves
mid-download cannot mix two exports. A file is verified before it gets its final name:
size and sha256 against the hub's listing (LFS files; git blob id for small files) and
against the manifest where it gives them, plus the shard header for shards. A file already
in place and verified is skipped (a rerun downloads nothing); anything else is fetched
into `dest/.hub-staging/` by `huggingface_hub.hf_hub_download` (which honours
`HF_ENDPOINT`, tokens and hf_xet), verified, and renamed into place; a file that fails is
deleted and fetched once more, then the error names repo, revision, file and problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from pgolf_core import bpb, data, io, tokenizer

STAGING_DIR = ".hub-staging"
DOCS_FILE = "docs_selected.jsonl"
DOCS_MANIFEST_FILE = "docs_selected.source_manifest.json"
MANIFEST_FILE = "manifest.json"
_SPLIT_KEYS = {"train": ("train_files", "files_train"), "val": ("val_files", "files_val")}
_TOKENIZER_KEYS = ("model_path", "vocab_path", "path")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the remote root, "/"-separated
    kind: str  # "manifest", "train", "val", "tokenizer" or "docs"
    sha256: str | None = None  # as the manifest states it
    size: int | None = None  # bytes, as the manifest states it


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the manifest: every shard it lists (in order) and its tokenizer files."""

    name: str
    train: tuple[RemoteFile, ...]
    val: tuple[RemoteFile, ...]
    tokenizer: tuple[RemoteFile, ...]
    vocab_size: int | None


@dataclass(frozen=True)
class PublishedData:
    commit: str  # the hub commit every file was read at
    manifest: Path
    train_files: tuple[Path, ...]  # the first `train_shards` train shards, in manifest order
    val_files: tuple[Path, ...]  # the whole fixed validation split
    tokenizer_files: tuple[Path, ...]  # e.g. the SentencePiece .model and .vocab
    vocab_size: int | None  # as the manifest states it (None when it does not)
    downloaded: tuple[str, ...]  # paths fetched by this call; empty when all were in place


@dataclass(frozen=True)
class DocsCache:
    commit: str
    docs: Path  # docs_selected.jsonl: one {"text": ...} per line; the first `docs_val` are validation
    manifest: Path
    num_docs: int | None  # from the sidecar manifest (None when absent)
    docs_val: int | None
    docs_sha256: str  # sha256 of the docs file's bytes, verified
    downloaded: tuple[str, ...]


@dataclass(frozen=True)
class _HubFile:
    size: int | None
    sha256: str | None  # LFS files
    git_sha1: str | None  # small files stored in git


def read_manifest(manifest: dict, dataset: str, where: str = MANIFEST_FILE) -> DatasetSpec:
    """Find `dataset` in a parsed manifest. Fields read, nothing else:

    - `datasets`: a list of objects with a `name`, or an object keyed by name;
    - in the entry, per split: `train_files` | `files_train` | `stats.files_train` (and
      `val_...`): a count (shards `datasets/<name>/fineweb_<split>_NNNNNN.bin`) or a list of
      names (under `datasets/<name>/`) or paths, or objects with `name`|`path` and optional
      `sha256` and `size` (bytes);
    - `tokenizer` (a path, a list of paths/objects, or an object with `model_path`,
      `vocab_path`, `path`) or `tokenizer_name`, looked up in `tokenizers` (list or mapping)
      and read the same way; a bare file name lies under `tokenizers/`;
    - optional `vocab_size`.
    A missing or malformed field raises `ValueError` naming it.
    """
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(manifest).__name__}")
    entry = _named_entry(manifest, "datasets", dataset, where)
    where = f"{where}: dataset {dataset!r}"
    folder = f"datasets/{dataset}"
    train, val = (_split_files(entry, split, folder, where) for split in ("train", "val"))
    if not val:
        raise ValueError(f"{where} lists no validation shards (the fixed split cannot be empty)")
    spec = entry.get("tokenizer")
    if spec is None and "tokenizer_name" in entry:
        spec = _named_entry(manifest, "tokenizers", entry["tokenizer_name"], where)
    if spec is None:
        raise ValueError(f"{where} names no tokenizer (looked for 'tokenizer', and 'tokenizer_name' in 'tokenizers')")
    if isinstance(spec, dict):
        spec = [spec[k] for k in _TOKENIZER_KEYS if spec.get(k)]
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list) or not items:
        keys = ", ".join(_TOKENIZER_KEYS)
        raise ValueError(f"{where}: tokenizer lists no files (expected a path, a list, or {keys})")
    tokenizer = tuple(_remote_file(item, "tokenizer", "tokenizers", where) for item in items)
    vocab_size = entry.get("vocab_size")
    vocab_size = vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None
    return DatasetSpec(dataset, train, val, tokenizer, vocab_size)


def download_published(
    repo_id: str, dataset: str, train_shards: int, dest: str | Path, revision: str = "main",
    *, remote_root: str = "datasets", progress: bool = True,
) -> PublishedData:
    """Fetch the manifest, the first `train_shards` train shards, the whole validation split
    and the tokenizer files of `dataset` into `dest`, each verified; resumable."""
    if train_shards < 0:
        raise ValueError(f"train_shards={train_shards}: must be >= 0")
    repo = _Repo(repo_id, revision, remote_root, Path(dest))
    manifest_path = repo.fetch([RemoteFile(MANIFEST_FILE, "manifest")], progress=False)[0]
    where = f"{repo.label} {repo.repo_path(MANIFEST_FILE)}"
    spec = read_manifest(_json_object(manifest_path, where), dataset, where)
    if train_shards > len(spec.train):
        raise ValueError(
            f"{repo.label}: dataset {dataset!r} has {len(spec.train)} train shards, {train_shards} were asked for"
        )
    files = [*spec.val, *spec.train[:train_shards], *spec.tokenizer]
    paths = repo.fetch(files, progress)
    repo.finish()
    val, train = len(spec.val), train_shards
    return PublishedData(
        commit=repo.commit, manifest=manifest_path, train_files=tuple(paths[val : val + train]),
        val_files=tuple(paths[:val]), tokenizer_files=tuple(paths[val + train :]),
        vocab_size=spec.vocab_size, downloaded=tuple(repo.downloaded),
    )


def download_docs_cache(
    repo_id: str, dest: str | Path, revision: str = "main", *, remote_root: str = "datasets", progress: bool = True,
) -> DocsCache:
    """Fetch `docs_selected.jsonl` and its sidecar manifest into `dest`, verified against the
    hub and against the sidecar's `docs_sha256` (sha256 of the file's bytes) when present."""
    repo = _Repo(repo_id, revision, remote_root, Path(dest))
    manifest_path = repo.fetch([RemoteFile(DOCS_MANIFEST_FILE, "manifest")], progress=False)[0]
    sidecar = _json_object(manifest_path, f"{repo.label} {repo.repo_path(DOCS_MANIFEST_FILE)}")
    expected = sidecar.get("docs_sha256")
    if expected is not None and not (isinstance(expected, str) and _SHA256.fullmatch(expected)):
        raise ValueError(f"{repo.label} {DOCS_MANIFEST_FILE}: docs_sha256={expected!r} is not a sha256 hex digest")
    docs_path = repo.fetch([RemoteFile(DOCS_FILE, "docs", sha256=expected)], progress)[0]
    repo.finish()
    num_docs, docs_val = (sidecar.get(k) if isinstance(sidecar.get(k), int) else None for k in ("num_docs", "docs_val"))
    return DocsCache(
        commit=repo.commit, docs=docs_path, manifest=manifest_path, num_docs=num_docs, docs_val=docs_val,
        docs_sha256=expected or repo.hub_file(DOCS_FILE).sha256 or _digests(docs_path, sha256=True)[0],
        downloaded=tuple(repo.downloaded),
    )


class _Repo:
    """One dataset repo pinned at one commit, with its file listing and a local root."""

    def __init__(self, repo_id: str, revision: str, remote_root: str, dest: Path):
        self.repo_id, self.revision, self.remote_root, self.dest = repo_id, revision, remote_root.strip("/"), dest
        self.staging = dest / STAGING_DIR
        self.downloaded: list[str] = []
        self.commit, self.listing = self._resolve()
        self.label = f"{repo_id}@{revision} (commit {self.commit[:12]})"

    def repo_path(self, path: str) -> str:
        return f"{self.remote_root}/{path}" if self.remote_root else path

    def hub_file(self, path: str) -> _HubFile:
        """What the hub's listing says about `path` (all None without a listing)."""
        return (self.listing or {}).get(self.repo_path(path), _HubFile(None, None, None))

    def _resolve(self) -> tuple[str, dict[str, _HubFile] | None]:
        where = f"dataset repo {self.repo_id!r} on {constants.ENDPOINT}"
        try:
            info = HfApi().dataset_info(self.repo_id, revision=self.revision, files_metadata=True)
        except RevisionNotFoundError as e:
            raise FileNotFoundError(f"revision {self.revision!r} not found in {where}") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"{where} not found (misspelt, private, or not a dataset repo)") from e
        except Exception as e:  # transport errors, offline mode, hub outages
            raise ValueError(f"could not list {where} at {self.revision!r}: {type(e).__name__}: {e}") from e
        if not info.sha:
            raise ValueError(f"{where} returned no commit for revision {self.revision!r}")
        if info.siblings is None:
            return info.sha, None  # a mirror without a listing: manifest, headers and sizes still verify
        listing = {}
        for s in info.siblings:
            lfs = s.lfs
            listing[s.rfilename] = _HubFile(
                size=lfs.size if lfs else s.size, sha256=lfs.sha256 if lfs else None,
                git_sha1=None if lfs else s.blob_id,
            )
        return info.sha, listing

    def fetch(self, files: list[RemoteFile], progress: bool) -> list[Path]:
        """Local paths of `files`, each verified; missing on the hub -> FileNotFoundError."""
        if self.listing is not None:
            missing = [self.repo_path(f.path) for f in files if self.repo_path(f.path) not in self.listing]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} file(s) missing from {self.label} on {constants.ENDPOINT}: "
                    + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                )
        paths = []
        with tqdm(total=len(files), unit="file", desc=self.repo_id, disable=not progress or None) as bar:
            for f in files:
                bar.set_postfix_str(f.path.rsplit("/", 1)[-1])
                paths.append(self._fetch_one(f))
                bar.update()
        return paths

    def finish(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _fetch_one(self, f: RemoteFile) -> Path:
        final = self.dest / f.path
        if final.is_file():
            if self._problem(final, f) is None:
                return final
            final.unlink()  # partial or stale: fetch it again
        problems: list[str] = []
        for attempt in range(2):
            # huggingface_hub < 1.0 caches the folders it made; finish() may have removed them
            (self.staging / self.repo_path(f.path)).parent.mkdir(parents=True, exist_ok=True)
            try:
                staged = Path(hf_hub_download(
                    self.repo_id, self.repo_path(f.path), repo_type="dataset", revision=self.commit,
                    local_dir=self.staging, force_download=attempt > 0,
                ))
            except LocalEntryNotFoundError as e:  # the hub could not be reached
                problems.append(f"download failed (hub unreachable at {constants.ENDPOINT}: {e})")
                continue
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
                raise FileNotFoundError(f"{self.repo_path(f.path)} not found in {self.label}") from e
            except Exception as e:  # truncated transfers, size mismatches, hub errors: retried once
                problems.append(f"download failed ({type(e).__name__}: {e})")
                continue
            problem = self._problem(staged, f)
            if problem is None:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                self.downloaded.append(f.path)
                return final
            problems.append(problem)
            staged.unlink(missing_ok=True)
        raise ValueError(
            f"{self.repo_path(f.path)} from {self.label}: {'; then '.join(dict.fromkeys(problems))}; "
            "tried twice, nothing kept (a rerun resumes from the files already verified)"
        )

    def _problem(self, path: Path, f: RemoteFile) -> str | None:
        """None when `path` holds exactly the published file, else what is wrong with it."""
        hub = self.hub_file(f.path)
        size = path.stat().st_size
        for source, expected in (("manifest", f.size), ("hub", hub.size)):
            if expected is not None and size != expected:
                return f"{size} bytes where the {source} says {expected} (truncated or corrupt)"
        if f.kind in ("train", "val"):
            try:
                data.read_header(path)
            except ValueError as e:
                return str(e)
        wanted = [(src, h) for src, h in (("manifest", f.sha256), ("hub", hub.sha256)) if h]
        if not wanted and not hub.git_sha1:
            return None
        sha256, git_sha1 = _digests(path, sha256=bool(wanted), git_sha1=bool(hub.git_sha1))
        for source, expected in wanted:
            if sha256 != expected:
                return f"sha256 {sha256} where the {source} says {expected} (checksum mismatch)"
        if hub.git_sha1 and git_sha1 != hub.git_sha1:
            return f"git blob id {git_sha1} where the hub says {hub.git_sha1} (checksum mismatch)"
        return None


def _digests(path: Path, sha256: bool = False, git_sha1: bool = False) -> tuple[str | None, str | None]:
    """sha256 of the file's bytes and/or its git blob id (sha1 of "blob <size>\\0" + bytes), one pass."""
    h256 = hashlib.sha256() if sha256 else None
    h1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if git_sha1 else None
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            for h in (h256, h1):
                if h is not None:
                    h.update(block)
    return (h256.hexdigest() if h256 else None, h1.hexdigest() if h1 else None)


def _json_object(path: Path, where: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _named_entry(manifest: dict, key: str, name, where: str) -> dict:
    table = manifest.get(key)
    if isinstance(table, dict):
        entry, names = table.get(name), list(table)
    elif isinstance(table, list):
        entries = [e for e in table if isinstance(e, dict)]
        entry, names = next((e for e in entries if e.get("name") == name), None), [e.get("name") for e in entries]
    else:
        raise ValueError(f"{where}: no '{key}' list or mapping (found {type(table).__name__})")
    if entry is None:
        found = ", ".join(map(str, names)) or "none"
        raise ValueError(f"{where}: '{key}' has no entry named {name!r} (found: {found})")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: '{key}' entry {name!r} is {type(entry).__name__}, expected an object")
    return entry


def _split_files(entry: dict, split: str, folder: str, where: str) -> tuple[RemoteFile, ...]:
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    keys = _SPLIT_KEYS[split]
    found = [(k, src[k]) for src in (entry, stats) for k in keys if k in src]
    if not found:
        raise ValueError(f"{where} has no {split} shard count or list (looked for {', '.join(keys)}, stats.{keys[1]})")
    key, value = found[0]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return tuple(RemoteFile(f"{folder}/{data.shard_name(split, i)}", split) for i in range(value))
    if isinstance(value, list):
        return tuple(_remote_file(item, split, folder, where) for item in value)
    raise ValueError(f"{where}: {key}={value!r} is neither a count nor a list of files")


def _remote_file(item, kind: str, folder: str, where: str) -> RemoteFile:
    """A manifest file item: a name/path string, or an object with `name`|`path`, `sha256`, `size`."""
    sha256 = size = None
    if isinstance(item, dict):
        name, sha256, size = item.get("path") or item.get("name"), item.get("sha256"), item.get("size")
    else:
        name = item
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {kind} file item {item!r} has no 'name' or 'path'")
    path = PurePosixPath(name if "/" in name else f"{folder}/{name}")
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where}: {kind} file path {name!r} must be relative and stay inside the repo")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256.lower())):
        raise ValueError(f"{where}: {name}: sha256={sha256!r} is not a sha256 hex digest")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"{where}: {name}: size={size!r} is not a byte count")
    return RemoteFile(str(path), kind, sha256.lower() if sha256 else None, size)


DEFAULT_REPOS = {"published": "kevclark/parameter-golf", "docs_cache": "willdepueoai/parameter-golf"}


def install_published(published: PublishedData, tokenizer_dir: Path, shards_dir: Path) -> None:
    """Place downloaded shards and the SentencePiece model where the pipeline reads them,
    as hard links to the downloads (a copy only across file systems): with DVC's cache
    type `hardlink` the bytes then exist once on disk."""
    models = [p for p in published.tokenizer_files if p.suffix == ".model"]
    if len(models) != 1:
        raise ValueError(f"expected one SentencePiece .model among the tokenizer files, found {models}")
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _link(models[0], tokenizer_dir / "tokenizer.model")
    shards_dir.mkdir(parents=True, exist_ok=True)
    for split, files in (("train", published.train_files), ("val", published.val_files)):
        for index, path in enumerate(files):
            _link(path, shards_dir / f"fineweb_{split}_{index:06d}.bin")


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def installed_sizes(tokenizer_dir: Path, shards_dir: Path, commit: str) -> dict:
    """The `tokenize` metrics of installed published data: tokens from the shard headers,
    val documents = BOS count, val bytes by the pipeline's byte accounting."""
    sp = tokenizer.load_tokenizer(tokenizer_dir)
    val = data.load_split(shards_dir, "val", sp.vocab_size())
    train_files = data.list_shards(shards_dir, "train")
    return {"train": {"tokens": sum(data.read_header(p) for p in train_files), "shards": len(train_files)},
            "val": {"documents": int((val == sp.bos_id()).sum()), "tokens": len(val),
                    "bytes": int(bpb.val_byte_counts(sp, shards_dir, val).sum()),
                    "shards": len(data.list_shards(shards_dir, "val"))},
            "vocab_size": sp.vocab_size(), "corpus_sha256": io.sha256_tree(shards_dir), "hub_commit": commit}
