"""The artifact: quantized weights + model config in one checksummed, compressed file.

Its length is what the 16,000,000-byte budget counts (with the code), so the layout
spends bytes only where needed: tensors are grouped by role, because integers of the
same role share statistics and compress better together, and each group is compressed
with whichever configured codec is smallest for it. Everything needed to rebuild the
model is inside (the model config travels in the header), and any flipped, missing or
extra byte is rejected before a single weight is used.

Byte layout (little-endian), format version 4 (versions 1 to 3, without chunks, layouts
or LQER, are refused with a message: re-run the quantize stage):

    offset  size  field
    0       8     magic b"PGOLFART"
    8       2     uint16 format version (4)
    10      8     uint64 total artifact length in bytes, digest included
    18      4     uint32 H = length of the compressed header
    22      H     header: zlib-9 compressed UTF-8 JSON (below)
    22+H    ...   group payloads in header "groups" order, each the concatenation of its
                  chunks, each chunk compressed on its own
    end-32  32    sha256 of every byte before it (prefix, header, payloads)

Header JSON:
    {"method": "rtn" | "gptq" | "gptq_lite", "model_config": {...},
     "bits_per_category": {"embedding": 7, "attention": 6, ...} (every integer tensor of a
                          category has its width; checked on reading),
     "groups":  [{"name", "codec" (id, see compress.CODEC_IDS), "layout" (see layout.py),
                  "raw_bytes", "chunks" (compressed bytes of each chunk, in order),
                  "crc32" (of the canonical payload)}, ...],
     "tensors": [{"name", "kind" ("int8" | "fp16"), "shape", "dtype" (original), "group",
                  int8: "bits", "q": [offset, nbytes], "scale": [offset, nbytes],
                        optional "lqer": {"rank", "a", "b", "a_scale", "b_scale": [offset, nbytes]}
                        (all four in group "lqer");
                  fp16: "data": [offset, nbytes]}, ...]}

Offsets are into the group's canonical (uncompressed, untransformed) payload. Within a
group the int8 spans come first (row-major), then the fp16 spans (scales, passthrough
data), each in tensor order; the group's layout (column-major, row reordering with its
permutation stored, byte shuffle of the fp16 tail) is applied to that payload before the
codec and undone after it. The bytes the codec sees (after the layout) are cut into
chunks of `chunk_bytes` (the last one shorter), each compressed on its own with the
group's codec, so that a record-size artifact packs on every core at once: one group of
23 MB (the record's MLP integers) was a single brotli job of tens of seconds that no pool
could split; in 2 MB chunks the same brotli output was 102 bytes larger (10,170,351
against 10,170,249 on random int6 integers of the record's shapes) and its longest job
2 s. The sha256 catches any tampering of the stored bytes; the per-group crc32 checks
that decompression and the layout's inverse reproduced the exact payload.

The quantizer's reference (integers and scales, outside the artifact) is a safetensors
file with keys "<name>:q", "<name>:scale", "<name>:data", "<name>:lqer_a" (…_a_scale,
…_b, …_b_scale) and the index in its metadata.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import safetensors
import torch

from pgolf_core.checkpoint import build_model
from pgolf_core.compress import codec_id, codec_name, compress_many, decompress
from pgolf_core.io import safetensors_bytes, write_bytes_atomic
from pgolf_core.layout import Layout, decode, encode
from pgolf_core.config import ModelConfig, QuantizeConfig
from pgolf_core.model import GPT
from pgolf_core.quant import (CATEGORIES, KINDS, LQER_A_RANGE, LQER_B_RANGE, LowRank, QuantizedModel,
                              QuantizedTensor, category_of, dequantize, lqer_groups)
from pgolf_core.quant.rtn import qmax_for

MAGIC = b"PGOLFART"
FORMAT_VERSION = 4  # 2: per-category widths, GPTQ or RTN integers; 3: + layouts per group, LQER, int8 gates;
# 4: + groups stored in independently compressed chunks
PREFIX = struct.Struct("<8sHQI")  # magic, version, total length, header length
DIGEST_BYTES = 32  # sha256
PASSTHROUGH_GROUP = "passthrough"  # every fp16 tensor, whatever its name
LQER_GROUP = "lqer"  # every LQER factor and its scales
GROUP_ORDER = (*CATEGORIES, LQER_GROUP, PASSTHROUGH_GROUP)
REFERENCE_FORMAT = "pgolf-quant-reference-2"
_NP_DTYPES = {"int8": np.dtype("i1"), "fp16": np.dtype("<f2")}
_SPAN_KINDS = {"q": "int8", "scale": "fp16", "data": "fp16", "a": "int8", "b": "int8", "a_scale": "fp16",
               "b_scale": "fp16"}
_LQER_PARTS = ("a", "a_scale", "b", "b_scale")


def group_of(name: str, kind: str) -> str:
    """The storage group of a tensor: fp16 -> "passthrough", int8 by its category."""
    return PASSTHROUGH_GROUP if kind == "fp16" else category_of(name)


def pack_artifact(qm: QuantizedModel, model_config: dict, compressors, layouts=("row",), *,
                  chunk_bytes: int = QuantizeConfig.chunk_bytes, choices: dict | None = None,
                  cache: dict | None = None, progress=None) -> tuple[bytes, dict]:
    """Serialize `qm` and `model_config` (JSON-able) into artifact bytes (layout above).

    Each group is stored in the smallest (summed over its chunks of `chunk_bytes`; 0: one
    chunk) of every (layout, codec) pair from `layouts` x `compressors`, or in the one pair
    `choices[group]` names when `choices` is given (a byte search re-packs many times;
    trying every pair each time would cost minutes).
    `cache`, a dict kept by the caller, remembers compressed groups by their bytes and
    geometry so an unchanged group is not compressed twice. `progress(group)` is called per group.

    Returns (artifact, report); report has model_bytes (= len(artifact)), header_bytes,
    and per group: bytes_per_group (compressed), raw_bytes_per_group, compressor_per_group,
    layout_per_group, chunks_per_group, seconds_per_group (compression seconds of its
    attempts' chunks, summed; every chunk of every attempt runs on a pool of threads).
    """
    if type(chunk_bytes) is not int or chunk_bytes < 0:
        raise ValueError(f"chunk_bytes={chunk_bytes!r}: must be a whole number of bytes >= 0 (0: one chunk per group)")
    payloads, index = _layout(qm)
    geometry = _geometry(index, {g: len(raw) for g, raw in payloads.items()})
    bits = _bits_per_category(qm)
    pairs_of = {group: [tuple(choices[group])] if choices else list(itertools.product(layouts, compressors))
                for group in payloads}
    # A layout reorders a group's bytes by its matrices' shapes, so equal bytes of other
    # shapes are another encoding: the key holds the geometry as well as the bytes.
    keys = {group: (hashlib.sha256(raw).digest(), repr(geometry[group]), tuple(pairs_of[group]), chunk_bytes)
            for group, raw in payloads.items()}
    todo = [g for g in payloads if cache is None or keys[g] not in cache]
    chosen, seconds = {}, {}
    jobs, owners = [], []  # every chunk of every (layout, codec) attempt of every group, run together
    for group in todo:
        encoded = {layout: encode(payloads[group], *geometry[group], Layout.parse(layout))
                   for layout in dict.fromkeys(layout for layout, _ in pairs_of[group])}
        for layout, codec in pairs_of[group]:
            for chunk in split_chunks(encoded[layout], chunk_bytes):
                jobs.append((chunk, codec))
                owners.append((group, layout, codec))
    attempts: dict[tuple, list[bytes]] = {}  # (group, layout, codec) -> its compressed chunks, in order
    for owner, (blob, spent) in zip(owners, compress_many(jobs)):
        seconds[owner[0]] = seconds.get(owner[0], 0.0) + spent
        attempts.setdefault(owner, []).append(blob)
    for (group, layout, codec), chunks in attempts.items():  # in pair order: ties go to the first pair
        if group not in chosen or sum(map(len, chunks)) < sum(map(len, chosen[group][2])):
            chosen[group] = (layout, codec, chunks)
    groups, blobs = [], []
    for group, raw in payloads.items():
        if group in chosen:
            if cache is not None:
                cache[keys[group]] = chosen[group]
        else:
            chosen[group], seconds[group] = cache[keys[group]], 0.0
        layout, codec, chunks = chosen[group]
        groups.append({"name": group, "codec": codec_id(codec), "layout": layout, "raw_bytes": len(raw),
                       "chunks": [len(chunk) for chunk in chunks], "crc32": zlib.crc32(raw)})
        blobs += chunks
        if progress:
            progress(group)
    header = {"method": qm.method, "model_config": model_config, "bits_per_category": bits,
              "groups": groups, "tensors": index}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    total = PREFIX.size + len(header_bytes) + sum(map(len, blobs)) + DIGEST_BYTES
    body = PREFIX.pack(MAGIC, FORMAT_VERSION, total, len(header_bytes)) + header_bytes + b"".join(blobs)
    artifact = body + hashlib.sha256(body).digest()
    report = {
        "model_bytes": len(artifact),
        "header_bytes": len(header_bytes),
        "bytes_per_group": {g["name"]: sum(g["chunks"]) for g in groups},
        "raw_bytes_per_group": {g["name"]: g["raw_bytes"] for g in groups},
        "compressor_per_group": {g["name"]: codec_name(g["codec"]) for g in groups},
        "layout_per_group": {g["name"]: g["layout"] for g in groups},
        "chunks_per_group": {g["name"]: len(g["chunks"]) for g in groups},
        "seconds_per_group": seconds,
    }
    return artifact, report


def split_chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    """`data` in pieces of `chunk_bytes` (the last one shorter; 0: one piece; empty data:
    one empty piece), each compressed on its own."""
    if not chunk_bytes or len(data) <= chunk_bytes:
        return [data]
    return [data[i: i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def unpack_artifact(blob: bytes) -> tuple[QuantizedModel, dict]:
    """(quantized model, model config) from artifact bytes, bit-exact to what was packed.

    Raises ValueError naming the problem: wrong magic, unsupported version, truncated or
    trailing data, checksum mismatch, undecompressable group, inconsistent index.
    """
    header, payload = _open(blob)
    try:
        raws = _decompress_groups(header["groups"], payload, header["tensors"])
        tensors = {}
        for entry in header["tensors"]:
            name = entry["name"]
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice in the index")
            tensors[name] = _read_tensor(entry, raws)
        _check_tiling(header["tensors"], raws)
        declared = header["bits_per_category"]
        if _bits_per_category(QuantizedModel(tensors=tensors, method="")) != declared:
            raise ValueError(f"tensor widths do not match the header's bits_per_category {declared}")
        return QuantizedModel(tensors=tensors, method=header["method"]), header["model_config"]
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"artifact header is malformed: {type(e).__name__}: {e}") from e


def read_header(blob: bytes) -> dict:
    """The artifact's JSON header (after the length and checksum checks), payloads untouched."""
    return _open(blob)[0]


def _bits_per_category(qm: QuantizedModel) -> dict[str, int]:
    """The one integer width of each category present; two widths in a category is an error."""
    bits: dict[str, int] = {}
    for name, t in qm.tensors.items():
        if t.kind == "int8":
            category = category_of(name)
            if bits.setdefault(category, t.bits) != t.bits:
                raise ValueError(f"category {category!r} mixes widths {bits[category]} and {t.bits} ({name!r})")
    return bits


def write_reference(path: str | Path, qm: QuantizedModel) -> None:
    """Write the integers, scales and passthrough tensors as safetensors (atomically, no pickle)."""
    tensors, index = {}, []
    for name, t in qm.tensors.items():
        if ":" in name:
            raise ValueError(f"tensor name {name!r} contains ':', which reference keys reserve")
        parts = {"data": t.data} if t.kind == "fp16" else {"q": t.q, "scale": t.scale}
        if t.lqer is not None:
            parts.update({f"lqer_{p}": getattr(t.lqer, p) for p in _LQER_PARTS})
        tensors.update({f"{name}:{part}": x.contiguous() for part, x in parts.items()})
        index.append({"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype, "bits": t.bits,
                      "lqer_rank": t.lqer.rank if t.lqer is not None else 0})
    meta = {"format": REFERENCE_FORMAT, "method": qm.method, "index": json.dumps(index)}
    write_bytes_atomic(path, safetensors_bytes(tensors, meta))


def read_reference(path: str | Path) -> QuantizedModel:
    """Load a file written by `write_reference`; checks format, keys, dtypes and shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantizer reference not found: {path} (run the quantize stage)")
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stored = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {REFERENCE_FORMAT!r}")
    tensors = {}
    try:
        for e in json.loads(meta["index"]):
            parts = {p: stored.pop(f"{e['name']}:{p}", None) for p in ("q", "scale", "data")}
            lqer = None
            if e["lqer_rank"]:
                found = {p: stored.pop(f"{e['name']}:lqer_{p}", None) for p in _LQER_PARTS}
                if any(x is None for x in found.values()):
                    raise ValueError(f"{path}: tensor {e['name']!r} declares an LQER correction but lacks its factors")
                lqer = LowRank(**found)
            t = QuantizedTensor(shape=tuple(e["shape"]), dtype=e["dtype"], bits=e["bits"], lqer=lqer, **parts)
            tensors[e["name"]] = _check_tensor(e["name"], t, e["kind"], str(path))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed reference index ({type(e).__name__}: {e})") from e
    if stored:
        raise ValueError(f"{path}: tensors {sorted(stored)[:3]} are not in the index")
    return QuantizedModel(tensors=tensors, method=meta.get("method", ""))


def compare_exact(a: QuantizedModel, b: QuantizedModel) -> list[str]:
    """Names whose kind, shape, bits, integers, scales, LQER factors or passthrough bits differ (sorted).

    A name present in only one model counts as a difference; [] means bit-identical.
    """
    names = set(a.tensors) | set(b.tensors)
    return sorted(n for n in names if n not in a.tensors or n not in b.tensors
                  or not _same_tensor(a.tensors[n], b.tensors[n]))


def _same_tensor(x: QuantizedTensor, y: QuantizedTensor) -> bool:
    if (x.kind, x.shape, x.bits) != (y.kind, y.shape, y.bits):
        return False
    if x.kind == "fp16":
        return _same_bits(x.data, y.data)
    if (x.lqer is None) != (y.lqer is None):
        return False
    same_lqer = x.lqer is None or all(_same_bits(getattr(x.lqer, p), getattr(y.lqer, p)) for p in _LQER_PARTS)
    return same_lqer and _same_bits(x.q, y.q) and _same_bits(x.scale, y.scale)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype == torch.float16:
        x, y = x.view(torch.int16), y.view(torch.int16)
    return torch.equal(x, y)


def _layout(qm: QuantizedModel) -> tuple[dict[str, bytes], list[dict]]:
    """Group payloads (in GROUP_ORDER) and the tensor index with offsets into them."""
    parts: dict[str, list] = {g: [] for g in GROUP_ORDER}  # group -> [(rank, span holder, key, bytes)]
    index = []
    for name, t in qm.tensors.items():
        entry = {"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype,
                 "group": group_of(name, t.kind)}
        if t.kind == "int8":
            entry["bits"] = t.bits
            parts[entry["group"]] += [(0, entry, "q", _to_bytes(t.q, "int8")),
                                      (1, entry, "scale", _to_bytes(t.scale, "fp16"))]
            if t.lqer is not None:
                lq = entry["lqer"] = {"rank": t.lqer.rank}
                parts[LQER_GROUP] += [(0 if _SPAN_KINDS[p] == "int8" else 1, lq, p,
                                       _to_bytes(getattr(t.lqer, p), _SPAN_KINDS[p])) for p in _LQER_PARTS]
        else:
            parts[entry["group"]].append((2, entry, "data", _to_bytes(t.data, "fp16")))
        index.append(entry)
    payloads = {}
    for group, items in parts.items():
        offset, chunks = 0, []
        for _, holder, key, data in sorted(items, key=lambda item: item[0]):  # stable: tensor order kept
            holder[key] = [offset, len(data)]
            offset += len(data)
            chunks.append(data)
        if chunks:
            payloads[group] = b"".join(chunks)
    return payloads, index


def _spans(index: list[dict]):
    """Every stored span of the index: (group, offset, nbytes, tensor name, key)."""
    for e in index:
        for key in ("q", "scale", "data"):
            if key in e:
                yield e["group"], *e[key], e["name"], key
        if "lqer" in e:
            for key in _LQER_PARTS:
                yield LQER_GROUP, *e["lqer"][key], e["name"], key


def _geometry(index: list[dict], raw_len: dict[str, int]) -> dict[str, tuple[list, int]]:
    """Per group, what a layout needs: the (offset, rows, cols, name) of each integer matrix `q`
    (LQER factors and gates are left in place: they are tiny) and where the fp16 tail starts."""
    out = {g: ([], n) for g, n in raw_len.items()}
    for group, offset, nbytes, name, key in _spans(index):
        if group not in out:
            raise ValueError(f"artifact tensor {name!r} {key}: group {group!r} is not in the artifact")
        matrices, fp16_start = out[group]
        if _SPAN_KINDS[key] == "fp16":
            out[group] = (matrices, min(fp16_start, offset))
    for e in index:
        if "q" in e and category_of(e["name"]) != "gate":
            if len(e["shape"]) != 2 or not all(isinstance(n, int) and n >= 0 for n in e["shape"]):
                raise ValueError(f"artifact tensor {e['name']!r}: an int8 matrix needs a 2-D shape, "
                                 f"found {e['shape']}")
            rows, cols = e["shape"]
            out[e["group"]][0].append((e["q"][0], rows, cols, e["name"]))
    return out


def _to_bytes(x: torch.Tensor, kind: str) -> bytes:
    return x.detach().contiguous().numpy().astype(_NP_DTYPES[kind], copy=False).tobytes()


def _open(blob: bytes) -> tuple[dict, memoryview]:
    """Check magic, version, length and sha256; return (header, concatenated payloads)."""
    blob = memoryview(blob)
    if len(blob) >= len(MAGIC) and bytes(blob[: len(MAGIC)]) != MAGIC:
        raise ValueError(f"not a pgolf artifact: magic {bytes(blob[:len(MAGIC)])!r}, expected {MAGIC!r}")
    if len(blob) < PREFIX.size + DIGEST_BYTES:
        raise ValueError(f"artifact truncated: {len(blob)} bytes, shorter than the fixed "
                         f"{PREFIX.size + DIGEST_BYTES}-byte prefix and digest")
    _, version, total, header_len = PREFIX.unpack_from(blob)
    if version in (1, 2, 3):
        what = {1: "one RTN width for every matrix", 2: "no layouts, LQER or int8 gates",
                3: "each group compressed whole, no chunks"}[version]
        raise ValueError(f"artifact format version {version} ({what}) was written by an older "
                         f"pgolf; this one reads version {FORMAT_VERSION}: re-run the quantize stage")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported artifact format version {version}, expected {FORMAT_VERSION}")
    if len(blob) != total:
        what = "truncated" if len(blob) < total else "has trailing bytes"
        raise ValueError(f"artifact {what}: {len(blob)} bytes, its prefix says {total}")
    body, digest = blob[:-DIGEST_BYTES], bytes(blob[-DIGEST_BYTES:])
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("artifact checksum mismatch: sha256 of the contents differs from the stored digest")
    end = PREFIX.size + header_len
    if end > len(body):
        raise ValueError(f"artifact header length {header_len} runs past the payload end ({len(body)} bytes)")
    try:
        header = json.loads(zlib.decompress(body[PREFIX.size:end]))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"artifact header cannot be decoded: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"artifact header is a {type(header).__name__}, expected a JSON object")
    return header, body[end:]


def _decompress_groups(groups: list[dict], payload: memoryview, index: list[dict]) -> dict[str, bytes]:
    """Canonical payload per group name (decompressed, layout undone); checks sizes and crc32 of each."""
    geometry = _geometry(index, {g["name"]: g["raw_bytes"] for g in groups})
    for g in groups:
        chunks = g["chunks"]
        if not (isinstance(chunks, list) and chunks and all(type(n) is int and n >= 0 for n in chunks)):
            raise ValueError(f"artifact group {g['name']!r}: chunks {chunks!r} is not a non-empty list of byte counts")
    stored = sum(sum(g["chunks"]) for g in groups)
    if stored != len(payload):
        raise ValueError(f"artifact groups declare {stored} stored bytes, the payload holds {len(payload)}")
    raws, offset = {}, 0
    for g in groups:
        name, codec = g["name"], codec_name(g["codec"])
        pieces = []
        for size in g["chunks"]:
            pieces.append(bytes(payload[offset: offset + size]))
            offset += size
        try:
            encoded = b"".join(decompress(piece, codec) for piece in pieces)
            raw = decode(encoded, *geometry[name], g["raw_bytes"], Layout.parse(g["layout"]))
        except ValueError as e:
            raise ValueError(f"artifact group {name!r} cannot be decompressed: {e}") from e
        if len(raw) != g["raw_bytes"] or zlib.crc32(raw) != g["crc32"]:
            raise ValueError(f"artifact group {name!r}: decompressed {len(raw)} bytes (crc32 "
                             f"{zlib.crc32(raw):08x}), expected {g['raw_bytes']} (crc32 {g['crc32']:08x})")
        if name in raws:
            raise ValueError(f"artifact group {name!r} appears twice")
        raws[name] = raw
    return raws


def _read_tensor(entry: dict, raws: dict[str, bytes]) -> QuantizedTensor:
    name, kind, shape = entry["name"], entry["kind"], tuple(entry["shape"])
    if kind not in KINDS:
        raise ValueError(f"artifact: tensor {name!r} has kind {kind!r}, expected one of {KINDS}")
    if entry["group"] not in raws:
        raise ValueError(f"artifact tensor {name!r}: group {entry['group']!r} is not in the artifact")
    raw = raws[entry["group"]]
    if kind == "fp16":
        t = QuantizedTensor(shape=shape, dtype=entry["dtype"], data=_slice(raw, entry, "data", "fp16", shape))
    else:
        rows = shape[0] if shape else 0
        q = _slice(raw, entry, "q", "int8", shape)
        scale = _slice(raw, entry, "scale", "fp16", (rows,))
        lqer = None
        if "lqer" in entry:
            lq, rank = entry["lqer"], entry["lqer"]["rank"]
            if not isinstance(rank, int) or rank < 1 or len(shape) != 2:
                raise ValueError(f"artifact tensor {name!r}: invalid LQER rank {rank!r} for shape {list(shape)}")
            geometry = {"a": (shape[0], rank), "a_scale": (1,), "b": (rank, shape[1]),
                        "b_scale": (lqer_groups(rank, shape[1]),)}
            if LQER_GROUP not in raws:
                raise ValueError(f"artifact tensor {name!r}: group {LQER_GROUP!r} is not in the artifact")
            lqer = LowRank(**{p: _slice(raws[LQER_GROUP], {**lq, "name": name}, p, _SPAN_KINDS[p], geometry[p])
                              for p in _LQER_PARTS})
        t = QuantizedTensor(shape=shape, dtype=entry["dtype"], bits=entry["bits"], q=q, scale=scale, lqer=lqer)
    return _check_tensor(name, t, kind, "artifact")


def _slice(raw: bytes, entry: dict, key: str, kind: str, shape: tuple) -> torch.Tensor:
    """The tensor stored at entry[key] = [offset, nbytes], checked against `shape`."""
    offset, nbytes = entry[key]
    dtype = _NP_DTYPES[kind]
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"artifact tensor {entry['name']!r}: invalid shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected or offset < 0 or offset + nbytes > len(raw):
        raise ValueError(f"artifact tensor {entry['name']!r} {key}: {nbytes} bytes at offset {offset} "
                         f"in a {len(raw)}-byte group, expected {expected} bytes for shape {list(shape)}")
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=offset)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True)).reshape(shape)


def _check_tiling(index: list[dict], raws: dict[str, bytes]) -> None:
    """The index's [offset, nbytes] spans cover each group's payload exactly once."""
    spans: dict[str, list] = {g: [] for g in raws}
    for group, offset, nbytes, name, key in _spans(index):
        spans[group].append((offset, nbytes, name, key))
    for group, items in spans.items():
        end = 0
        for offset, nbytes, name, key in sorted(items):
            if offset != end:
                raise ValueError(f"artifact tensor {name!r} {key} starts at byte {offset} of group "
                                 f"{group!r}, expected {end} (spans must tile the payload)")
            end = offset + nbytes
        if end != len(raws[group]):
            raise ValueError(f"artifact group {group!r}: tensors cover {end} bytes, "
                             f"its payload has {len(raws[group])}")


def _check_tensor(name: str, t: QuantizedTensor, kind: str, where: str) -> QuantizedTensor:
    """Shapes and dtypes agree with the index; integers lie on their grid."""
    if kind not in KINDS:
        raise ValueError(f"{where}: tensor {name!r} has kind {kind!r}, expected one of {KINDS}")
    if kind == "fp16":
        ok = t.data is not None and t.q is None and t.data.dtype == torch.float16 and tuple(t.data.shape) == t.shape
        if not ok:
            raise ValueError(f"{where}: tensor {name!r} passthrough is not fp16 of shape {list(t.shape)}")
        return t
    if t.data is not None or t.q is None or t.scale is None or len(t.shape) != 2:
        raise ValueError(f"{where}: tensor {name!r} int8 needs 2-D q and scale only, found shape {list(t.shape)}")
    if t.q.dtype != torch.int8 or tuple(t.q.shape) != t.shape:
        raise ValueError(f"{where}: tensor {name!r} q is {t.q.dtype} {list(t.q.shape)}, expected int8 {list(t.shape)}")
    if t.scale.dtype != torch.float16 or tuple(t.scale.shape) != t.shape[:1]:
        raise ValueError(f"{where}: tensor {name!r} scale is {t.scale.dtype} {list(t.scale.shape)}, "
                         f"expected float16 [{t.shape[0]}]")
    if not isinstance(t.bits, int) or not 2 <= t.bits <= 8:
        raise ValueError(f"{where}: tensor {name!r} has bits={t.bits!r}, expected 2..8")
    peak = t.q.to(torch.int16).abs().max().item() if t.q.numel() else 0
    if peak > qmax_for(t.bits):
        raise ValueError(f"{where}: tensor {name!r} has |q| {peak} > {qmax_for(t.bits)} for {t.bits} bits")
    if t.lqer is not None:
        _check_low_rank(name, t.lqer, t.shape, where)
    return t


def _check_low_rank(name: str, lq: LowRank, shape: tuple, where: str) -> None:
    """LQER factors: int8 on their grids, fp16 scales, shapes that multiply to `shape`."""
    rank = lq.a.shape[1] if lq.a.ndim == 2 else -1
    expected = {"a": (torch.int8, (shape[0], rank)), "b": (torch.int8, (rank, shape[1])),
                "a_scale": (torch.float16, (1,)), "b_scale": (torch.float16, (lqer_groups(rank, shape[1]),))}
    for part, (dtype, want) in expected.items():
        x = getattr(lq, part)
        if rank < 1 or x.dtype != dtype or tuple(x.shape) != want:
            raise ValueError(f"{where}: tensor {name!r} LQER {part} is {x.dtype} {list(x.shape)}, "
                             f"expected {dtype} {list(want)}")
    for part, (lo, hi) in (("a", LQER_A_RANGE), ("b", LQER_B_RANGE)):
        x = getattr(lq, part)
        if x.numel() and (x.min().item() < lo or x.max().item() > hi):
            raise ValueError(f"{where}: tensor {name!r} LQER {part} leaves its grid [{lo}, {hi}]")


def read_artifact(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path} (run the quantize stage)")
    return path.read_bytes()


def load_model(path: str | Path) -> GPT:
    """Rebuild the dequantized model from the artifact file alone."""
    try:
        qm, config = unpack_artifact(read_artifact(path))
    except ValueError as e:
        raise ValueError(f"artifact {path}: {e}") from e
    return build_model(dequantize(qm), ModelConfig(**config))
