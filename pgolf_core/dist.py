"""The only module that talks to torch.distributed.

Under `torchrun` it initialises from the environment (NCCL for CUDA tensors, gloo for CPU ones);
without it everything degrades to one process and the collectives are no-ops.
Other modules return sums and let the caller reduce them here.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as td


def backend(device_type: str) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones on GPUs (the loop reduces small CPU
    scalars, the clock and the loss, which NCCL alone refuses); gloo alone on CPUs."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


# How long a collective may wait for the slowest rank. After training, rank 0 alone runs
# GPTQ, packs the artifact (and, with quantize.fit_bytes, searches how much to prune: a
# dozen packs) while the others wait at a barrier; NCCL's default of 10 minutes would
# kill them if that took longer (gloo's default is already 30).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def init(device_type: str) -> None:
    """Join the process group torchrun describes (no-op for a single process)."""
    if "RANK" in os.environ and not td.is_initialized():
        td.init_process_group(backend=backend(device_type), timeout=COLLECTIVE_TIMEOUT)


def shutdown() -> None:
    """Leave the process group together: a rank that tears its group down while another
    is still saving results can abort at exit (seen with gloo: "terminate called without
    an active exception", SIGABRT, after a run that had finished)."""
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def select_device(name: str) -> torch.device:
    """`auto` -> this process's CUDA device when there is one, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The compute precision of forward passes: bf16 autocast on CUDA, plain float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return t


def all_reduce_sum_(tensors: list[torch.Tensor], mean: bool = False) -> None:
    """Sum (or with `mean`, average) `tensors` across processes in place: one collective
    over the concatenation of those of each dtype."""
    if not td.is_initialized():
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        if mean:
            flat /= td.get_world_size()
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_async(output: torch.Tensor, block: torch.Tensor):
    """Start gathering every rank's `block` (the same shape on all) into `output`, in rank
    order along dim 0; returns the handle to `wait()` on. Only under torchrun."""
    gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor  # the new name from torch 2.13
    return gather(output, block, async_op=True)


def barrier() -> None:
    if td.is_initialized():
        td.barrier()
