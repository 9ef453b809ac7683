"""Document sources for `tokenize`: the embedded stdlib corpus and local JSONL files.

The embedded corpus needs no network and no files in the repo: English text present
on every Python installation, namely `pydoc_data.topics` and the docstrings of the
standard library's modules, classes and functions (one document each, at least
`min_chars` characters, deduplicated). Sources are read with `ast` only: importing
stdlib modules can print, open a browser or start threads. The document order is a
fixed shuffle (like FineWeb's shuffled doc list), so the first N documents form an
unbiased validation split. It varies a little with the Python version, which is
why `tokenize` records `python_version` and `corpus_sha256`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SHUFFLE_SEED = 20240520
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@functools.lru_cache(maxsize=2)
def embedded_documents(min_chars: int = 200) -> tuple[str, ...]:
    """The stdlib corpus: pydoc topics + docstrings, deduplicated, in a fixed shuffled order.
    Cached: `tokenize` reads its source twice (tokenizer sample, then the export)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [text for text in _pydoc_topics(stdlib) if len(text) >= min_chars]
    for path in _stdlib_sources(stdlib):
        docs.extend(d for d in _docstrings(path) if len(d) >= min_chars)
    unique = sorted(set(d.strip() for d in docs))
    random.Random(SHUFFLE_SEED).shuffle(unique)
    return tuple(unique)


def iter_jsonl_documents(path: str | Path) -> Iterator[str]:
    """Stream the texts of a JSONL file of `{"text": ...}` objects, one line at a time.

    Memory stays bounded by the longest line, so the 45 GB FineWeb docs cache can be read
    in full. Blank lines are skipped; a bad line raises `ValueError` naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL documents file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field ({e})") from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: 'text' is {type(text).__name__}, expected a string")
            yield text


def corpus_sha256(docs: list[str]) -> str:
    """Identity of a document list (order included)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    return h.hexdigest()


def _stdlib_sources(stdlib: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return found


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a few stdlib files are templates or use another encoding
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


def _pydoc_topics(stdlib: Path) -> list[str]:
    """Values of the `topics` dict literal in pydoc_data/topics.py, read with ast."""
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k] for k in sorted(topics)]
    return []



def iter_documents(source: str, jsonl_path: str = "", min_chars: int = 200, max_documents: int = 0,
                   as_is: bool = False) -> Iterator[str]:
    """Documents of the configured source, streamed, leading whitespace dropped, empty
    ones skipped, at most `max_documents` (0 = all); with `as_is`, every text as it is.

    Leading whitespace goes because the byte rule never charges the space of a piece
    right after BOS; dropping it keeps the byte count equal to the text's length. The
    challenge's documents (the docs cache) are read `as_is`: its export encodes each one
    as it is (TECHNIQUES §1.2), so the validation split is its first 50,000 documents
    exactly, an empty one or one that opens with a space included.
    """
    docs = embedded_documents(min_chars) if source == "embedded" else iter_jsonl_documents(jsonl_path)
    kept = docs if as_is else (d for d in (d.lstrip() for d in docs) if d)
    return itertools.islice(kept, max_documents or None)


def load_documents(source: str, jsonl_path: str = "", min_chars: int = 200, max_documents: int = 0) -> list[str]:
    """`iter_documents` as a list (small corpora and tests)."""
    return list(iter_documents(source, jsonl_path, min_chars, max_documents))
