"""Score-first test-time training of the full model with SGD (`ttt_sgd`, TECHNIQUES.md 5.3).

The validation targets 1..N-1 are cut into chunks of C targets: chunk c owns targets
(cC, (c+1)C]. Each sliding window (the same windows as the `sliding` mode) belongs to the
chunk holding its first scored target. For each chunk in order: (1) score its windows
with no gradient and add them to the totals, then (2), unless it is the last chunk,
train on the chunk's tokens (inputs tokens[cC : end], targets up to its last target)
for some epochs of SGD with momentum, LR cosine over chunks, gradient clipping.

Why this is causal: a window of chunk c scores targets > cC only, with a model trained
on chunks < c, whose tokens all lie at positions <= cC. Every training target has been
scored before the step that uses it (a window may score a few targets past its chunk's
end; those are scored earlier still). The last chunk is never trained on: nothing is
scored after it. The model trains in float32 from the dequantized artifact and is never
re-quantized (the artifact is what is scored against the 16 MB limit, not this state).

Under torchrun every rank holds the whole stream: a chunk's windows are shared
(windows[rank::world]) and each step's global batch of sequences is shared, the
gradients summed over ranks before clipping, so every rank keeps the same weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch._dynamo
from tqdm import tqdm

from pgolf_core import dist
from pgolf_core.config import EvaluateConfig
from pgolf_core.eval.sliding import Ledger, ScoreSums, Window, plan_windows, score_window_list, stream_tensors


# Windows and blocks of the TTT loops are padded to at least this many positions: below
# it, slices of the length (x[:, 1:], x[:, :-1]) fall to sizes 0 and 1, which torch.compile
# specializes, a graph per tiny length (a rare batch of 2-token documents built one inside
# the timed loop).
MIN_LENGTH = 8


def varying_length(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` (rows, length), its length marked as varying for torch.compile
    (`evaluate.compile`): one graph for every window or block length. Mark every tensor
    of that length a compiled call takes (inputs and targets): one left static pins the
    length to the warm-up's. Eager runs ignore it."""
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    return tokens


# The document LoRA loop forwards only the documents of a batch that have a chunk left,
# padded with empty rows to at least this many: torch.compile specializes a size of 1, so
# a batch's last long document alone would build a graph inside the timed loop.
MIN_ROWS = 2


def varying_rows(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`tensor` with its dimension `dim` (the documents of a batch) marked as varying for
    torch.compile, as `varying_length` marks the length. Eager runs ignore it."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def leading_block_params(model, count: int) -> list[torch.nn.Parameter]:
    """The parameters of the model's first `count` blocks (`evaluate.ttt_freeze_blocks`)."""
    if count > len(model.blocks):
        raise ValueError(f"evaluate.ttt_freeze_blocks={count}: the model has {len(model.blocks)} blocks")
    return [p for block in model.blocks[:count] for p in block.parameters()]


@contextlib.contextmanager
def without_gradients(params):
    """`params` take no gradient inside the block; each gets its own flag back after."""
    flags = [(p, p.requires_grad) for p in params]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class Block:
    """A training sequence: inputs stream[start : start + length], targets one further."""
    start: int
    length: int


@dataclass
class ModeResult:
    """What a mode returns: its sums over all ranks, and for the 8xH100 projection
    (`budget`) how many cross-process synchronisations (gradient all-reduces, phase
    gathers) its loop made and `balance`: the loop's wall time on 8 processes against an
    even split of its work, relative to this run's (the document modes deal whole
    batches of unequal work, `lora.deal_balance`; the window modes split their windows
    evenly: 1.0)."""
    sums: ScoreSums
    syncs: int = 0
    balance: float = 1.0


def num_chunks(num_tokens: int, chunk_tokens: int) -> int:
    return math.ceil((num_tokens - 1) / chunk_tokens)


def windows_by_chunk(windows: list[Window], length: int, num_tokens: int, chunk_tokens: int) -> list[list[Window]]:
    """Group windows by the chunk of their first scored target (target t is in chunk (t-1)//C)."""
    groups: list[list[Window]] = [[] for _ in range(num_chunks(num_tokens, chunk_tokens))]
    for w in windows:
        first = w.start + length - w.num_scored + 1
        groups[(first - 1) // chunk_tokens].append(w)
    return groups


def span_blocks(start: int, end: int, seq_len: int) -> list[Block]:
    """Training blocks whose targets are exactly stream positions start+1..end."""
    return [Block(s, min(seq_len, end - s)) for s in range(start, end, seq_len)]


def cosine_lr(peak: float, index: int, count: int) -> float:
    """0.5 peak (1 + cos(pi i / (n - 1))) for chunk i of n: the peak at the first chunk, 0 at
    the last one (which is never trained on), as the records schedule it."""
    return peak if count <= 1 else 0.5 * peak * (1.0 + math.cos(math.pi * index / (count - 1)))


class SGDTrainer:
    """SGD with momentum over the model's parameters, leading blocks optionally frozen;
    momentum persists across chunks; each phase of `ttt_phased` starts without it
    (`reset_momentum`), as the phased records build their SGD afresh in each phase. Built
    once per evaluation; `restore()` gives the frozen blocks their gradients back."""

    def __init__(self, model, *, momentum: float, grad_clip: float, freeze_blocks: int, batch_seqs: int,
                 device, autocast_dtype: torch.dtype | None, rank: int, world_size: int):
        self.model, self.grad_clip, self.batch_seqs = model, grad_clip, batch_seqs
        self.device, self.autocast_dtype, self.rank, self.world_size = device, autocast_dtype, rank, world_size
        self.frozen = leading_block_params(model, freeze_blocks)
        for p in self.frozen:
            p.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:  # a rank with no sequence in a step still all-reduces (zero) gradients
            p.grad = torch.zeros_like(p)
        self.opt = torch.optim.SGD(self.params, lr=0.0, momentum=momentum)
        self.syncs = 0  # optimizer steps: each all-reduces the gradients when processes share the batch

    def restore(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)

    def reset_momentum(self) -> None:
        """Forget the momentum: the next step starts its buffer from its own gradient."""
        self.opt.state.clear()

    def train(self, stream: torch.Tensor, blocks: list[Block], *, lr: float, epochs: int) -> None:
        """`epochs` passes over `blocks` in global batches of `batch_seqs` (rank r takes
        every world-th block of a batch); loss = mean NLL over the batch's targets."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        for _ in range(epochs):
            for i in range(0, len(blocks), self.batch_seqs):
                batch = blocks[i : i + self.batch_seqs]
                self._step(stream, batch[self.rank :: self.world_size], sum(b.length for b in batch))
        self.model.eval()

    def _step(self, stream: torch.Tensor, mine: list[Block], total_targets: int) -> None:
        self.opt.zero_grad(set_to_none=False)
        if mine:
            # this rank's full share of a batch, a short one filled with empty blocks: only
            # the length varies, one compiled graph (evaluate.compile)
            mine = mine + [Block(0, 0)] * (math.ceil(self.batch_seqs / self.world_size) - len(mine))
            length = max(MIN_LENGTH, max(b.length for b in mine))
            offsets = torch.arange(length + 1)
            lengths = torch.tensor([b.length for b in mine])[:, None]
            positions = (torch.tensor([b.start for b in mine])[:, None] + offsets).clamp(max=len(stream) - 1)
            # a shorter block is padded with token 0, never with the tokens that follow it
            seqs = torch.where(offsets[None, :] <= lengths, stream[positions], 0).to(self.device)
            valid = (offsets[None, 1:] <= lengths).to(self.device)
            inputs, targets = varying_length(seqs[:, :-1]), varying_length(seqs[:, 1:])
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                nll = self.model(inputs, targets)
            (nll.float() * valid).sum().div(total_targets).backward()
        if self.world_size > 1:
            dist.all_reduce_sum_([p.grad for p in self.params])
        self.syncs += 1  # an all-reduce on any number of processes > 1: one process's projection adds them
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()


def ttt_sgd(model, tokens: np.ndarray, byte_counts: np.ndarray, cfg: EvaluateConfig, *, device,
            autocast_dtype: torch.dtype | None = None, ledger: Ledger | None = None,
            progress: bool = False) -> ModeResult:
    """Score-first full-model TTT over the whole stream; returns the sums over all ranks."""
    rank, world = dist.rank(), dist.world_size()
    stream, stream_bytes = stream_tensors(tokens, byte_counts)
    length, windows = plan_windows(len(tokens), cfg.seq_len, cfg.stride)
    groups = windows_by_chunk(windows, length, len(tokens), cfg.ttt_chunk_tokens)
    trainer = SGDTrainer(model, momentum=cfg.ttt_momentum, grad_clip=cfg.ttt_grad_clip,
                         freeze_blocks=cfg.ttt_freeze_blocks, batch_seqs=cfg.ttt_batch_seqs, device=device,
                         autocast_dtype=autocast_dtype, rank=rank, world_size=world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    rows = min(cfg.batch_seqs, math.ceil(len(windows) / world))  # every chunk's batches one shape
    model.eval()
    for c in tqdm(range(len(groups)), desc="ttt_sgd chunks", disable=not progress, unit="chunk"):
        sums += score_window_list(model, stream, stream_bytes, length, groups[c][rank::world],
                                  batch_seqs=cfg.batch_seqs, device=device, autocast_dtype=autocast_dtype,
                                  ledger=ledger, rows=rows, tail=cfg.stride)
        if c < len(groups) - 1:  # the last chunk is never trained on: nothing is scored after it
            end = min((c + 1) * cfg.ttt_chunk_tokens, len(tokens) - 1)
            trainer.train(stream, span_blocks(c * cfg.ttt_chunk_tokens, end, cfg.seq_len),
                          lr=cosine_lr(cfg.ttt_lr, c, len(groups)), epochs=cfg.ttt_epochs)
    trainer.restore()
    total = ScoreSums.from_tensor(dist.all_reduce_sum(sums).cpu())
    return ModeResult(total, trainer.syncs + 1)
