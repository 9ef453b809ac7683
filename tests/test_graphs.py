"""graphs.cold_compile: a compile inside it finds nothing of an earlier one, neither
dynamo's graphs in memory nor Inductor's caches on disk, and leaves nothing behind; so
an evaluation rerun on the same machine times the compile a fresh machine pays."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._dynamo.utils

from pgolf_core.graphs import cold_compile, compiled_graphs


def _sines(t: torch.Tensor) -> torch.Tensor:
    return (t * 2).sin().sum(-1)


def _fx_cache(outcome: str) -> int:
    return int(torch._dynamo.utils.counters["inductor"][f"fxgraph_cache_{outcome}"])


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*")) if root.exists() else []


def test_an_inductor_compile_inside_finds_no_cache_and_leaves_none(tmp_path, monkeypatch):
    """The control first: outside, a rerun of the same compile reads Inductor's on-disk
    graph cache (a hit, the shortcut that made a rerun's warm-up 3.7x shorter). Inside,
    each compile misses, in a directory of its own that is gone afterwards, and the
    shared cache gains nothing."""
    shared = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    x = torch.randn(4, 8)
    expected = torch.sin(x.double() * 2).sum(-1).float()
    for run in range(2):
        torch.compiler.reset()
        hits, misses = _fx_cache("hit"), _fx_cache("miss")
        torch.testing.assert_close(torch.compile(_sines, backend="inductor")(x), expected)
        assert (_fx_cache("hit") - hits, _fx_cache("miss") - misses) == ((0, 1) if run == 0 else (1, 0))
    shared_files = _files(shared)
    assert shared_files  # the control's compile did write its graph there

    dirs = []
    for _ in range(2):
        hits, misses = _fx_cache("hit"), _fx_cache("miss")
        with cold_compile(True):
            dirs.append(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
            assert dirs[-1] != shared and _files(dirs[-1]) == []
            torch.testing.assert_close(torch.compile(_sines, backend="inductor")(x), expected)
            assert _files(dirs[-1])  # compiled into its own directory
        assert (_fx_cache("hit") - hits, _fx_cache("miss") - misses) == (0, 1)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(shared)
    assert dirs[0] != dirs[1] and not dirs[0].exists() and not dirs[1].exists()
    assert _files(shared) == shared_files


def test_dynamos_graphs_are_dropped_only_when_enabled(tmp_path, monkeypatch):
    """A function compiled before is traced again inside an enabled `cold_compile`, and
    reused as it is inside a disabled one (eager evaluation), which changes no setting."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled = torch.compile(_sines, backend="eager")
    x = torch.randn(3, 5)
    compiled(x)
    before = compiled_graphs()
    with cold_compile(False):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
        compiled(x)
    assert compiled_graphs() == before
    with cold_compile(True):
        compiled(x)
    assert compiled_graphs() == before + 1
