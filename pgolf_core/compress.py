"""General-purpose byte compressors at their strongest settings, behind one name each.

Compressed bytes count against the 16,000,000-byte budget, and which codec wins depends
on the data (zstd-22 beat zlib-9 on int6 in the March records; brotli-11 and lzma-9
later), so the artifact tries the configured ones per tensor group and keeps the
smallest. Each codec has a small integer id so the artifact can name it in one byte.
lrzip (ZPAQ at level 9, the 04-27 record's per-group compressor, ~280 KB smaller than
brotli there) runs the system binary: it is used only where that binary exists, and
asking for it elsewhere stops with a message saying so.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import zstandard

CODEC_IDS = {"zlib": 1, "lzma": 2, "brotli": 3, "zstd": 4, "lrzip": 5}  # stored in artifacts: never renumber
CODEC_NAMES = {i: name for name, i in CODEC_IDS.items()}

_LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_BROTLI_WINDOW_BITS = 24  # the largest window; decoding needs no setting
_DECOMPRESS_ERRORS = (zlib.error, lzma.LZMAError, brotli.error, zstandard.ZstdError)


def compress(data: bytes, name: str) -> bytes:
    """`data` compressed by codec `name` (zlib 9, lzma 9|extreme, brotli 11, zstd 22, lrzip -z -L 9)."""
    _check_name(name)
    if name == "lrzip":
        return _lrzip(data, ["-z", "-L", "9"], "compress")
    if name == "zlib":
        return zlib.compress(data, 9)
    if name == "lzma":
        return lzma.compress(data, preset=_LZMA_PRESET)
    if name == "brotli":
        return brotli.compress(data, quality=11, lgwin=_BROTLI_WINDOW_BITS)
    return zstandard.ZstdCompressor(level=22).compress(data)


def decompress(data: bytes, name: str) -> bytes:
    """Inverse of `compress`; corrupt input raises ValueError naming the codec."""
    _check_name(name)
    if name == "lrzip":
        return _lrzip(data, ["-d"], "decompress")
    try:
        if name == "zlib":
            return zlib.decompress(data)
        if name == "lzma":
            return lzma.decompress(data)
        if name == "brotli":
            return brotli.decompress(data)
        return zstandard.ZstdDecompressor().decompress(data)
    except _DECOMPRESS_ERRORS as e:
        raise ValueError(f"{name}: cannot decompress {len(data)} bytes of corrupt or foreign data ({e})") from e


def compress_many(jobs: list[tuple[bytes, str]]) -> list[tuple[bytes, float]]:
    """[(compressed bytes, seconds it took)] for [(data, codec)], in order, on a pool of
    threads, one per core. An artifact is packed as many chunks x codecs; brotli 11 and
    lzma 9 run at about 0.5 MB/s per core, so a record-size model is minutes of single-core
    work. Threads are enough because every codec here releases the GIL while it
    compresses (zlib, lzma, brotli, zstandard; lrzip runs in a subprocess): 4 x 2 MB of
    int6-like bytes on 2 cores ran 1.6-2.0x faster on 2 threads than one after another
    (brotli 1.2.1, zstandard 0.25). Not processes: spawned workers re-import the caller's
    main module (a caller without a `__main__` guard dies with BrokenProcessPool) and the
    modules they run, which a bundled train_gpt.py serves only when run from its own file.
    The output does not depend on how many threads ran."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2:
        return [_timed_compress(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgolf-compress") as pool:
        return list(pool.map(_timed_compress, jobs))


def _timed_compress(job: tuple[bytes, str]) -> tuple[bytes, float]:
    start = time.perf_counter()
    blob = compress(*job)
    return blob, time.perf_counter() - start


def lrzip_binary() -> str | None:
    """Path of the system's lrzip, or None where it is not installed."""
    return shutil.which("lrzip")


def require_codecs(names) -> None:
    """Fail now, naming the key, when a codec asked for cannot run here (lrzip needs its
    binary): the quantize stage checks before minutes of GPTQ, not at packing."""
    if "lrzip" in names and lrzip_binary() is None:
        raise ValueError("codec 'lrzip' was asked for (quantize.compressors) but no lrzip binary is on PATH: "
                         "install it (apt-get install lrzip) or remove 'lrzip' from quantize.compressors")


def _lrzip(data: bytes, flags: list[str], what: str) -> bytes:
    """Run the lrzip binary on `data` through temporary files (it reads and writes files)."""
    require_codecs(["lrzip"])
    binary = lrzip_binary()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(data)
        out = subprocess.run([binary, *flags, "-q", "-f", "-o", str(dst), str(src)], capture_output=True, text=True)
        if out.returncode != 0 or not dst.is_file():
            raise ValueError(f"lrzip: cannot {what} {len(data)} bytes (exit {out.returncode}): {out.stderr.strip()}")
        return dst.read_bytes()


def codec_id(name: str) -> int:
    """The one-byte id an artifact stores for codec `name`."""
    _check_name(name)
    return CODEC_IDS[name]


def codec_name(codec: int) -> str:
    """The codec named by a stored id; unknown ids raise ValueError."""
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown codec id {codec!r}; expected one of {sorted(CODEC_NAMES)}")
    return CODEC_NAMES[codec]


def _check_name(name: str) -> None:
    if name not in CODEC_IDS:
        raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_IDS)}")
