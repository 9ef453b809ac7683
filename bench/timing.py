"""Timing shared by the benchmarks: the median of many calls, by CUDA events on a GPU
and by the host clock on a CPU (their smoke runs); and the two parts of a call's time,
the host's (queueing kernels) and the device's (running them), which say whether
launches, not kernels, set a GPU call's time when it runs alone."""

from __future__ import annotations

import time

import torch


def median_ms(fn, repeats: int = 20, device: torch.device = torch.device("cuda")) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, each timed by CUDA events, or by
    the host clock when `device` is a CPU (warm up before calling this: compilation and
    first-touch stay out)."""
    if device.type == "cpu":
        return host_ms(fn, repeats, device)
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


def kernel_ms(fn, repeats: int = 20, device: torch.device = torch.device("cuda")) -> float:
    """Milliseconds per call of `fn()` spent inside kernels, by the profiler: what the call
    costs a GPU whose queue the host keeps full, as in a training step, however long its
    launches take. On a CPU, the operators' own time (Python between them left out)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    if on_gpu:  # kernel events carry the device time (as the profiler's own table sums it)
        total_us = sum(e.self_device_time_total for e in prof.events()
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    else:
        total_us = sum(e.self_cpu_time_total for e in prof.events())
    return total_us / repeats / 1000
