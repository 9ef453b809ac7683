"""Byte layouts of an artifact group: the order its bytes take before compression.

A codec only sees bytes, so how the integers are laid out decides what it can exploit.
The records found three reorderings worth their cost (TECHNIQUES §4.7): writing each
matrix column-major (04-27's per-group path: a column of one input feature is more alike
than a row), reordering rows along a greedy nearest-neighbour chain so similar rows sit
together (04-27, embedding / c_q / MLP fc; the permutation is stored, as 04-27 stores it
in uint16), and a stride-2 byte shuffle of fp16 data, all low bytes then all high bytes
(04-05…04-23, "BSHF"). A layout is a name such as "col+nn+shuffle"; `encode` and `decode`
are exact inverses, and `decode` checks every permutation it reads.

The group payload is the artifact's canonical bytes: integer spans first, then fp16 spans.
Only the integer matrices named in `matrices` are reordered; the shuffle applies to the
fp16 tail from `fp16_start` on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgolf_core.config import check_layout_name

PERM_DTYPE = np.dtype("<u2")  # a row index, as the 04-27 record stores it: matrices above 65,536 rows are refused
_GRAM_MAX_ROWS = 8192  # up to this many rows the whole Gram matrix is computed at once (256 MiB float32)


@dataclass(frozen=True)
class Layout:
    order: str  # "row" or "col"
    nn: bool  # rows reordered by a nearest-neighbour chain, permutation stored
    shuffle: bool  # fp16 tail byte-shuffled with stride 2

    @classmethod
    def parse(cls, name: str) -> "Layout":
        check_layout_name("layout", name)
        parts = name.split("+")
        return cls(order=parts[0], nn="nn" in parts, shuffle="shuffle" in parts)


def nn_order(m: np.ndarray) -> np.ndarray:
    """A greedy nearest-neighbour chain through the rows of `m` (int64 permutation): start
    at row 0, always step to the closest unvisited row. Distance is Euclidean (the record
    used L1; L2 comes from one Gram matmul, so the chain costs O(rows²) after it rather
    than O(rows²·cols)); ties go to the lowest index."""
    rows = m.shape[0]
    if rows <= 2:
        return np.arange(rows)
    x = m.astype(np.float32)
    norms = (x * x).sum(axis=1)
    gram = x @ x.T if rows <= _GRAM_MAX_ROWS else None
    visited = np.zeros(rows, dtype=bool)
    order = np.empty(rows, dtype=np.int64)
    cur = 0
    for step in range(rows):
        order[step] = cur
        visited[cur] = True
        if step == rows - 1:
            break
        dots = gram[cur] if gram is not None else x @ x[cur]
        d = norms - 2.0 * dots  # + norms[cur], the same for every candidate
        d[visited] = np.inf
        cur = int(np.argmin(d))
    return order


def encode(raw: bytes, matrices: list[tuple[int, int, int, str]], fp16_start: int, layout: Layout) -> bytes:
    """The bytes a codec sees for a group: [permutations (uint16, per matrix, if nn)] then
    the payload with each (offset, rows, cols, tensor name) int8 matrix reordered and the fp16 tail
    shuffled as `layout` says."""
    buf = np.frombuffer(raw, dtype=np.uint8).copy()
    perms = []
    for offset, rows, cols, name in matrices:
        m = buf[offset: offset + rows * cols].reshape(rows, cols)
        if layout.nn:
            if rows > np.iinfo(PERM_DTYPE).max + 1:
                raise ValueError(f"layout nn: tensor {name!r} has {rows} rows, more than uint16 row indices reach")
            p = nn_order(m.view(np.int8))
            perms.append(p.astype(PERM_DTYPE).tobytes())
            m = m[p]
        if layout.order == "col":
            m = m.T
        buf[offset: offset + rows * cols] = np.ascontiguousarray(m).reshape(-1)
    if layout.shuffle:
        tail = buf[fp16_start:]
        if len(tail) % 2:
            raise ValueError(f"layout shuffle: the fp16 tail has an odd length {len(tail)}")
        buf[fp16_start:] = np.concatenate([tail[0::2], tail[1::2]])
    return b"".join(perms) + buf.tobytes()


def decode(data: bytes, matrices: list[tuple[int, int, int, str]], fp16_start: int, raw_len: int, layout: Layout) -> bytes:
    """Inverse of `encode`; ValueError for a wrong length or a stored permutation that is
    not one."""
    perm_bytes = sum(rows for _, rows, _, _ in matrices) * PERM_DTYPE.itemsize if layout.nn else 0
    if len(data) != perm_bytes + raw_len:
        raise ValueError(f"layout {_name(layout)}: {len(data)} bytes, expected {perm_bytes} of permutations + "
                         f"{raw_len} of payload")
    if not 0 <= fp16_start <= raw_len or (raw_len - fp16_start) % 2:
        raise ValueError(f"layout {_name(layout)}: fp16 tail from byte {fp16_start} of {raw_len} is not whole fp16")
    perms = np.frombuffer(data, dtype=PERM_DTYPE, count=perm_bytes // 2).astype(np.int64)
    buf = np.frombuffer(data, dtype=np.uint8, offset=perm_bytes).copy()
    if layout.shuffle:
        tail = buf[fp16_start:]
        half = len(tail) // 2
        out = np.empty_like(tail)
        out[0::2], out[1::2] = tail[:half], tail[half:]
        buf[fp16_start:] = out
    if layout.order == "row" and not layout.nn:
        return buf.tobytes()  # matrices untouched: their spans are checked where they are read
    at = 0
    for offset, rows, cols, name in matrices:
        if offset < 0 or offset + rows * cols > fp16_start:
            raise ValueError(f"layout {_name(layout)}: tensor {name!r} at byte {offset} ({rows}x{cols}) lies "
                             f"outside the integer part ({fp16_start} bytes)")
        m = buf[offset: offset + rows * cols]
        m = m.reshape(cols, rows).T if layout.order == "col" else m.reshape(rows, cols)
        if layout.nn:
            p = perms[at: at + rows]
            at += rows
            if not np.array_equal(np.sort(p), np.arange(rows)):
                raise ValueError(f"layout {_name(layout)}: the stored row order of tensor {name!r} "
                                 "is not a permutation")
            restored = np.empty_like(m)
            restored[p] = m
            m = restored
        buf[offset: offset + rows * cols] = np.ascontiguousarray(m).reshape(-1)
    return buf.tobytes()


def _name(layout: Layout) -> str:
    return layout.order + ("+nn" if layout.nn else "") + ("+shuffle" if layout.shuffle else "")
