"""Token shards in the challenge's format, and batches read from them.

Shard = 256 little-endian int32 header (`[0]` magic 20240520, `[1]` version 1,
`[2]` token count, rest 0) followed by the tokens as little-endian uint16. Readers
check magic, version and that the file size is exactly 1024 + 2 * count, so a
truncated or foreign file is named, never silently misread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TRAIN_PATTERN = "fineweb_train_*.bin"
VAL_PATTERN = "fineweb_val_[0-9]*.bin"  # excludes the CaseOps byte sidecars (fineweb_val_bytes_*)
VAL_BYTES_PATTERN = "fineweb_val_bytes_[0-9]*.bin"  # per-token original byte counts (CaseOps)


SOURCE_FILE = "source.json"  # beside the shards: where their documents came from (`write_source`)


def write_source(directory: str | Path, source: str, repo: str, challenge_data: bool) -> None:
    """Record, beside the shards, the document source they were made from (tokenize.source),
    its hub repository ('' for local corpora) and whether that is the challenge's FineWeb
    data (the published export, or the docs cache it was tokenized from): the train stage
    reads it to say whether its validation split is the challenge's."""
    (Path(directory) / SOURCE_FILE).write_text(
        json.dumps({"source": source, "repo": repo, "challenge_data": challenge_data}, indent=2) + "\n")


def read_source(directory: str | Path) -> dict | None:
    """The shards' source record, or None for shards written before tokenize recorded it."""
    path = Path(directory) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` (any integer array with values < 65536) as one shard file."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: token ids must lie in [0, 65535], found [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated?)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path}: magic {header[0]} != {SHARD_MAGIC} (not a token shard)")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path}: version {header[1]} != {SHARD_VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ValueError(
            f"shard {path}: {size} bytes but its header promises {count} tokens = {expected} bytes "
            "(truncated or padded)"
        )
    return count


def read_shard(path: str | Path, vocab_size: int | None = None, mmap: bool = False) -> np.ndarray:
    """The shard's tokens as uint16 (memory-mapped on request), checked against the vocab."""
    count = read_header(path)
    if mmap:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    else:
        tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ValueError(
            f"shard {path}: token id {int(tokens[bad])} at position {bad} is beyond the vocab "
            f"size {vocab_size} (tokenizer and shards do not match)"
        )
    return tokens


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Sorted shard files of one split; an empty split is an error that names the folder."""
    pattern = {"train": TRAIN_PATTERN, "val": VAL_PATTERN}[split]
    files = sorted(Path(directory).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {split} shards ({pattern}) in {directory}")
    return files


def load_split(directory: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """All tokens of a split, concatenated in file order."""
    return np.concatenate([read_shard(p, vocab_size) for p in list_shards(directory, split)])


def write_split(directory: str | Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    """Cut a split's stream into shards of at most `shard_tokens` tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = directory / shard_name(split, index)
        write_shard(path, tokens[start : start + shard_tokens])
        paths.append(path)
    return paths


class TokenStream:
    """Sequential reader over train shards that wraps around forever.

    `next_batch(n)` returns n + 1 contiguous tokens (inputs and shifted targets) and
    advances by n, so consecutive batches tile the stream with no gap and no overlap.
    Every process advances over the same global span and reads only its share of it
    (`start`, `stop`). Shards stay memory-mapped: the record's 80 shards are 8 B tokens,
    64 GB per process had they been loaded as int64. Reading is a 2-byte copy of this
    step's tokens; the host prepares it while the GPU still runs the previous step (the
    trainer never syncs per step), so no prefetch thread is needed to hide it.
    """

    def __init__(self, files: list[Path], vocab_size: int):
        self.shards = [read_shard(p, vocab_size, mmap=True) for p in files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens < 2:
            raise ValueError(f"train shards hold {self.num_tokens} tokens: too few to train on")
        self.position = 0

    def next_batch(self, num_tokens: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens position+start .. position+stop inclusive (int64; stop defaults to
        num_tokens), then advance by num_tokens."""
        stop = num_tokens if stop is None else stop
        if not 0 <= start < stop <= num_tokens:
            raise ValueError(f"share {start}..{stop} is not inside a batch of {num_tokens} tokens")
        tokens = self._read((self.position + start) % self.num_tokens, stop - start + 1)
        self.position = (self.position + num_tokens) % self.num_tokens
        return tokens

    def _read(self, position: int, count: int) -> np.ndarray:
        pieces = []
        while count:
            shard = int(np.searchsorted(self.starts, position, side="right")) - 1  # skips empty shards
            offset = position - int(self.starts[shard])
            piece = self.shards[shard][offset : offset + count]
            pieces.append(piece)
            count -= len(piece)
            position = (position + len(piece)) % self.num_tokens
        return np.concatenate(pieces).astype(np.int64)

    def state(self) -> int:
        return self.position

    def restore(self, position: int) -> None:
        self.position = position
