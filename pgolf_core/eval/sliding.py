"""Windowed scoring of a token stream: non-overlapping blocks and sliding windows.

Both are one algorithm. Targets are stream positions 1..N-1 (the first token is never
a target). The first window scores all of its targets; each later window moves its end
forward by `stride` and scores only the targets no earlier window scored, with the
rest of the window as context. stride == window gives non-overlapping blocks; a small
stride gives every scored target at least window - stride tokens of context. All
windows have the same length, min(window, N-1), and every batch of a pass has the same
rows (a short one is filled with windows that score nothing), so a compiled model
(`evaluate.compile`) sees one shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pgolf_core import dist
from pgolf_core.bpb import bits_per_byte
from pgolf_core.loss import token_nll


@dataclass(frozen=True)
class Window:
    start: int  # first input position; inputs are tokens[start : start + length]
    num_scored: int  # the window's last `num_scored` targets are scored here


EMPTY_WINDOW = Window(0, 0)  # fills a short batch: scores nothing


@dataclass
class ScoreSums:
    nll_nats: float = 0.0
    num_bytes: int = 0
    num_targets: int = 0

    def as_tensor(self, device) -> torch.Tensor:
        return torch.tensor([self.nll_nats, self.num_bytes, self.num_targets], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ScoreSums":
        nll, nbytes, ntargets = t.tolist()
        return cls(nll, int(round(nbytes)), int(round(ntargets)))


def plan_windows(num_tokens: int, window: int, stride: int) -> tuple[int, list[Window]]:
    """(window length, windows) covering targets 1..num_tokens-1, each exactly once."""
    if num_tokens < 2:
        raise ValueError(f"a stream of {num_tokens} tokens has no target to score")
    if not 0 < stride <= window:
        raise ValueError(f"stride {stride} must lie in [1, window {window}]")
    length = min(window, num_tokens - 1)
    windows = [Window(0, length)]
    end = length  # last target index scored so far
    while end < num_tokens - 1:
        new_end = min(end + stride, num_tokens - 1)
        windows.append(Window(new_end - length, new_end - end))
        end = new_end
    return length, windows


class Ledger:
    """Per-target record of what an evaluation scored: the NLL of each stream position
    (NaN until scored) and how many times it was scored. Tests read it to prove that
    every target is scored exactly once and that a loss depends only on earlier tokens;
    the modes fill it only when given one (it costs a device-to-host copy per batch)."""

    def __init__(self, num_tokens: int):
        self.nll = np.full(num_tokens, np.nan, dtype=np.float64)
        self.times_scored = np.zeros(num_tokens, dtype=np.int64)

    def add(self, positions: torch.Tensor, nll: torch.Tensor) -> None:
        pos = positions.detach().cpu().numpy().ravel()
        self.nll[pos] = nll.detach().double().cpu().numpy().ravel()
        np.add.at(self.times_scored, pos, 1)


def add_scores(sums: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor, scored: torch.Tensor,
               positions: torch.Tensor, ledger: Ledger | None) -> None:
    """Accumulate the scored entries of a batch into `sums` (nll, bytes, targets; float64)."""
    nll = nll.detach().double()
    sums += torch.stack([nll[scored].sum(), nbytes[scored].sum().double(), scored.sum().double()])
    if ledger is not None:
        ledger.add(positions[scored], nll[scored])


def tail_select(length: int, tail: int, rows: int, device) -> torch.Tensor:
    """`GPT.forward`'s `select` for windows that score only their last `tail` targets."""
    return torch.arange(length - tail, length, device=device).repeat(rows, 1)


@torch.no_grad()
def score_window_list(model, stream: torch.Tensor, stream_bytes: torch.Tensor, length: int, windows: list[Window], *,
                      batch_seqs: int, device, autocast_dtype: torch.dtype | None = None,
                      ledger: Ledger | None = None, progress: bool = False, desc: str = "score",
                      looping: bool | None = None, rows: int | None = None, tail: int = 0) -> torch.Tensor:
    """Score `windows` (all of `length` inputs) of a CPU int64 token stream with no gradient;
    returns the float64 sums (nll, bytes, targets) on `device`. Shared by sliding scoring and
    by test-time training, which scores each chunk's windows before training on it.
    `looping`: the GPT's recurrence, when not as evaluation runs it (validation mid-training).
    `rows`: windows per forward, a short batch filled with empty ones (default: `batch_seqs`,
    or all the windows when fewer). `tail` (the stride, when below the length): a batch
    whose windows score at most that many targets runs the head on its last `tail`
    positions only (`GPT.forward`'s `select`): sliding windows of 2,048 scoring 64 would
    otherwise compute 32x the logits they use. Two shapes in all, this and the whole
    window (the first window, or `tail` 0), so two compiled graphs."""
    rows = rows or max(1, min(batch_seqs, len(windows)))  # a rank whose share is empty scores nothing
    offsets = torch.arange(length + 1)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    batches = range(0, len(windows), rows)
    for i in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        # a short last batch is filled with windows that score nothing: one shape, one compiled graph
        chunk = windows[i : i + rows] + [EMPTY_WINDOW] * max(0, i + rows - len(windows))
        starts = torch.tensor([w.start for w in chunk])
        positions = starts[:, None] + offsets  # (b, length + 1)
        seqs = stream[positions].to(device)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        target_positions = positions[:, 1:]
        width, select = length, None
        if 0 < tail < length and max(w.num_scored for w in chunk) <= tail:
            width, select = tail, tail_select(length, tail, len(chunk), device)
            target_positions, targets = target_positions[:, -tail:], targets[:, -tail:]
        nbytes = stream_bytes[target_positions].to(device)  # bytes of each target
        scored = torch.arange(width, device=device)[None, :] >= torch.tensor(
            [width - w.num_scored for w in chunk], device=device)[:, None]  # (b, width)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs, select=select) if looping is None else model(inputs, looping=looping, select=select)
        add_scores(sums, token_nll(logits, targets), nbytes, scored, target_positions.to(device), ledger)
    model.train(was_training)
    return sums


def stream_tensors(tokens: np.ndarray, byte_counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The token stream and its per-position byte counts as CPU int64 tensors."""
    if len(byte_counts) != len(tokens):
        raise ValueError(f"{len(byte_counts)} byte counts for a stream of {len(tokens)} tokens")
    return (torch.as_tensor(np.asarray(tokens, dtype=np.int64)),
            torch.as_tensor(np.asarray(byte_counts, dtype=np.int64)))


def score_windows(model, tokens: np.ndarray, byte_counts: np.ndarray, *, window: int, stride: int,
                  batch_seqs: int, device, rank: int = 0, world_size: int = 1,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False,
                  ledger: Ledger | None = None, looping: bool | None = None) -> ScoreSums:
    """Sum NLL and bytes over this rank's share of the windows (windows[rank::world_size]).
    `byte_counts[j]` is the byte count of the target at stream position j (`bpb`)."""
    stream, stream_bytes = stream_tensors(tokens, byte_counts)
    length, windows = plan_windows(len(tokens), window, stride)
    sums = score_window_list(model, stream, stream_bytes, length, windows[rank::world_size], batch_seqs=batch_seqs,
                             device=device, autocast_dtype=autocast_dtype, ledger=ledger, progress=progress,
                             desc=f"score w={window} s={stride}", looping=looping, tail=stride)
    return ScoreSums.from_tensor(sums.cpu())


def val_bpb(model, tokens: np.ndarray, byte_counts: np.ndarray, *, window: int, stride: int, batch_seqs: int,
            device, autocast_dtype: torch.dtype | None = None, progress: bool = False,
            ledger: Ledger | None = None, looping: bool | None = None) -> tuple[float, ScoreSums]:
    """Bits per byte over all targets of `tokens`, windows shared across ranks and the sums
    reduced; `looping` as `score_window_list` takes it."""
    sums = score_windows(model, tokens, byte_counts, window=window, stride=stride, batch_seqs=batch_seqs,
                         device=device, rank=dist.rank(), world_size=dist.world_size(),
                         autocast_dtype=autocast_dtype, progress=progress, ledger=ledger, looping=looping)
    total = ScoreSums.from_tensor(dist.all_reduce_sum(sums.as_tensor(device)).cpu())
    return bits_per_byte(total.nll_nats, total.num_bytes), total
