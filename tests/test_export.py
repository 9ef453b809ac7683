import numpy as np
import pytest

from pgolf_core import corpus, data, export, tokenizer


@pytest.fixture(scope="module")
def model_proto(tiny_tokenizer_dir):
    return (tiny_tokenizer_dir / tokenizer.MODEL_FILE).read_bytes()


def test_export_splits_and_shards_like_a_plain_encode(tmp_path, model_proto, tiny_sp, embedded_docs):
    docs = embedded_docs[:700]
    stats = export.export_shards(iter(docs), model_proto, tmp_path, val_documents=50, shard_tokens=30_000,
                                 num_workers=1, progress=False)
    val, train = data.load_split(tmp_path, "val"), data.load_split(tmp_path, "train")
    np.testing.assert_array_equal(val, tokenizer.encode_documents(tiny_sp, docs[:50]))
    np.testing.assert_array_equal(train, tokenizer.encode_documents(tiny_sp, docs[50:]))
    assert stats.val.documents == 50 and stats.train.documents == 650
    assert stats.train.tokens == len(train) and stats.train.shards == len(data.list_shards(tmp_path, "train")) > 1
    assert all(data.read_header(p) == 30_000 for p in data.list_shards(tmp_path, "train")[:-1])
    assert stats.train.bytes == sum(len(d.encode()) for d in docs[50:])
    assert stats.corpus_sha256 == corpus.corpus_sha256(docs)


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, model_proto, embedded_docs):
    docs = embedded_docs[:600]
    for workers in (1, 2):
        export.export_shards(iter(docs), model_proto, tmp_path / str(workers), val_documents=30,
                             shard_tokens=20_000, num_workers=workers, progress=False)
    one, two = sorted((tmp_path / "1").iterdir()), sorted((tmp_path / "2").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


def test_too_few_documents_are_named(tmp_path, model_proto):
    with pytest.raises(ValueError, match="fewer than the 10 validation documents"):
        export.export_shards(iter(["one doc"] * 5), model_proto, tmp_path, val_documents=10, shard_tokens=100,
                             progress=False)
    with pytest.raises(ValueError, match="no training documents"):
        export.export_shards(iter(["one doc"] * 10), model_proto, tmp_path / "b", val_documents=10,
                             shard_tokens=100, progress=False)
