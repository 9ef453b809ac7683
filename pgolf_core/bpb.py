"""Byte accounting for val_bpb: the one place that says how many bytes a token is worth.

val_bpb = (sum of target NLL in nats) / ln 2 / (UTF-8 bytes those targets decode to).
A target's bytes are the UTF-8 length of its piece without the SentencePiece space
marker, plus 1 when the piece carries that marker and the previous token is not a
control/boundary token (the space after BOS is not part of the text); byte-fallback
pieces count 1; control, unknown and unused pieces count 0. Every reported val_bpb
(train, verify, evaluate, ngrams) goes through `val_byte_counts` and `bits_per_byte`.
With the CaseOps tokenizer, per-token byte sidecars written at tokenize time replace
the table (`write_byte_sidecars`): operators cost 0 bytes.

One character is not counted as the text has it: SentencePiece reads a literal U+2581
as its space marker, so the plain tokenizer turns it into a space and the table counts
1 byte (0 after BOS) for its 3, exactly as the challenge's lookup table does, since a
val_bpb must be comparable with the records'. CaseOps escapes it (`caseops.encode`), so
there the sidecars count its 3 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf_core import caseops, data

SPACE_MARK = "\u2581"


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id tables built once from the tokenizer (all of length vocab_size)."""

    base_bytes: np.ndarray  # int64: UTF-8 bytes of the piece without a leading space mark
    has_space: np.ndarray  # bool: the piece starts with the space mark
    is_boundary: np.ndarray  # bool: control / unknown / unused pieces (0 bytes, no space after)

    @property
    def vocab_size(self) -> int:
        return len(self.base_bytes)


def byte_tables(sp) -> ByteTables:
    """Build the tables from a `sentencepiece.SentencePieceProcessor`.

    Refuses a tokenizer without a standalone space-mark piece: it would byte-fall-back
    every word boundary into 3 tokens of 1 byte each and overcount bytes (challenge
    issue #897).
    """
    vocab = sp.vocab_size()
    if sp.piece_to_id(SPACE_MARK) == sp.unk_id():
        raise ValueError(
            f"tokenizer has no standalone {SPACE_MARK!r} piece: word boundaries would be "
            "byte-fallback tokens and val_bpb would be wrong"
        )
    base = np.zeros(vocab, dtype=np.int64)
    space = np.zeros(vocab, dtype=bool)
    boundary = np.zeros(vocab, dtype=bool)
    for i in range(vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE_MARK):
                space[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return ByteTables(base_bytes=base, has_space=space, is_boundary=boundary)


def target_bytes(tables: ByteTables, prev_tokens, targets):
    """Bytes of each target given the token before it (numpy or torch, same shape)."""
    if isinstance(targets, np.ndarray):
        base, space, boundary = tables.base_bytes, tables.has_space, tables.is_boundary
        return base[targets] + (space[targets] & ~boundary[prev_tokens])
    import torch

    device = targets.device
    base = torch.as_tensor(tables.base_bytes, device=device)
    space = torch.as_tensor(tables.has_space, device=device)
    boundary = torch.as_tensor(tables.is_boundary, device=device)
    return base[targets] + (space[targets] & ~boundary[prev_tokens]).long()


def position_bytes(tables: ByteTables, tokens: np.ndarray) -> np.ndarray:
    """Bytes of the target at each stream position, int64 (N,); position 0 is never a
    target and holds 0. Evaluators index this array by target position."""
    tokens = np.asarray(tokens, dtype=np.int64)
    counts = np.zeros(len(tokens), dtype=np.int64)
    counts[1:] = target_bytes(tables, tokens[:-1], tokens[1:])
    return counts


def stream_bytes(tables: ByteTables, tokens: np.ndarray) -> int:
    """Total bytes of every target of a token stream (all positions but the first)."""
    return int(position_bytes(tables, tokens).sum())


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Sum of NLL in nats over a set of targets -> bits per byte of those targets."""
    if num_bytes <= 0:
        raise ValueError(f"cannot compute bits per byte over {num_bytes} bytes")
    return nll_nats / math.log(2) / num_bytes


def has_case_transform(sp) -> bool:
    """True when the tokenizer reserves the CaseOps operators as pieces: its text was
    case-transformed, so the lookup table would charge each operator 3 bytes."""
    return all(sp.piece_to_id(op) != sp.unk_id() for op in caseops.OPERATORS)


def caseops_position_bytes(sp, tokens: np.ndarray) -> np.ndarray:
    """Original-text bytes of the target at each position of a case-transformed stream,
    from each token's surface run through the inverse transform's state machine (per
    document: state resets at BOS). Byte-fallback pieces stand for one byte of a
    character that is neither a letter nor an operator, so they count 1."""
    tokens = np.asarray(tokens, dtype=np.int64)
    surfaces = [_surface(sp, i) for i in range(sp.vocab_size())]
    counts = np.zeros(len(tokens), dtype=np.int64)
    starts = list(np.flatnonzero(tokens == sp.bos_id())) + [len(tokens)]
    if starts[0] != 0:
        raise ValueError("a case-transformed stream must start with BOS")
    for a, b in zip(starts[:-1], starts[1:]):
        counts[a + 1 : b] = caseops.original_byte_counts([surfaces[t] for t in tokens[a + 1 : b]])
    return counts


def val_byte_counts(sp, shards_dir, tokens: np.ndarray) -> np.ndarray:
    """Per-position byte counts of the validation stream (see `position_bytes`): what
    every evaluator divides by. A case-transformed tokenizer reads them from the byte
    sidecars beside the val shards and refuses to run without them."""
    if not has_case_transform(sp):
        return position_bytes(byte_tables(sp), tokens)
    files = sorted(Path(shards_dir).glob(data.VAL_BYTES_PATTERN))
    if not files:
        raise ValueError(
            f"the tokenizer carries the CaseOps transform but {shards_dir} has no {data.VAL_BYTES_PATTERN} "
            "byte sidecars: the lookup table would charge each operator 3 bytes and flatter val_bpb"
        )
    counts = np.concatenate([data.read_shard(p) for p in files]).astype(np.int64)
    if len(counts) != len(tokens):
        raise ValueError(f"byte sidecars in {shards_dir} hold {len(counts)} counts for {len(tokens)} val tokens")
    counts[0] = 0  # the first token is never a target
    return counts


def write_byte_sidecars(sp, shards_dir) -> int:
    """Write `fineweb_val_bytes_NNNNNN.bin` parallel to each val shard (same header, one
    uint16 count per token, computed over the whole val stream since a document may
    straddle shards); returns the total bytes."""
    files = data.list_shards(shards_dir, "val")
    parts = [data.read_shard(p) for p in files]
    counts = caseops_position_bytes(sp, np.concatenate(parts))
    for path, part, start in zip(files, parts, np.cumsum([0] + [len(p) for p in parts[:-1]])):
        sidecar = path.with_name(path.name.replace("fineweb_val_", "fineweb_val_bytes_"))
        data.write_shard(sidecar, counts[start : start + len(part)])
    return int(counts.sum())


def _surface(sp, token: int) -> str:
    if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
        return ""
    if sp.is_byte(token):
        return "#"  # one byte of a character that is neither an ASCII letter nor an operator
    return sp.id_to_piece(token).replace(SPACE_MARK, " ")
