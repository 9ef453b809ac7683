"""The artifact: quantized weights + model config in one checksummed, compressed file.

Its length is what the 16,000,000-byte budget counts (with the code), so the layout
spends bytes only where needed: tensors are grouped by role, because integers of the
same role share statistics and compress better together, and each group is compressed
with whichever configured codec is smallest for it. Everything needed to rebuild the
model is inside (the model config travels in the header), and any flipped, missing or
extra byte is rejected before a single weight is used.

Byte layout (little-endian), format version 2 (version 1, RTN at one width for every
matrix, is refused with a message: re-run the quantize stage):

    offset  size  field
    0       8     magic b"PGOLFART"
    8       2     uint16 format version (2)
    10      8     uint64 total artifact length in bytes, digest included
    18      4     uint32 H = length of the compressed header
    22      H     header: zlib-9 compressed UTF-8 JSON (below)
    22+H    ...   group payloads, each compressed separately, in header "groups" order
    end-32  32    sha256 of every byte before it (prefix, header, payloads)

Header JSON:
    {"method": "rtn" | "gptq", "model_config": {...},
     "bits_per_category": {"embedding": 7, "attention": 6, ...} (every integer tensor of a
                          category has its width; checked on reading),
     "groups":  [{"name", "codec" (id, see compress.CODEC_IDS), "raw_bytes",
                  "stored_bytes", "crc32" (of the uncompressed payload)}, ...],
     "tensors": [{"name", "kind" ("int8" | "fp16"), "shape", "dtype" (original), "group",
                  int8: "bits", "q": [offset, nbytes], "scale": [offset, nbytes];
                  fp16: "data": [offset, nbytes]}, ...]}

Offsets are into the group's uncompressed payload. Within a group the int8 matrices
come first (row-major), then their fp16 scales, then fp16 passthrough data, each in
tensor order. The sha256 catches any tampering of the stored bytes; the per-group crc32
checks that decompression reproduced the exact payload.

The quantizer's reference (integers and scales, outside the artifact) is a safetensors
file with keys "<name>:q", "<name>:scale", "<name>:data" and the index in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from pgolf_core.checkpoint import build_model
from pgolf_core.compress import codec_id, codec_name, compress_smallest, decompress
from pgolf_core.io import write_bytes_atomic
from pgolf_core.model import GPT, ModelConfig
from pgolf_core.quant import CATEGORIES, KINDS, QuantizedModel, QuantizedTensor, category_of, dequantize
from pgolf_core.quant.rtn import qmax_for

MAGIC = b"PGOLFART"
FORMAT_VERSION = 2  # 2: per-category widths (bits_per_category), GPTQ or RTN integers
PREFIX = struct.Struct("<8sHQI")  # magic, version, total length, header length
DIGEST_BYTES = 32  # sha256
PASSTHROUGH_GROUP = "passthrough"  # every fp16 tensor, whatever its name
GROUP_ORDER = (*CATEGORIES, PASSTHROUGH_GROUP)
REFERENCE_FORMAT = "pgolf-quant-reference-1"
_NP_DTYPES = {"int8": np.dtype("i1"), "fp16": np.dtype("<f2")}


def group_of(name: str, kind: str) -> str:
    """The storage group of a tensor: fp16 -> "passthrough", int8 by its category."""
    return PASSTHROUGH_GROUP if kind == "fp16" else category_of(name)


def pack_artifact(qm: QuantizedModel, model_config: dict, compressors) -> tuple[bytes, dict]:
    """Serialize `qm` and `model_config` (JSON-able) into artifact bytes (layout above).

    Returns (artifact, report); report has model_bytes (= len(artifact)), header_bytes,
    bytes_per_group (compressed), raw_bytes_per_group and compressor_per_group.
    """
    payloads, index = _layout(qm)
    bits = _bits_per_category(qm)
    groups, blobs = [], []
    for group, raw in payloads.items():
        codec, blob = compress_smallest(raw, compressors)
        groups.append({"name": group, "codec": codec_id(codec), "raw_bytes": len(raw),
                       "stored_bytes": len(blob), "crc32": zlib.crc32(raw)})
        blobs.append(blob)
    header = {"method": qm.method, "model_config": model_config, "bits_per_category": bits,
              "groups": groups, "tensors": index}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    total = PREFIX.size + len(header_bytes) + sum(map(len, blobs)) + DIGEST_BYTES
    body = PREFIX.pack(MAGIC, FORMAT_VERSION, total, len(header_bytes)) + header_bytes + b"".join(blobs)
    artifact = body + hashlib.sha256(body).digest()
    report = {
        "model_bytes": len(artifact),
        "header_bytes": len(header_bytes),
        "bytes_per_group": {g["name"]: g["stored_bytes"] for g in groups},
        "raw_bytes_per_group": {g["name"]: g["raw_bytes"] for g in groups},
        "compressor_per_group": {g["name"]: codec_name(g["codec"]) for g in groups},
    }
    return artifact, report


def unpack_artifact(blob: bytes) -> tuple[QuantizedModel, dict]:
    """(quantized model, model config) from artifact bytes, bit-exact to what was packed.

    Raises ValueError naming the problem: wrong magic, unsupported version, truncated or
    trailing data, checksum mismatch, undecompressable group, inconsistent index.
    """
    header, payload = _open(blob)
    try:
        raws = _decompress_groups(header["groups"], payload)
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
    except (KeyError, TypeError, IndexError) as e:
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
        tensors.update({f"{name}:{part}": x.contiguous() for part, x in parts.items()})
        index.append({"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype, "bits": t.bits})
    meta = {"format": REFERENCE_FORMAT, "method": qm.method, "index": json.dumps(index)}
    write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=meta))


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
            t = QuantizedTensor(shape=tuple(e["shape"]), dtype=e["dtype"], bits=e["bits"], **parts)
            tensors[e["name"]] = _check_tensor(e["name"], t, e["kind"], str(path))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed reference index ({type(e).__name__}: {e})") from e
    if stored:
        raise ValueError(f"{path}: tensors {sorted(stored)[:3]} are not in the index")
    return QuantizedModel(tensors=tensors, method=meta.get("method", ""))


def compare_exact(a: QuantizedModel, b: QuantizedModel) -> list[str]:
    """Names whose kind, shape, bits, integers, scales or passthrough bits differ (sorted).

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
    return _same_bits(x.q, y.q) and _same_bits(x.scale, y.scale)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype == torch.float16:
        x, y = x.view(torch.int16), y.view(torch.int16)
    return torch.equal(x, y)


def _layout(qm: QuantizedModel) -> tuple[dict[str, bytes], list[dict]]:
    """Group payloads (in GROUP_ORDER) and the tensor index with offsets into them."""
    parts: dict[str, list] = {g: [] for g in GROUP_ORDER}  # group -> [(rank, entry, key, bytes)]
    index = []
    for name, t in qm.tensors.items():
        entry = {"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype,
                 "group": group_of(name, t.kind)}
        if t.kind == "int8":
            entry["bits"] = t.bits
            parts[entry["group"]] += [(0, entry, "q", _to_bytes(t.q, "int8")),
                                      (1, entry, "scale", _to_bytes(t.scale, "fp16"))]
        else:
            parts[entry["group"]].append((2, entry, "data", _to_bytes(t.data, "fp16")))
        index.append(entry)
    payloads = {}
    for group, items in parts.items():
        offset, chunks = 0, []
        for _, entry, key, data in sorted(items, key=lambda item: item[0]):  # stable: tensor order kept
            entry[key] = [offset, len(data)]
            offset += len(data)
            chunks.append(data)
        if chunks:
            payloads[group] = b"".join(chunks)
    return payloads, index


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
    if version == 1:
        raise ValueError("artifact format version 1 (one RTN width for every matrix) was written by an older "
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


def _decompress_groups(groups: list[dict], payload: memoryview) -> dict[str, bytes]:
    """Uncompressed payload per group name; checks sizes and crc32 of each."""
    stored = sum(g["stored_bytes"] for g in groups)
    if stored != len(payload):
        raise ValueError(f"artifact groups declare {stored} stored bytes, the payload holds {len(payload)}")
    raws, offset = {}, 0
    for g in groups:
        name, codec = g["name"], codec_name(g["codec"])
        chunk = bytes(payload[offset: offset + g["stored_bytes"]])
        offset += g["stored_bytes"]
        try:
            raw = decompress(chunk, codec)
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
        t = QuantizedTensor(shape=shape, dtype=entry["dtype"], bits=entry["bits"], q=q, scale=scale)
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
    for e in index:
        spans[e["group"]] += [(*e[key], e["name"], key) for key in ("q", "scale", "data") if key in e]
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
    return t


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
