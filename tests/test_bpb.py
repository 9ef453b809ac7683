import math

import numpy as np
import pytest
import torch

from pgolf_core import bpb, tokenizer


def test_stream_bytes_equal_utf8_length_of_the_validation_text(tiny_sp, embedded_docs):
    """The law behind every val_bpb: bytes of all targets == UTF-8 length of the text."""
    val_docs = embedded_docs[:100]  # includes pieces the tokenizer never saw: byte fallback
    stream = tokenizer.encode_documents(tiny_sp, val_docs, num_threads=2)
    tables = bpb.byte_tables(tiny_sp)
    decoded = [tiny_sp.decode(stream[a + 1 : b].tolist()) for a, b in _doc_spans(stream)]
    assert decoded == val_docs
    assert bpb.stream_bytes(tables, stream) == sum(len(d.encode("utf-8")) for d in val_docs)


def test_byte_rules(tiny_sp):
    tables = bpb.byte_tables(tiny_sp)
    space = tiny_sp.piece_to_id(bpb.SPACE_MARK)
    byte_piece = tiny_sp.piece_to_id("<0xE2>")
    assert tables.base_bytes[byte_piece] == 1 and not tables.has_space[byte_piece]
    assert tables.is_boundary[tokenizer.BOS_ID] and tables.base_bytes[tokenizer.BOS_ID] == 0
    assert tables.has_space[space] and tables.base_bytes[space] == 0
    prev = np.array([tokenizer.BOS_ID, space])
    assert bpb.target_bytes(tables, prev, np.array([space, space])).tolist() == [0, 1]  # no space after BOS
    assert bpb.target_bytes(tables, torch.tensor(prev), torch.tensor([space, space])).tolist() == [0, 1]


def test_bits_per_byte():
    assert bpb.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bpb.bits_per_byte(1.0, 0)


def _doc_spans(stream):
    starts = list(np.flatnonzero(stream == tokenizer.BOS_ID)) + [len(stream)]
    return zip(starts[:-1], starts[1:])
