"""Byte accounting for val_bpb: the one place that says how many bytes a token is worth.

val_bpb = (sum of target NLL in nats) / ln 2 / (UTF-8 bytes those targets decode to).
A target's bytes are the UTF-8 length of its piece without the SentencePiece space
marker, plus 1 when the piece carries that marker and the previous token is not a
control/boundary token (the space after BOS is not part of the text); byte-fallback
pieces count 1; control, unknown and unused pieces count 0. Every reported val_bpb
(train, verify, evaluate, ngrams) goes through `target_bytes` and `bits_per_byte`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def val_byte_counts(sp, shards_dir, tokens: np.ndarray) -> np.ndarray:
    """Per-position byte counts of the validation stream (see `position_bytes`): what
    every evaluator divides by."""
    return position_bytes(byte_tables(sp), tokens)
