import json
import subprocess
import sys

import pytest

from pgolf_core import corpus


def test_embedded_corpus_properties(embedded_docs):
    # ~2,500 documents and ~1.8 MB on CPython 3.10-3.13; the exact count varies by version
    assert 1500 < len(embedded_docs) < 4000
    total = sum(len(d.encode()) for d in embedded_docs)
    assert 1_000_000 < total < 3_500_000
    assert all(len(d) >= 200 for d in embedded_docs)
    assert len(set(embedded_docs)) == len(embedded_docs)
    assert all(d == d.lstrip() for d in embedded_docs)


def test_embedded_corpus_is_deterministic_across_processes(embedded_docs):
    probe = "from pgolf_core import corpus; print(corpus.corpus_sha256(corpus.load_documents('embedded')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == corpus.corpus_sha256(embedded_docs)


def test_building_the_corpus_imports_no_stdlib_module_it_reads():
    probe = ("import sys; before = set(sys.modules); from pgolf_core import corpus; corpus.embedded_documents(); "
             "print(sorted(m for m in set(sys.modules) - before if m in ('antigravity', 'this', 'idlelib', 'turtle', 'tkinter', 'webbrowser')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["  first doc", "second"]) + "\n\n")
    assert corpus.load_documents("jsonl", str(path)) == ["first doc", "second"]
    assert corpus.load_documents("jsonl", str(path), max_documents=1) == ["first doc"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"txt": "a"}\n', "docs.jsonl:2: expected a JSON object with a 'text' field"),
    ('not json\n', "docs.jsonl:1:"), ('{"text": 5}\n', "'text' is int"),
])
def test_bad_jsonl_is_named(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        corpus.load_documents("jsonl", str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        corpus.load_documents("jsonl", str(tmp_path / "missing.jsonl"))
