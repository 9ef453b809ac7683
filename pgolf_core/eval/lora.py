"""Document LoRA test-time training (`ttt_lora`, TECHNIQUES.md 5.4) and phased global
TTT (`ttt_phased`, 5.5).

Documents run from one BOS to the next, that BOS included as the last target (the
first document starts at position 0 when the stream does not open with a BOS), so the
documents' targets partition 1..N-1. They are queued longest first and batched
`lora_batch_docs` at a time; each document of a batch has its own rank-r adapters on
every weight the params name. A document's targets are taken in chunks of
`lora_chunk_tokens`: a chunk is scored in one forward over a window of at most
`seq_len` tokens of the same document ending at the chunk's last target, and only
then, if the document has later chunks, that same loss makes one AdamW step of its
adapters. Adapters and optimizer state are fresh for every batch (with
`lora_warm_start_a`, A carries over and only B restarts at zero: legal, since A was
trained only on scored tokens, but a document's score then depends on the documents
of earlier batches: under torchrun, of that rank's earlier batches, so the scores
depend on the number of processes).

Adapters act on the model's own forward: a `TorchFunctionMode` adds x A^T B^T (alpha/r)
to the output of every `F.linear` call whose weight is an adapted one (x: that call's
input; for the records' side adapters, the input of the block's first projection in the
same pass, `Site`), so every feature of the model's forward (gates, XSA, lanes, looping,
value embeddings, whatever is added later) is present in the TTT forward as it is in
scoring: the 04-23 record lost a gate in its hand-written TTT forward and scored 1.908.
A weight called more than once per forward (a looped layer) gets one adapter per call,
as the records' per-virtual-layer slots. The head is the tied embedding's F.linear.

Ordering and causality: a document's losses depend on the artifact, its own earlier
tokens and, with warm-started A or `ttt_phased`, on documents earlier in the queue.
The queue order reads only the documents' lengths (where the BOS tokens are), as the
records' length-sorted queues do. `ttt_phased` pauses once the count of fully scored
documents reaches each boundary and trains the whole model with SGD on the first
`boundary` documents of the queue (all scored, by every rank: batches are dealt to
ranks by `deal` in segments that end at each phase, so every rank knows which
documents are done without exchanging them, and without warm-started A the result
does not depend on the number of processes), then resumes with fresh adapters.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from pgolf_core import dist
from pgolf_core.eval import budget
from pgolf_core.config import EvaluateConfig
from pgolf_core.eval.sliding import Ledger, ScoreSums, add_scores, stream_tensors
from pgolf_core.eval.ttt import (MIN_LENGTH, MIN_ROWS, Block, ModeResult, SGDTrainer, cosine_lr, span_blocks,
                                 varying_length, varying_rows, without_gradients)

ADAPTER_SEED = 20260410  # adapters' A of batch b are drawn from a generator seeded ADAPTER_SEED + b


def target_weights(model, names) -> dict[str, list[torch.nn.Parameter]]:
    """The weights each plain `evaluate.lora_targets` name adapts (config.LORA_TARGETS;
    the side adapters are `SIDE_SITES`)."""
    table = {
        "q": [b.attn.q.weight for b in model.blocks], "k": [b.attn.k.weight for b in model.blocks],
        "v": [b.attn.v.weight for b in model.blocks], "o": [b.attn.out.weight for b in model.blocks],
        "up": [b.mlp.up.weight for b in model.blocks], "down": [b.mlp.down.weight for b in model.blocks],
        "head": [model.tok_emb.weight],
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"evaluate.lora_targets: unknown {unknown} (valid: {sorted(table)})")
    return {n: table[n] for n in names}


@dataclass(frozen=True, eq=False)
class Site:
    """Where one adapter acts: it reads the input of the F.linear call with `source` and
    adds to the output of the F.linear call with `sink` (the same weight for a plain
    adapter). The records' side adapters (TECHNIQUES 5.4) read a block's input instead:
    the O-side one the attention input (q's, which k and v share) into the attention
    output, the MLP-side one the MLP input (up's) into the MLP output, d to d. `key`
    names the adapter: the sink's id for a plain one, ("side", the sink's id) else."""
    key: object
    source: torch.nn.Parameter
    sink: torch.nn.Parameter


# The records' side adapters, per block: (the weight whose call's input they read, the one
# whose call's output they add to).
SIDE_SITES = {"o_side": lambda b: (b.attn.q.weight, b.attn.out.weight),
              "mlp_side": lambda b: (b.mlp.up.weight, b.mlp.down.weight)}


def target_sites(model, names) -> list[Site]:
    """The adapter sites of `evaluate.lora_targets`, in the order of the names."""
    plain = target_weights(model, [n for n in names if n not in SIDE_SITES])
    sites = []
    for name in names:
        if name in SIDE_SITES:
            for block in model.blocks:
                source, sink = SIDE_SITES[name](block)
                sites.append(Site(("side", id(sink)), source, sink))
        else:
            sites += [Site(id(w), w, w) for w in plain[name]]
    return sites


def _linear_weight(args, kwargs):
    return args[1] if len(args) > 1 else kwargs.get("weight")


class _CountLinearCalls(TorchFunctionMode):
    def __init__(self, keys):
        super().__init__()
        self.calls = dict.fromkeys(keys, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and id(_linear_weight(args, kwargs)) in self.calls:
            self.calls[id(_linear_weight(args, kwargs))] += 1
        return func(*args, **kwargs)


def count_slots(model, weights: list[torch.nn.Parameter], device) -> dict[int, int]:
    """How many times one forward calls F.linear with each weight (looped layers: once
    per pass). Fails, naming the weight, when the forward never does: its adapter would
    be silently absent."""
    counter = _CountLinearCalls([id(w) for w in weights])
    with torch.no_grad(), counter:  # forward() itself: a compiled model (evaluate.compile) builds no graph to count
        model.forward(torch.zeros(1, 2, dtype=torch.long, device=device))
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names.get(k, "?") for k, n in counter.calls.items() if n == 0]
    if missing:
        raise ValueError(f"the model's forward never calls F.linear with {missing}: cannot adapt them")
    return counter.calls


def _keys_at(entries: list, weight) -> list | None:
    """The adapter keys of `weight`'s entry in `entries` ((weight, keys) pairs), found
    by identity; None when it has none."""
    for known, keys in entries:
        if weight is known:
            return keys
    return None


def _keys_of(entries: list, weight: torch.nn.Parameter) -> list:
    """`weight`'s key list in `entries`, a new entry if it has none."""
    keys = _keys_at(entries, weight)
    if keys is None:
        keys = []
        entries.append((weight, keys))
    return keys


class LoraMode(TorchFunctionMode):
    """Adds each document's adapter output to every adapted F.linear of the forward.
    `adapters[key] = (A, B)`, A (docs, slots, r, in), B (docs, slots, out, r): batch row i
    is document i. Documents lead, so the first n of them are a contiguous slice whose
    strides do not depend on n (torch.compile guards strides). `sites` (`Site`) say which
    call's input each adapter reads and which call's output it adds to; a side adapter's
    input is held from its source call to its sink call (q before out, up before down, in
    every pass)."""

    def __init__(self, adapters: dict, scale: float, sites: list[Site] = ()):
        super().__init__()
        self.adapters, self.scale = adapters, scale
        self.active = adapters
        self.calls = dict.fromkeys(adapters, 0)
        # (weight, the adapter keys of its calls), found in __torch_function__ by identity
        # (`is`), never by id(): torch 2.11's dynamo (the GPU machine's) cannot take the
        # id() of a tensor the forward computes (the attention gate's cast weight), which
        # broke the compiled graph there and rebuilt its pieces inside the timed loop
        self.sinks: list[tuple[torch.nn.Parameter, list]] = []
        self.sources: list[tuple[torch.nn.Parameter, list]] = []
        for site in sites:
            if site.key in adapters:
                _keys_of(self.sinks, site.sink).append(site.key)
                if site.source is not site.sink:
                    _keys_of(self.sources, site.source).append(site.key)
        self.side_keys = {key for _, keys in self.sources for key in keys}
        self.held: dict = {}

    def restart(self, rows: int | None = None, first: int = 0) -> None:
        """Before each forward: its batch rows are documents first..first+rows-1 (all
        when `rows` is None), and the per-weight call counters that pick the slot start
        again. The adapters are sliced, not copied; a document outside gets a zero
        gradient."""
        if rows is None:
            self.active = self.adapters
        else:
            self.active = {key: (varying_rows(a[first : first + rows]), varying_rows(b[first : first + rows]))
                           for key, (a, b) in self.adapters.items()}
        self.calls = dict.fromkeys(self.adapters, 0)
        self.held = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.linear:
            return out
        weight = _linear_weight(args, kwargs)
        for key in _keys_at(self.sources, weight) or ():
            self.held[key] = args[0]
        for key in _keys_at(self.sinks, weight) or ():
            A, B = self.active[key]
            slot = self.calls[key]
            if slot >= A.size(1):
                raise RuntimeError(f"a forward called an adapted weight {slot + 1} times; it has {A.size(1)} slots")
            self.calls[key] = slot + 1
            x = self.held.pop(key) if key in self.side_keys else args[0]
            a, b = A[:, slot], B[:, slot]
            out = out + self.scale * ((x @ a.transpose(-1, -2)) @ b.transpose(-1, -2))
        return out


def documents(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) per document: tokens start..end, targets start+1..end (see module doc)."""
    n = len(tokens)
    starts = sorted({0} | {int(i) for i in np.flatnonzero(np.asarray(tokens) == bos_id) if 0 < i < n - 1})
    return list(zip(starts, starts[1:] + [n - 1]))


def queue_order(docs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Longest first (ties in stream order), as the records' queues."""
    return sorted(docs, key=lambda d: (-(d[1] - d[0]), d[0]))


class DocumentLora:
    """The adapters of one batch of documents and their optimizer, at the sites named by
    `cfg.lora_targets`; `fresh(batch_index, num_docs)` starts a batch."""

    def __init__(self, model, cfg: EvaluateConfig, device):
        self.model, self.cfg, self.device = model, cfg, device
        self.sites = target_sites(model, cfg.lora_targets)
        calls = count_slots(model, list({id(w): w for site in self.sites for w in (site.source, site.sink)}.values()),
                            device)
        self.slots = {site.key: calls[id(site.sink)] for site in self.sites}
        self.dtype = model.tok_emb.weight.dtype
        self.kept_a: dict = {}
        self.mode = LoraMode({}, cfg.lora_alpha / cfg.lora_rank)
        self.opt = None

    def fresh(self, batch_index: int, num_docs: int) -> None:
        """New adapters for a batch: A ~ U(+-1/sqrt(in)) (or the previous batch's A with
        `lora_warm_start_a`), B = 0, and a fresh AdamW."""
        gen = torch.Generator().manual_seed(ADAPTER_SEED + batch_index)
        r, adapters = self.cfg.lora_rank, {}
        for site in self.sites:
            out_dim, in_dim = site.sink.shape[0], site.source.shape[1]
            slots = self.slots[site.key]
            if self.cfg.lora_warm_start_a and site.key in self.kept_a:
                a = self.kept_a[site.key][:num_docs].clone()
            else:
                bound = 1.0 / math.sqrt(in_dim)
                drawn = (torch.rand(slots, num_docs, r, in_dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                # drawn slot-major, stored documents first with every stride its own (a
                # transpose's .contiguous() keeps a size-1 dimension's stride, which a
                # compiled graph would then guard on)
                a = torch.empty(num_docs, slots, r, in_dim, device=self.device, dtype=self.dtype)
                a.copy_(drawn.transpose(0, 1))
            b = torch.zeros(num_docs, slots, out_dim, r, device=self.device, dtype=self.dtype)
            adapters[site.key] = (a.requires_grad_(True), b.requires_grad_(True))
        self.mode = LoraMode(adapters, self.cfg.lora_alpha / r, self.sites)
        params = [t for pair in adapters.values() for t in pair]
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lora_lr, betas=(self.cfg.lora_beta1, self.cfg.lora_beta2),
                                     eps=self.cfg.lora_eps, weight_decay=self.cfg.lora_weight_decay)

    def end_batch(self) -> None:
        if self.cfg.lora_warm_start_a:
            self.kept_a = {k: a.detach() for k, (a, _) in self.mode.adapters.items()}

    def forget(self) -> None:
        """The next batch draws its A afresh even with `lora_warm_start_a` (after a phase)."""
        self.kept_a = {}


def live_rows(chunks: list[int], j: int) -> int:
    """How many rows a batch's forward j runs: its documents come longest first (checked
    once per batch by `score_batch`), so the ones with a chunk j are a prefix; padded with
    empty rows to MIN_ROWS when the batch has that many."""
    return max(sum(c > j for c in chunks), min(MIN_ROWS, len(chunks)))


def row_groups(rows: int, group_rows: int) -> list[tuple[int, int]]:
    """(first, end) of each group of a forward's rows: all at once when `group_rows` is 0
    or not exceeded, else the fewest groups of at most `group_rows`, their sizes within
    one of each other. So with `group_rows` >= 3 (`EvaluateConfig` refuses 1 and 2) and
    at least MIN_ROWS rows, no group has fewer than MIN_ROWS."""
    if not group_rows or rows <= group_rows:
        return [(0, rows)]
    count = math.ceil(rows / group_rows)
    bounds = [round(rows * g / count) for g in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def group_forward(model, lora: DocumentLora, seqs: torch.Tensor, targets: torch.Tensor, select: torch.Tensor,
                  first: int, end: int) -> torch.Tensor:
    """The adapted forward of rows first..end-1 (tokens `seqs`, inputs and last target),
    their NLL at the `select`ed positions: the one call the loop and its warm-up both
    make, so that the warm-up builds exactly the loop's graph (sliced adapters, row count
    and window length marked varying)."""
    lora.mode.restart(end - first, first=first)
    return model(varying_rows(varying_length(seqs[first:end, :-1])), varying_rows(targets[first:end]),
                 select=varying_rows(select[first:end])).float()


def score_batch(model, lora: DocumentLora, batch_index: int, docs: list[tuple[int, int]], stream: torch.Tensor,
                stream_bytes: torch.Tensor, sums: torch.Tensor, *, rows: int, device, autocast_dtype,
                ledger: Ledger | None) -> None:
    """Score-then-step over the chunks of one batch of documents, all in lockstep.

    The batch's adapters have `rows` rows (the batch size; rows past the last document of
    a short batch have no document). Forward j runs only the documents that have a chunk
    j (`live_rows`: a prefix of the batch, as it comes longest first), each on its own
    adapters: a batch of long and short documents would
    otherwise spend most of its forwards on finished rows (measured on the first 198,656
    dev-corpus validation tokens, 117 documents in batches of 64: 12.5x the useful
    token-rows; about 1.13x on 4 M tokens of geometric documents of mean 811). The
    optimizer still steps every row, a finished one with a zero gradient, as when every
    row ran. The window length and the row count vary between forwards (both marked for
    `evaluate.compile`: one graph). With `lora_group_rows` the live rows run in groups,
    each scored and back-propagated before the next, and the step comes after the last:
    a document's adapters see only its own row, so the step is the one all rows at once
    would take, with a group's activations in memory instead of the batch's."""
    cfg = lora.cfg
    K, L = cfg.lora_chunk_tokens, cfg.seq_len
    lora.fresh(batch_index, rows)
    chunks = [math.ceil((e - s) / K) for s, e in docs] + [0] * (rows - len(docs))
    if any(a < b for a, b in zip(chunks, chunks[1:])):
        raise ValueError(f"a batch's documents must come longest first (queue_order); chunks per document: {chunks}")
    model.eval()
    with without_gradients(model.parameters()), lora.mode:  # only the adapters train
        for j in range(max(chunks)):
            n = live_rows(chunks, j)
            spans = []  # (window start, window length, scored targets) per row; (0, 0, 0): an empty row
            for i in range(n):
                if chunks[i] <= j:
                    spans.append((0, 0, 0))
                    continue
                s, e = docs[i]
                a = s + j * K
                end = min(a + K, e)
                w = max(s, end - L)
                spans.append((w, end - w, end - a))
            T = max(MIN_LENGTH, max(length for _, length, _ in spans))
            offsets = torch.arange(T + 1)
            starts = torch.tensor([w for w, _, _ in spans])[:, None]
            lengths = torch.tensor([length for _, length, _ in spans])[:, None]
            counts = torch.tensor([c for _, _, c in spans])[:, None]
            positions = (starts + offsets).clamp(max=len(stream) - 1)
            seqs = torch.where(offsets <= lengths, stream[positions], 0).to(device)  # padded with 0, never the future
            # the row's scored targets are its last `count` (window indices length-count..length-1):
            # K = lora_chunk_tokens slots each, the unused ones pointing at a valid index, unscored
            slot = torch.arange(K)[None, :]
            select = (lengths - counts + slot).clamp(0, T - 1)
            scored = (slot < counts).to(device)
            target_positions = positions[:, 1:].gather(1, select)
            nbytes = stream_bytes[target_positions].to(device)
            select = select.to(device)
            targets = seqs[:, 1:].gather(1, select)
            target_positions = target_positions.to(device)
            trains = [chunks[i] > j + 1 for i in range(n)]  # only documents with a later chunk train on this one
            later = torch.tensor(trains, device=device)
            if any(trains):
                lora.opt.zero_grad(set_to_none=True)
            for a, b in row_groups(n, cfg.lora_group_rows):
                with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    nll = group_forward(model, lora, seqs, targets, select, a, b)
                add_scores(sums, nll, nbytes[a:b], scored[a:b], target_positions[a:b], ledger)
                if any(trains[a:b]):  # each document's mean loss over the chunk it just scored
                    per_doc = (nll * scored[a:b]).sum(1) / scored[a:b].sum(1).clamp(min=1)
                    (per_doc * later[a:b]).sum().backward()
            if any(trains):
                lora.opt.step()
    lora.end_batch()


def warm_up_adapters(model, cfg: EvaluateConfig, device, idx: torch.Tensor) -> None:
    """The adapters' forward and backward as `score_batch` runs them, on the caller's
    (random) `lora_batch_docs` rows of tokens and throwaway adapters: the base weights
    take no gradient and nothing steps. Runs under the caller's autocast."""
    lora = DocumentLora(model, cfg, device)
    lora.fresh(0, idx.size(0))
    with without_gradients(model.parameters()), lora.mode:  # only the adapters train
        rows, K = idx.size(0), cfg.lora_chunk_tokens
        select = (idx.size(1) - 1 - K + torch.arange(K, device=idx.device)).clamp(min=0).repeat(rows, 1)
        targets = idx[:, 1:].gather(1, select)
        for a, b in row_groups(rows, cfg.lora_group_rows):  # slices at an offset too, as the loop's groups
            group_forward(model, lora, idx, targets, select, a, b).mean().backward()


def _batches(queue: list, size: int) -> list[list]:
    return [queue[i : i + size] for i in range(0, len(queue), size)]


def ttt_lora(model, tokens: np.ndarray, byte_counts: np.ndarray, cfg: EvaluateConfig, *, device,
             autocast_dtype: torch.dtype | None = None, ledger: Ledger | None = None,
             progress: bool = False) -> ModeResult:
    """Document LoRA TTT over the whole stream; batches dealt to ranks by `deal`."""
    return _run(model, tokens, byte_counts, cfg, phased=False, device=device, autocast_dtype=autocast_dtype,
                ledger=ledger, progress=progress)


def ttt_phased(model, tokens: np.ndarray, byte_counts: np.ndarray, cfg: EvaluateConfig, *, device,
               autocast_dtype: torch.dtype | None = None, ledger: Ledger | None = None,
               progress: bool = False) -> ModeResult:
    """`ttt_lora` with global SGD phases at `cfg.phase_boundaries` scored documents."""
    return _run(model, tokens, byte_counts, cfg, phased=True, device=device, autocast_dtype=autocast_dtype,
                ledger=ledger, progress=progress)


def phase_blocks(docs: list[tuple[int, int]], seq_len: int, chunk_tokens: int) -> list[list[Block]]:
    """The phase's training data: each document cut into blocks of at most seq_len targets
    (no block crosses a document), grouped in queue order into chunks of about
    `chunk_tokens` targets."""
    chunks, current, size = [], [], 0
    for s, e in docs:
        for block in span_blocks(s, e, seq_len):
            current.append(block)
            size += block.length
            if size >= chunk_tokens:
                chunks.append(current)
                current, size = [], 0
    return chunks + ([current] if current else [])


def forward_positions(docs: list[tuple[int, int]], rows: int, chunk_tokens: int, seq_len: int) -> int:
    """Token positions `score_batch` forwards for one batch (`docs` longest first in `rows`
    rows; a backward, when any row trains, runs over the same positions): per forward j,
    its live rows (`live_rows`) times its window length (the longest live window, at
    least MIN_LENGTH). The batch's work, by which `deal` spreads the batches over ranks."""
    targets = np.array([e - s for s, e in docs])
    chunks = [math.ceil(n / chunk_tokens) for n in targets] + [0] * (rows - len(docs))
    total = 0
    for j in range(max(chunks, default=0)):
        live = targets[: sum(c > j for c in chunks)]  # longest first: the documents with a chunk j lead
        window = min(int(live.max()), (j + 1) * chunk_tokens, seq_len)  # the longest live window
        total += live_rows(chunks, j) * max(MIN_LENGTH, window)
    return total


def deal(costs: list[int], world_size: int, phase_after: set[int]) -> list[list[list[int]]]:
    """The batch indices each rank runs, per segment (`[segment][rank]`, each rank's in
    queue order). A segment ends after each batch of `phase_after` (a phase trains once
    every batch up to it is scored, on every rank: ranks wait for each other there) and
    at the last batch. Within a segment each batch, in queue order, goes to the rank with
    the least work so far (`costs`; ties to the lower rank): longest processing time
    first, as the queue comes longest first, and a batch's rank depends only on the costs
    of the segment's earlier batches. Dealing round-robin instead gave the first rank
    15.7 % more than an even share on 50,000 geometric documents of FineWeb's mean 811
    (the record profile's batches and phases; `deal_balance` 1.157 against 1.059: the
    longest batches always went to the same rank, and the short rounds before each phase
    left the last ranks out); the rest is the 40 heavy batches before the phases. Dealing
    those in row pieces would even it (8 pieces: 1.003; a document's rows are independent
    under AdamW) but runs each piece through all of its batch's forwards, each with its
    fixed launch and optimizer-step cost: 7 x 70 more per heavy batch on average
    (51-185 forwards each), not done."""
    segments: list[list[list[int]]] = []
    current: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for b, cost in enumerate(costs):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        current[rank].append(b)
        loads[rank] += cost
        if b in phase_after or b == len(costs) - 1:
            segments.append(current)
            current, loads = [[] for _ in range(world_size)], [0] * world_size
    return segments


def deal_balance(costs: list[int], world_size: int, phase_after: set[int]) -> float:
    """The loop's work on `world_size` ranks dealt by `deal`, against an even split: the
    slowest rank's work summed over the segments (all wait for it at each phase) over
    the total work / world_size. 1.0 is a perfect split; it scales the 8xH100 projection."""
    total = sum(costs)
    if total == 0:
        return 1.0
    slowest = sum(max(sum(costs[b] for b in mine) for mine in segment)
                  for segment in deal(costs, world_size, phase_after))
    return slowest * world_size / total


def batch_plan(queue: list[tuple[int, int]], cfg: EvaluateConfig, phased: bool):
    """The document loop's plan over `queue`: its batches, each batch's work
    (`forward_positions`), the phase boundaries that fall inside the queue and the
    batches after which their phases train: what `deal` and `deal_balance` read."""
    size = cfg.lora_batch_docs
    batches = _batches(queue, size)
    rows = len(batches[0]) if batches else 0
    costs = [forward_positions(batch, rows, cfg.lora_chunk_tokens, cfg.seq_len) for batch in batches]
    boundaries = [b for b in cfg.phase_boundaries if b < len(queue)] if phased else []
    return batches, costs, boundaries, {math.ceil(b / size) - 1 for b in boundaries}


def phase_stance(cfg: EvaluateConfig):
    """How a phase's SGD passes run: in the compiled model's graphs, or eager when
    `evaluate.compile_phases` is off (torch.compile's force_eager stance: the compiled
    model runs its Python forward, builds no graph, and the adapters' graph is untouched
    after it)."""
    return contextlib.nullcontext() if cfg.compile_phases else torch.compiler.set_stance("force_eager")


def _run(model, tokens, byte_counts, cfg: EvaluateConfig, *, phased: bool, device, autocast_dtype, ledger,
         progress) -> ModeResult:
    rank, world = dist.rank(), dist.world_size()
    stream, stream_bytes = stream_tensors(tokens, byte_counts)
    queue = queue_order(documents(tokens, model.cfg.bos_id))
    batches, costs, boundaries, phase_after = batch_plan(queue, cfg, phased)
    lora = DocumentLora(model, cfg, device)
    trainer = None
    if phased:
        trainer = SGDTrainer(model, momentum=cfg.ttt_momentum, grad_clip=cfg.ttt_grad_clip,
                             freeze_blocks=cfg.ttt_freeze_blocks, batch_seqs=cfg.ttt_batch_seqs, device=device,
                             autocast_dtype=autocast_dtype, rank=rank, world_size=world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    rows = len(batches[0]) if batches else 0
    segments = deal(costs, world, phase_after)
    bar = tqdm(total=sum(len(segment[rank]) for segment in segments), desc="ttt_phased" if phased else "ttt_lora",
               disable=not progress, unit="batch")
    for s, segment in enumerate(segments):
        for b in segment[rank]:
            score_batch(model, lora, b, batches[b], stream, stream_bytes, sums, rows=rows, device=device,
                        autocast_dtype=autocast_dtype, ledger=ledger)
            bar.update()
        scored_docs = min(len(queue), (max(b for mine in segment for b in mine) + 1) * cfg.lora_batch_docs)
        while boundaries and boundaries[0] <= scored_docs and s < len(segments) - 1:
            chunks = phase_blocks(queue[: boundaries.pop(0)], cfg.seq_len, cfg.ttt_chunk_tokens)
            # each phase as the records run it: a fresh SGD, and fresh LoRAs after it (a
            # warm-started A does not cross a phase; TECHNIQUES §5.5)
            trainer.reset_momentum()
            lora.forget()
            with phase_stance(cfg):
                for c, chunk in enumerate(chunks):  # cosine over the phase, never down to 0: every chunk trains
                    trainer.train(stream, chunk, lr=cosine_lr(cfg.phase_lr, c, len(chunks) + 1),
                                  epochs=cfg.phase_epochs)
    bar.close()
    if trainer is not None:
        trainer.restore()
    total = ScoreSums.from_tensor(dist.all_reduce_sum(sums).cpu())
    balance = deal_balance(costs, budget.CHALLENGE_GPUS, phase_after) / deal_balance(costs, world, phase_after)
    return ModeResult(total, (trainer.syncs if trainer else 0) + 1, balance)
