import numpy as np
import pytest

from pgolf_core import bpb, tokenizer


def test_training_is_deterministic(embedded_docs):
    docs = embedded_docs[:300]
    assert tokenizer.train_tokenizer(docs, 512) == tokenizer.train_tokenizer(docs, 512)


def test_tokenizer_settings(tiny_sp):
    assert (tiny_sp.pad_id(), tiny_sp.bos_id(), tiny_sp.eos_id(), tiny_sp.unk_id()) == (0, 1, 2, 3)
    assert tiny_sp.piece_to_id(bpb.SPACE_MARK) != tiny_sp.unk_id()
    text = "Tab\there,  two spaces, ünïcödé ✓ and 12345\n"
    assert tiny_sp.decode(tiny_sp.encode(text)) == text  # identity normalisation, byte fallback


def test_every_document_starts_with_bos(tiny_sp, embedded_docs):
    docs = embedded_docs[:40]
    stream = tokenizer.encode_documents(tiny_sp, docs, num_threads=2)
    starts = np.flatnonzero(stream == tokenizer.BOS_ID)
    assert len(starts) == len(docs) and starts[0] == 0
    for doc, a, b in zip(docs, starts, list(starts[1:]) + [len(stream)]):
        assert tiny_sp.decode(stream[a + 1 : b].tolist()) == doc


def test_vocab_that_does_not_fit_the_corpus_is_named(embedded_docs):
    with pytest.raises(ValueError, match="too small for this vocabulary"):
        tokenizer.train_tokenizer(["a tiny corpus with few words"] * 3, 2000)
    with pytest.raises(ValueError, match="training failed for vocab_size=270"):
        tokenizer.train_tokenizer(embedded_docs[:300], 270)  # fewer pieces than characters


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the tokenize stage"):
        tokenizer.load_tokenizer(tmp_path)
    (tmp_path / tokenizer.MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tokenizer.load_tokenizer(tmp_path)
