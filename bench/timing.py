"""Timing shared by the benchmarks: the median of many calls, by CUDA events on a GPU
and by the host clock on a CPU (their smoke runs); and the host's own share of a call,
which says whether launching the kernels, not running them, sets a GPU call's time."""

from __future__ import annotations

import time

import torch


def median_ms(fn, repeats: int = 20, device: torch.device = torch.device("cuda")) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, each timed by CUDA events, or by
    the host clock when `device` is a CPU (warm up before calling this: compilation and
    first-touch stay out)."""
    if device.type == "cpu":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def host_ms(fn, repeats: int = 20, device: torch.device = torch.device("cuda")) -> float:
    """Median milliseconds until `fn()` returns to Python, starting from an idle device
    and not waiting for the kernels it queued. When this is close to `median_ms`, the
    GPU waits on the host's launches (on a CPU the two are the same clock)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]
