"""CaseOps through the pipeline: the tokenizer reserves the operators, tokenize writes
byte sidecars, and every val_bpb divides by the original text's bytes."""

import random

import numpy as np
import pytest

from pgolf_core import bpb, caseops, config, data, tokenizer
from pgolf_core.stage.tokenize import TokenizePaths, run


def run_tokenize(tmp_path, name, **values):
    cfg = config.build_section("tokenize", {"vocab_size": 512, "val_documents": 60, "num_workers": 2, **values})
    metrics = run(cfg, TokenizePaths(tmp_path / name / "tok", tmp_path / name / "shards", tmp_path / "dl",
                                     tmp_path / name / "tokenize.json")).metrics
    sp = tokenizer.load_tokenizer(tmp_path / name / "tok")
    val = data.load_split(tmp_path / name / "shards", "val", sp.vocab_size())
    return metrics, sp, val, bpb.val_byte_counts(sp, tmp_path / name / "shards", val)


def generated_docs(n: int) -> list[str]:
    rng = random.Random(0)
    words = ["the", "The", "NASA", "iPhone", "McDonald", "A", "I", "x", "naïVE", "Été", "\ue001", "\ue004op",
             "2024", "ok2GO", "  ", "\n", "tab\there", "日本語", "ÀB", "end.",
             "\u2581", "x\u2581Y"]  # SentencePiece's space marker as a literal character (3 bytes)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))).strip() or "x" for _ in range(n)]


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caseops")
    plain = run_tokenize(tmp, "plain", max_documents=600)
    cased = run_tokenize(tmp, "caseops", max_documents=600, case_transform="caseops")
    return tmp, plain, cased


def test_sidecar_bytes_equal_the_validation_text_exactly(embedded_runs, embedded_docs):
    _, (_, _, plain_val, plain_bytes), (metrics, sp, val, counts) = embedded_runs
    text_bytes = sum(len(d.encode("utf-8")) for d in embedded_docs[:60])
    assert counts.sum() == metrics["val"]["bytes"] == text_bytes
    assert plain_bytes.sum() == text_bytes  # same text, same bytes, with or without the transform
    assert bpb.stream_bytes(bpb.byte_tables(sp), val) > text_bytes  # the lookup table would flatter val_bpb


def test_operators_are_reserved_pieces_and_documents_start_with_bos(embedded_runs):
    _, _, (metrics, sp, val, counts) = embedded_runs
    assert [sp.piece_to_id(op) for op in caseops.OPERATORS] == [4, 5, 6, 7] and bpb.has_case_transform(sp)
    assert val[0] == tokenizer.BOS_ID and (val == tokenizer.BOS_ID).sum() == metrics["val"]["documents"] == 60
    assert (counts[val == tokenizer.BOS_ID] == 0).all()
    starts = list(np.flatnonzero(val == tokenizer.BOS_ID)) + [len(val)]
    decoded = caseops.decode(sp.decode(val[starts[0] + 1 : starts[1]].tolist()))
    assert counts[starts[0] + 1 : starts[1]].sum() == len(decoded.encode("utf-8"))


def test_a_transformed_tokenizer_without_sidecars_is_refused(embedded_runs):
    tmp, _, (_, sp, val, _) = embedded_runs
    shards = tmp / "caseops" / "shards"
    for sidecar in shards.glob(data.VAL_BYTES_PATTERN):
        sidecar.rename(sidecar.with_suffix(".moved"))
    with pytest.raises(ValueError, match="no fineweb_val_bytes_.*sidecars.*3 bytes"):
        bpb.val_byte_counts(sp, shards, val)
    for moved in shards.glob("*.moved"):
        moved.rename(moved.with_suffix(".bin"))


def test_generated_mixed_case_corpus_counts_exactly(tmp_path):
    import json

    docs = generated_docs(400)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    metrics, sp, val, counts = run_tokenize(tmp_path, "gen", source="jsonl", jsonl_path=str(path),
                                            case_transform="caseops", vocab_size=340, shard_tokens=1000)
    assert len(data.list_shards(tmp_path / "gen" / "shards", "val")) > 1  # documents straddle val shards
    assert counts.sum() == sum(len(d.lstrip().encode("utf-8")) for d in docs[:60])
