"""GPTQ calibration: the input second moments H = XᵀX/n of every quantized linear map.

It runs at the end of the train stage, in the same launch, because it reads training
tokens and so counts inside the challenge's training budget (TECHNIQUES §3.6: the
04-23/04-27 records collected for 3.5-4.7 s after a 599.5 s run and broke the cap).
Each process collects from its own `calib_batches` batches of the training stream after
the trained span (as the records: each rank its own, rank 0's are used); validation
shards are never opened here.

Which input each weight sees (TECHNIQUES §4.1): q, k and v share the normalised attention
input (collected once, stored once, aliased); the output projection sees the gated head
outputs; the MLP's down projection the activated hidden (calibration runs without
autograd, so the fused training kernels are never taken and the hook sees the plain
path); the tied embedding, quantized as the output head, the final-RMSNorm outputs. With
the recurrence on, hooks fire on every pass, so a looped layer's H covers all of them.
Lookup tables (value embeddings) have one-hot inputs and no H: GPTQ rounds them like RTN.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from pgolf_core import dist, io
from pgolf_core.data import TokenStream
from pgolf_core.model import GPT

FORMAT = "pgolf-hessians-1"
HEAD_WEIGHT = "tok_emb.weight"  # the tied embedding, whose Hessian is the output head's


@dataclass
class Calibration:
    """H per weight name (float32, (in, in), mean over rows), how many rows each saw and
    how many times its hook fired; `aliases` maps a weight to the one whose H it shares."""

    hessians: dict[str, torch.Tensor]
    rows: dict[str, int]
    calls: dict[str, int]
    aliases: dict[str, str]
    tokens: int  # calibration tokens this process read
    seconds: float  # wall time of the collection, device synchronised


def hooked_inputs(model: GPT) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """(module whose input is collected, by weight name; aliases weight -> collected weight).
    Every linear map of the model is collected, whatever features built it (k and v alias
    q, which reads the same input), and the head's input for the tied embedding."""
    modules, aliases = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.endswith((".attn.k", ".attn.v")):
            aliases[f"{name}.weight"] = f"{name[:-1]}q.weight"
        else:
            modules[f"{name}.weight"] = module
    modules[HEAD_WEIGHT] = model.head_input
    return modules, aliases


@torch.no_grad()
def collect_hessians(model: GPT, stream: TokenStream, batches: int, seqs: int, seq_len: int,
                     device: torch.device, autocast_dtype: torch.dtype | None) -> Calibration:
    """Run `batches` forward passes of `seqs` x `seq_len` tokens from `stream` (this
    process's share of each global span, as training reads it) and accumulate XᵀX in
    float32 for every hooked input. The model runs as it ended training (looping on)."""
    world, rank = dist.world_size(), dist.rank()
    modules, aliases = hooked_inputs(model)
    sums = {name: None for name in modules}
    rows = dict.fromkeys(modules, 0)
    calls = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if autocast_dtype is not None:
                x = x.to(autocast_dtype)  # what the linear map multiplies under autocast
            if sums[name] is None:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            accumulate_gram(sums[name], x)
            rows[name] += x.shape[0]
            calls[name] += 1
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    _sync(device)
    start = time.perf_counter()
    try:
        span_tokens = world * seqs * seq_len
        for _ in range(batches):
            span = stream.next_batch(span_tokens, rank * seqs * seq_len, (rank + 1) * seqs * seq_len)
            x = torch.as_tensor(span[:-1]).view(seqs, seq_len).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(x)
        hessians = {name: total / rows[name] for name, total in sums.items() if total is not None}
        _sync(device)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    seconds = time.perf_counter() - start
    for alias, source in aliases.items():
        if source in hessians:
            hessians[alias] = hessians[source]
    return Calibration(hessians=hessians, rows=rows, calls=calls, aliases=aliases,
                       tokens=batches * seqs * seq_len, seconds=seconds)


def accumulate_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += xᵀx, summed in float32 whatever x's dtype.

    On CUDA a bf16/fp16 x goes to the tensor cores with a float32 output (cuBLAS
    accumulates in float32, and a product of two bf16 numbers is exact in float32), so
    the sum is the float32 one up to the order of additions. Why: the record's 16 batches
    of 48 x 2,048 tokens took 8.03 s on an H200 with a float32 addmm (TF32 off, as in
    training), and XᵀX is 85 M multiply-adds per token there (17 layer passes of 4.98 M,
    the MLP's 2048² input most of it): 2.7e14 flops, about 4-6 s at float32's
    non-tensor-core rate by that count (estimated, not yet measured: bench/NOTES.md's
    open list). Other devices and float32 inputs take the float32 addmm."""
    with torch.autocast(x.device.type, enabled=False):  # the forward's autocast must not round XᵀX to bf16
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            total += torch.mm(x.t(), x, out_dtype=torch.float32)
        else:
            x = x.float()
            total.addmm_(x.t(), x)


def save_hessians(path: str | Path, calibration: Calibration, metadata: dict | None = None) -> None:
    """Safetensors (no pickle), each shared H stored once with its aliases in the metadata."""
    stored = {name: h.detach().float().cpu().contiguous() for name, h in calibration.hessians.items()
              if name not in calibration.aliases}
    aliases = {a: s for a, s in calibration.aliases.items() if s in stored}
    meta = {"format": FORMAT, "aliases": json.dumps(aliases), "tokens": str(calibration.tokens),
            "rows": json.dumps(calibration.rows), **(metadata or {})}
    io.write_bytes_atomic(path, io.safetensors_bytes(stored, meta))


def load_hessians(path: str | Path) -> dict[str, torch.Tensor]:
    """H by weight name (aliases resolved); errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Hessians not found: {path} (the train stage writes them when "
                                "train.calib_batches > 0)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            hessians = {key: f.get_tensor(key) for key in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, h in hessians.items():
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"{path}: Hessian {name!r} has shape {list(h.shape)}, expected a square matrix")
    for alias, source in json.loads(meta.get("aliases", "{}")).items():
        if source not in hessians:
            raise ValueError(f"{path}: alias {alias!r} points at {source!r}, which is not stored")
        hessians[alias] = hessians[source]
    return hessians


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
