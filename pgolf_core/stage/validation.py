"""The setup every stage that scores text shares: the tokenizer, the validation split
and its per-position byte counts (what every val_bpb divides by), and the check that a
model's vocabulary is the tokenizer's."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from pgolf_core import data, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.config import ModelConfig


class Validation(NamedTuple):
    sp: object  # the SentencePiece processor
    tokens: np.ndarray  # the validation stream, every val shard in order
    byte_counts: np.ndarray  # bytes per position (`bpb.val_byte_counts`)


def load_validation(tokenizer_dir: Path, shards_dir: Path) -> Validation:
    """The tokenizer in `tokenizer_dir`, and the val shards of `shards_dir` (never a train
    shard) with their byte counts."""
    sp = tokenizer.load_tokenizer(tokenizer_dir)
    tokens = data.load_split(shards_dir, "val", sp.vocab_size())
    return Validation(sp, tokens, val_byte_counts(sp, shards_dir, tokens))


def check_model_vocab(model_cfg: ModelConfig, sp, where: Path | str) -> None:
    """Refuse a model whose vocabulary is not the tokenizer's (`where`: the tokenizer's
    folder, named in the error)."""
    if model_cfg.vocab_size != sp.vocab_size():
        raise ValueError(f"model vocab {model_cfg.vocab_size} != tokenizer vocab {sp.vocab_size()} ({where})")
