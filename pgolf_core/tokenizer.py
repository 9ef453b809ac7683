"""SentencePiece BPE tokenizer: training, loading, and encoding documents into a stream.

Settings keep the bytes of the text intact: identity normalisation, no dummy prefix,
extra whitespace kept, byte fallback for anything outside the learnt pieces, digits
split. Ids: pad 0, BOS 1, EOS 2, unk 3, as in the challenge data. Every document is
emitted as [BOS] + pieces; there is no EOS, so BOS alone delimits documents.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf_core.bpb import SPACE_MARK
from pgolf_core.config import BOS_ID

MODEL_FILE = "tokenizer.model"
PAD_ID, EOS_ID, UNK_ID = 0, 2, 3  # and BOS_ID = 1, which the model config owns


def train_tokenizer(docs: list[str], vocab_size: int, num_threads: int = 1,
                    reserved: tuple[str, ...] = ()) -> bytes:
    """Train a BPE model on `docs`; returns the serialized model proto. `reserved`
    strings become user-defined pieces (ids 4, 5, ...) that never merge with others:
    the CaseOps operators."""
    model = io.BytesIO()
    try:
        _train(docs, vocab_size, num_threads, model, reserved)
    except RuntimeError as e:  # SentencePiece reports bad settings as RuntimeError
        raise ValueError(f"tokenizer training failed for vocab_size={vocab_size}: {e}") from e
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer learnt {sp.vocab_size()} pieces, asked for {vocab_size}: the corpus is too "
            "small for this vocabulary (lower tokenize.vocab_size or add documents)"
        )
    if sp.piece_to_id(SPACE_MARK) == sp.unk_id():
        raise ValueError(f"tokenizer learnt no standalone {SPACE_MARK!r} piece: the corpus has no spaces?")
    return model.getvalue()


def load_tokenizer(directory: str | Path) -> spm.SentencePieceProcessor:
    """Load `<directory>/tokenizer.model`, checking the BOS id the shards rely on."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (run the tokenize stage)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a SentencePiece model: {e}") from e
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"tokenizer {path}: BOS id {sp.bos_id()}, expected {BOS_ID}")
    return sp


def encode_documents(sp: spm.SentencePieceProcessor, docs: list[str], num_threads: int = 1) -> np.ndarray:
    """One uint16 stream of [BOS] + tokens for each document, encoded on `num_threads` threads."""
    if sp.vocab_size() > 1 << 16:
        raise ValueError(f"vocab size {sp.vocab_size()} does not fit uint16 shards")
    pieces = sp.encode(docs, num_threads=num_threads)
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    stream = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream[starts] = BOS_ID
    for start, ids in zip(starts, pieces):
        stream[start + 1 : start + 1 + len(ids)] = ids
    return stream


def _train(docs: list[str], vocab_size: int, num_threads: int, writer, reserved: tuple[str, ...]) -> None:
    spm.SentencePieceTrainer.train(
        user_defined_symbols=list(reserved),
        sentence_iterator=iter(docs),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,
        max_sentence_length=1 << 20,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        num_threads=num_threads,
        minloglevel=2,
    )
