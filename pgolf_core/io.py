"""Atomic file output, content hashes, and what a stage reports: its figures (the
metrics file DVC compares) and its provenance (`metrics/provenance/<stage>.json`).

An interrupted stage must never leave a file that looks complete: everything is
written under a temporary name in the destination's folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    Works for a file or a directory (the caller creates what it needs at the temp path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "out"
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """`safetensors.torch.save`'s file with the header's metadata in sorted key order, so
    the same tensors and metadata always give the same bytes. The library writes the
    metadata from a Rust hash map, in an order that changes from call to call (20 saves
    of one three-key dict in one process gave 5 orders): a stage that rewrote the same
    quantizer reference or Hessians changed its output's hash, and DVC reran what
    depends on it. Only the order of those keys changes; tensors, offsets and readers
    are as the library has them. (A single key, as `checkpoint` writes, has one order.)"""
    import safetensors.torch  # torch's; the modules that write no tensors never load it

    data = safetensors.torch.save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library's alignment of the tensor data
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str) -> dict:
    """Load a JSON file a previous stage wrote; the error names the file and its role."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (run the stage that writes it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def sha256_files(paths) -> str:
    """One sha256 over the files' names and contents, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    root = Path(root)
    return sha256_files(sorted(p for p in root.rglob("*") if p.is_file()))


def write_stage_report(metrics_path: str | Path, report: dict, data_sha256: dict[str, str], **extra) -> None:
    """A stage's report split in two files. The metrics file keeps the figures, numbers
    and flags, which `dvc metrics diff` and `dvc exp show` compare; its provenance file
    (`provenance_path`: an output DVC does not cache and not a metric) gets what produced
    them, the report's other values (`labels`: modes, codecs, reasons) and `extra`."""
    figures, labels = split_figures(report)
    write_json_atomic(metrics_path, figures)
    write_provenance(metrics_path, data_sha256, labels=labels, **extra)


def write_provenance(metrics_path: str | Path, data_sha256: dict[str, str], **extra) -> None:
    write_json_atomic(provenance_path(metrics_path), {**provenance(data_sha256), **extra})


def provenance_path(metrics_path: str | Path) -> Path:
    """Where the provenance of a metrics file (or of DVCLive's folder) goes: beside it, in
    `provenance/`, named after it: metrics/quantize.json -> metrics/provenance/quantize.json,
    metrics/train -> metrics/provenance/train.json. Derived, so that every stage and every
    test that runs one finds it without another argument."""
    metrics_path = Path(metrics_path)
    return metrics_path.parent / "provenance" / f"{metrics_path.stem}.json"


def split_figures(report: dict) -> tuple[dict, dict]:
    """(figures, labels): the report's numbers and booleans, nested as they were, and its
    other values (strings, lists, None). DVC lists a changed string as a metric, so a hash
    or a name in a metrics file is noise in every comparison."""
    figures, labels = {}, {}
    for key, value in report.items():
        if isinstance(value, dict):
            inner_figures, inner_labels = split_figures(value)
            if inner_figures:
                figures[key] = inner_figures
            if inner_labels:
                labels[key] = inner_labels
        elif isinstance(value, (bool, int, float)):
            figures[key] = value
        else:
            labels[key] = value
    return figures, labels


def provenance(data_sha256: dict[str, str] | None = None) -> dict:
    """What produced a stage's figures: code commit and whether the tree was dirty (then
    the commit alone does not say what ran), versions, device, input hashes."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {
        **git_state(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": device,
        "num_cpus": os.cpu_count(),
        "argv": sys.argv,
        "data_sha256": data_sha256 or {},
    }


def git_state() -> dict:
    """`git_commit` of HEAD and `dirty`: tracked files differ from it (untracked files do
    not count). Both None outside a git checkout."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "dirty": None}
    return {"git_commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout
