"""How many graphs torch.compile has built in this process.

The trainer and the evaluator each warm up before their timer starts so that the timed
loop runs graphs that already exist; a graph built inside the loop (a guard the warm-up
did not cover) costs the loop its compile time, tens of seconds at record scale. Both
compare this count before and after the loop.
"""

from __future__ import annotations

import torch
import torch._dynamo.utils


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (`torch.compiler.reset()`
    does not lower it)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
