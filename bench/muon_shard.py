"""Benchmark: a profile's Muon step, whole, against one process's share of it under
`torchrun --nproc_per_node=W` with `train.optimizer.muon_shard` (W = 8 by default).

One GPU cannot run the all-gather, so each process's share is timed alone: `pgolf_core.dist`
is told it is rank r of W and its all-gather becomes a copy of the block into its own
slot. The critical path of a sharded step is the largest share plus the all-gather of the
blocks (bf16 on the GPU), whose bytes per process are reported, not timed. Each matrix's
update, taken from the rank that owns it, is checked against the whole step's. Gradients are
random (the step's cost does not depend on their values); the momentum buffers exist
before timing, as after the first training step.

Three times per step. `ms_*` (CUDA events) is a step run alone, from an idle GPU.
`host_ms_*` is the host's time to queue its kernels. `kernel_ms_*` (profiler) is the
device's time inside them, which is what a step costs in training, where the host runs
ahead of the GPU. On 2026-11-24 an H100 ran the whole step in 5.6 ms and a share in as
long, which fits launches, not kernels, setting the time of a step run alone.

    python -m bench.muon_shard --profile profiles/record_8xh100.yaml
    python -m bench.muon_shard --profile profiles/cpu.yaml --device cpu --repeats 2   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from unittest import mock

import torch

from bench.header import RESULTS, header
from bench.timing import host_ms, kernel_ms, median_ms
from pgolf_core import config, dist
from pgolf_core.model import GPT
from pgolf_core.optim import Muon, newton_schulz_batches, param_groups, shard_block_size


class Finished:
    def wait(self) -> None:
        pass


@contextlib.contextmanager
def as_rank(rank: int, world: int, received: list[int]):
    """Make the optimizer see itself as `rank` of `world`; its all-gather copies the block
    into the rank's slot and records the bytes the real one would bring from the others."""
    def gather(output, block):
        output[rank * len(block) : (rank + 1) * len(block)].copy_(block)
        received.append((world - 1) * block.numel() * block.element_size())
        return Finished()
    with mock.patch.object(dist, "world_size", lambda: world), mock.patch.object(dist, "rank", lambda: rank), \
            mock.patch.object(dist, "all_gather_async", gather):
        yield


def owners(shapes: list[torch.Size], world: int) -> list[int]:
    """The rank that orthogonalizes each matrix under `train.optimizer.muon_shard`."""
    owner = [0] * len(shapes)
    for parts in newton_schulz_batches(shapes).values():
        order = [i for _, members in parts for i in members]
        for k, i in enumerate(order):
            owner[i] = k // shard_block_size(len(order), world)
    return owner


def sharded_error(matrices, make_muon, world: int) -> float:
    """Largest relative difference between one step's update of each matrix computed by
    the rank that owns it and by the whole optimizer, from the same weights and gradients."""
    def updates(rank: int | None) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
        for q, p in zip(params, matrices):
            q.grad = p.grad.clone()
        with as_rank(rank, world, []) if rank is not None else contextlib.nullcontext():
            make_muon(params, rank is not None).step()
        return [p.detach() - q.detach() for q, p in zip(params, matrices)]
    whole, owner = updates(None), owners([p.shape for p in matrices], world)
    by_rank = [updates(rank) for rank in range(world)]
    return max(float((by_rank[owner[i]][i] - u).norm() / u.norm()) for i, u in enumerate(whole))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--world", type=int, default=8, help="processes the step is sharded over")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "muon_shard.json"),
                        help="where a GPU run writes its JSON")
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    cfg = config.build_section("train", overrides.get("train", {}))
    vocab = config.build_section("tokenize", overrides.get("tokenize", {})).vocab_size
    device = torch.device(args.device)
    ns_dtype = dist.autocast_dtype(device) or torch.float32  # as the trainer: bf16 iterations on a GPU
    torch.manual_seed(0)
    matrices = param_groups(GPT(cfg.model.with_vocab(vocab)).to(device))["matrices"]
    for p in matrices:
        p.grad = torch.randn_like(p)

    def make_muon(params, shard: bool) -> Muon:
        return Muon(params, lr=cfg.optimizer.matrix_lr, momentum=cfg.optimizer.muon_momentum, weight_decay=cfg.optimizer.weight_decay,
                    ns_steps=cfg.optimizer.ns_steps, ns_dtype=ns_dtype, ns_coefficients=cfg.optimizer.ns_coefficients,
                    row_normalize=cfg.optimizer.muon_row_normalize, shard=shard)

    def muon(shard: bool) -> Muon:
        opt = make_muon(matrices, shard)
        opt.step()  # momentum buffers, first-call work
        return opt

    def timed(opt: Muon) -> tuple[float, float, float]:
        """A step's time run alone, its host's queueing time, and its kernels' time (ms)."""
        return tuple(time_fn(opt.step, args.repeats, device) for time_fn in (median_ms, host_ms, kernel_ms))

    error = sharded_error(matrices, make_muon, args.world)
    ms_whole, host_whole, kernel_whole = timed(muon(shard=False))
    sharded, received = muon(shard=True), []
    by_rank = []  # (ms, host_ms, kernel_ms) per rank
    for rank in range(args.world):
        with as_rank(rank, args.world, received):
            received.clear()
            sharded.step()  # warm
            bytes_in = sum(received)  # one step's; the same on every rank (the blocks are padded to one size)
            by_rank.append(timed(sharded))
    ms_rank, host_rank, kernel_rank = (list(times) for times in zip(*by_rank))
    result = {
        **header(device.type),
        "world": args.world,
        "ms_whole": round(ms_whole, 3),
        "ms_share_per_rank": [round(ms, 3) for ms in ms_rank],
        "ms_share_max": round(max(ms_rank), 3),
        "saved_ms_before_gather": round(ms_whole - max(ms_rank), 3),
        # the host's time to queue the step's kernels: near ms_whole means launch-bound alone
        "host_ms_whole": round(host_whole, 3),
        "host_ms_share_max": round(max(host_rank), 3),
        # the device's time in the step's kernels: what it costs a training step, whose
        # host runs ahead; the sharded path pays when whole - share_max beats the gather
        "kernel_ms_whole": round(kernel_whole, 3),
        "kernel_ms_share_max": round(max(kernel_rank), 3),
        "kernel_ms_saved_before_gather": round(kernel_whole - max(kernel_rank), 3),
        "rel_error_sharded_vs_whole": float(f"{error:.2e}"),
        "gather_bytes_received_per_process": bytes_in,
        "batches": {f"{small}x{big}": sum(len(members) for _, members in parts)
                    for (small, big), parts in newton_schulz_batches([p.shape for p in matrices]).items()},
        "ns_dtype": str(ns_dtype).removeprefix("torch."),
        "config": {"profile": args.profile, "ns_steps": cfg.optimizer.ns_steps, "ns_coefficients": cfg.optimizer.ns_coefficients,
                   "muon_row_normalize": cfg.optimizer.muon_row_normalize, "num_matrices": len(matrices),
                   "matrix_params": sum(p.numel() for p in matrices), "torch": torch.__version__},
    }
    print(json.dumps(result))
    if device.type == "cuda":
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
