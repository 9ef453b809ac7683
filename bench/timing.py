"""GPU timing shared by the benchmarks: CUDA events around each call, median of many."""

from __future__ import annotations

import torch


def median_ms(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, each timed by CUDA events
    (warm up before calling this: compilation and first-touch stay out)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
