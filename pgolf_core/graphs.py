"""torch.compile's bookkeeping around a timed loop: how many graphs it has built in this
process, and compiling as a fresh machine would.

The trainer and the evaluator each warm up before their timer starts so that the timed
loop runs graphs that already exist; a graph built inside the loop (a guard the warm-up
did not cover) costs the loop its compile time, tens of seconds at record scale. Both
compare this count before and after the loop. Evaluation also counts its compile in the
budget, so it compiles inside `cold_compile`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch._dynamo.utils
from torch._inductor.utils import fresh_cache


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (`torch.compiler.reset()`
    does not lower it)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def cold_compile(enabled: bool) -> Iterator[None]:
    """While open, torch.compile starts from nothing, as on a fresh 8xH100 node: dynamo's
    graphs are dropped, Inductor's in-memory caches cleared, and its on-disk ones (FX
    graphs, AOTAutograd, generated code, Triton kernels and their tuning) go to a new
    empty directory, removed on exit (torch's `fresh_cache`, which its own cold-start
    timings use; compile workers take the directory from each job). `evaluate` counts the
    compile in `eval_seconds`, and with the default caches in /tmp a rerun reads the last
    run's graphs from disk: the record model's sliding warm-up at 512 tokens with Inductor
    took 73.3 s cold and 19.7 s on a rerun (2 CPU cores, 2026-12-06), so every `dvc exp
    run` after the first would pass a budget a fresh machine can break, and a diagnostic
    mode would lend the final mode its kernels. Eager runs (`enabled` False) are left as
    they are."""
    if not enabled:
        yield
        return
    torch.compiler.reset()
    with fresh_cache():
        yield
