"""Test-time training modes (pgolf_core.eval.ttt, .lora, .run): causality by perturbation,
exact accounting, adapters on the model's own forward against a float64 merged-weight
reference, and the budget. CPU, fp32, tiny models."""

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf_core import data
from pgolf_core.bpb import byte_tables, position_bytes
from pgolf_core.config import LORA_TARGETS, EvaluateConfig
from pgolf_core.eval import budget
from pgolf_core.eval.lora import (DocumentLora, deal, deal_balance, documents, forward_positions, queue_order,
                                 row_groups, score_batch, target_weights)
from pgolf_core.eval import run as eval_run
from pgolf_core.eval.run import evaluate, score_mode
from pgolf_core.eval.sliding import Ledger, stream_tensors
from pgolf_core.eval.ttt import SGDTrainer, cosine_lr, span_blocks, windows_by_chunk
from pgolf_core.eval.sliding import plan_windows
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT
from pgolf_core.graphs import compiled_graphs
from launch import torchrun

CPU = torch.device("cpu")
BOS = 1
ALL_MODES = ("nonoverlap", "sliding", "ttt_sgd", "ttt_lora", "ttt_phased")
STREAM_MODES = ("nonoverlap", "sliding", "ttt_sgd")  # order = stream order
DOC_MODES = ("ttt_lora", "ttt_phased")  # order = the length-sorted document queue

# every model switch on, at tiny sizes (the record profile's features)
RECORD_LIKE = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=4,
                   mlp_activation="leaky_relu2", qk_gain_init=5.0, ln_scale=True, resid_mix=True, unet_skips=True,
                   xsa_last_n=4, smear_gate=True, attn_gate=True, attn_gate_scale=0.5, value_embed_layers=(2, 3),
                   value_embed_dim=16, value_residual=True, num_loops=1, loop_start=1, loop_end=2,
                   parallel_mode="routed", parallel_start=2, bos_id=BOS)

EVAL = EvaluateConfig(modes=list(ALL_MODES), seq_len=24, stride=6, batch_seqs=5, ttt_chunk_tokens=60, ttt_lr=0.05,
                      ttt_epochs=2, ttt_batch_seqs=3, lora_rank=4, lora_alpha=8.0, lora_chunk_tokens=7,
                      lora_batch_docs=3, lora_lr=0.02, lora_weight_decay=0.1, phase_boundaries=[3, 6],
                      phase_lr=0.05, warmup=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: a second thread only adds contention on a shared 2-core machine (30x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model away from its zero-initialised projections, so every branch matters."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _stream(n: int, vocab: int, seed: int) -> np.ndarray:
    """Random tokens with BOS-opened documents of assorted lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, n)
    tokens[np.sort(rng.choice(np.arange(1, n - 1), 9, replace=False))] = BOS
    tokens[0] = BOS
    return tokens


def _bytes(tokens: np.ndarray) -> np.ndarray:
    counts = (np.asarray(tokens) % 3 + (np.asarray(tokens) != BOS)).astype(np.int64)
    counts[0] = 0
    return counts


def _bos_documents(tokens) -> list[tuple[int, int]]:
    """(start, end) per document, recomputed from the BOS positions alone (the stream opens
    with one): targets start+1..end, the next document's BOS the last, the final document
    running to the stream's end."""
    starts = [i for i, t in enumerate(tokens) if t == BOS]
    return list(zip(starts, starts[1:] + [len(tokens) - 1]))


def _ledger(mode: str, tokens: np.ndarray, cfg=EVAL, model_cfg=None) -> tuple[Ledger, object]:
    model = _model(model_cfg or ModelConfig(**RECORD_LIKE))
    ledger = Ledger(len(tokens))
    result = score_mode(mode, model, tokens, _bytes(tokens), cfg, device=CPU, ledger=ledger)
    return ledger, result


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return _stream(300, 64, seed=3)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_target_is_scored_once_and_the_sums_are_the_ledgers(mode, stream):
    ledger, result = _ledger(mode, stream)
    assert ledger.times_scored[0] == 0 and (ledger.times_scored[1:] == 1).all()
    assert result.sums.num_targets == len(stream) - 1
    assert result.sums.num_bytes == int(_bytes(stream)[1:].sum())
    assert result.sums.nll_nats == pytest.approx(ledger.nll[1:].sum(), rel=1e-12)


def _perturb_after(tokens: np.ndarray, positions: np.ndarray, seed: int, keep_bos: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    fresh = rng.integers(0 if not keep_bos else 2, 64, len(positions))
    out[positions] = np.where(fresh == out[positions], (fresh + 1 - 2) % 62 + 2, fresh)
    if keep_bos:
        out[positions[tokens[positions] == BOS]] = BOS  # the document boundaries (the queue's order) stay
    return out


def _stream_cut_points(n: int, chunk: int, rng) -> list[int]:
    ends = [c for c in range(chunk, n - 1, chunk)]
    return sorted({p for c in ends for p in (c - 1, c, c + 1)} | set(rng.integers(2, n - 2, 3).tolist()))


def _queue_positions(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(document, target position) in the order the document modes score them."""
    return [(d, t) for d, (s, e) in enumerate(queue_order(documents(tokens, BOS))) for t in range(s + 1, e + 1)]


@dataclasses.dataclass(frozen=True)
class Cut:
    """A causality check at p: `tokens` is the stream with every position of `perturbed`
    replaced; the losses of `before` (the targets up to p in the mode's order) must not
    move, and some loss of `later` (every target after p in that order) must."""
    p: int
    perturbed: np.ndarray
    before: np.ndarray
    later: np.ndarray
    tokens: np.ndarray


def _cuts(mode: str, tokens: np.ndarray) -> list[Cut]:
    """The cut points every causality test checks for `mode`, in one process or two.

    Stream modes (order = stream order): p at the TTT chunk ends +-1 and at random, every
    token after p perturbed, BOS tokens included. Document modes (order = the length-
    sorted queue, then position): p inside chunks of a document of the first batch, of the
    first document after the first phase (boundary 3, batches of 3: a phase that trained
    on one document too many would have seen its later tokens) and of one later in that
    batch, at its chunk ends +-1 and at
    random; the later targets and the inputs before them are perturbed, except any token
    that is an earlier target, and BOS tokens stay (the queue's order reads them)."""
    n = len(tokens)
    if mode in STREAM_MODES:
        points = _stream_cut_points(n, EVAL.ttt_chunk_tokens, np.random.default_rng(7))[::2]
        return [Cut(p, np.arange(p + 1, n), np.arange(1, p + 1), np.arange(p + 1, n),
                    _perturb_after(tokens, np.arange(p + 1, n), seed=p, keep_bos=False)) for p in points]
    assert mode in DOC_MODES, mode
    order = _queue_positions(tokens)
    docs = queue_order(documents(tokens, BOS))
    rng = np.random.default_rng(11)
    picks = []
    for d in (1, 3, 5):  # in the first batch; first after the first phase (boundary 3, batches of 3); later
        s, e = docs[d]
        k = EVAL.lora_chunk_tokens
        picks += [p for p in (s + k - 1, s + k, s + k + 1, int(rng.integers(s + 1, e + 1))) if s < p <= e]
    picks = list(dict.fromkeys(picks))  # a random pick may repeat a chunk end's
    assert len(picks) >= 5
    cuts = []
    for p in picks:
        index = next(i for i, (_, t) in enumerate(order) if t == p)
        later = np.array([t for _, t in order[index + 1 :]])
        before = np.array([t for _, t in order[: index + 1]])
        # later targets and the inputs before them, but no token an earlier target is
        perturbed = np.setdiff1d(np.concatenate([later - 1, later]), before)
        cuts.append(Cut(p, perturbed, before, later, _perturb_after(tokens, perturbed, seed=p, keep_bos=True)))
    return cuts


def _assert_causal(name: str, cut: Cut, base: np.ndarray, after: np.ndarray) -> None:
    """`base` and `after`: per-position losses of the stream and of `cut.tokens`."""
    moved = cut.before[base[cut.before] != after[cut.before]]  # NaN (never scored) counts as moved
    assert moved.size == 0, f"{name}: p={cut.p}: losses of targets {moved.tolist()} moved"
    assert not np.array_equal(base[cut.later], after[cut.later]), f"{name}: p={cut.p}: no later loss moved"


@pytest.mark.parametrize("mode", STREAM_MODES)
def test_losses_up_to_p_ignore_every_later_token(mode, stream):
    """Perturb every token after p (BOS tokens included): every loss of a target <= p is
    bit-identical, and some later loss moved (the perturbation was seen)."""
    base, _ = _ledger(mode, stream)
    for cut in _cuts(mode, stream):
        _assert_causal(mode, cut, base.nll, _ledger(mode, cut.tokens)[0].nll)


@pytest.mark.parametrize("mode, warm_start_a", [*((m, False) for m in DOC_MODES), ("ttt_lora", True)],
                         ids=[*DOC_MODES, "ttt_lora-warm_start_a"])
def test_document_losses_ignore_every_later_token_of_the_queue(mode, warm_start_a, stream):
    """Order = the length-sorted queue, then position: perturb every non-BOS token after p in
    that order (the rest of p's document and every document later in the queue); every
    loss before p in that order is bit-identical. p inside chunks and at chunk ends +-1.
    Warm-started A (the record profiles') carries state across batches: still only from
    documents earlier in the queue."""
    cfg = dataclasses.replace(EVAL, lora_warm_start_a=warm_start_a)
    base, _ = _ledger(mode, stream, cfg)
    if warm_start_a:  # the carried A changes later batches' scores
        assert not np.array_equal(base.nll, _ledger(mode, stream)[0].nll)
    for cut in _cuts(mode, stream):
        _assert_causal(mode, cut, base.nll, _ledger(mode, cut.tokens, cfg)[0].nll)


def test_ttt_changes_the_scores_after_the_first_chunk_and_document(stream):
    """Non-vacuity: each TTT mode scores its first chunk / the first chunk of every document
    exactly as plain scoring does, and later targets differently (it trained)."""
    sliding, _ = _ledger("sliding", stream)
    sgd, _ = _ledger("ttt_sgd", stream)
    first = EVAL.ttt_chunk_tokens
    assert np.array_equal(sliding.nll[1 : first + 1], sgd.nll[1 : first + 1])
    assert not np.allclose(sliding.nll[first + EVAL.seq_len :], sgd.nll[first + EVAL.seq_len :], rtol=1e-4)
    lora, _ = _ledger("ttt_lora", stream)
    phased, _ = _ledger("ttt_phased", stream)
    assert not np.allclose(lora.nll[1:], phased.nll[1:], rtol=1e-4)  # the phases trained the model
    model = _model(ModelConfig(**RECORD_LIKE))
    for s, e in documents(stream, BOS):  # a document's first chunk: the base model on the document alone
        end = min(s + EVAL.lora_chunk_tokens, e)
        x = torch.as_tensor(stream[s : end + 1])[None]
        with torch.no_grad():
            ref = model(x[:, :-1], x[:, 1:])[0].double().numpy()
        np.testing.assert_allclose(lora.nll[s + 1 : end + 1], ref, rtol=1e-5, atol=1e-6)


def test_the_queue_is_longest_first_and_ties_keep_stream_order():
    docs = [(0, 5), (5, 9), (9, 14), (14, 18), (18, 30)]  # 5, 4, 5, 4 and 12 targets
    assert queue_order(docs) == [(18, 30), (0, 5), (9, 14), (5, 9), (14, 18)]


def test_documents_partition_the_targets():
    for tokens in (np.array([1, 5, 6, 1, 7, 1, 1, 8, 9]), np.array([5, 6, 1, 7, 8, 1]), np.array([4, 5, 6])):
        docs = documents(tokens, BOS)
        targets = [t for s, e in docs for t in range(s + 1, e + 1)]
        assert targets == list(range(1, len(tokens)))
        assert all(tokens[s] == BOS or s == 0 for s, _ in docs)
    assert documents(np.array([1, 5, 6, 1, 7, 1, 1, 8, 9]), BOS) == [(0, 3), (3, 5), (5, 6), (6, 8)]


def test_chunks_own_their_targets_and_the_lr_is_cosine():
    length, windows = plan_windows(101, 16, 4)  # first scored targets 1, 17, 21, ..., 97
    for size in (30, 29):  # 29: the window whose first target is 29 belongs to chunk 0, which owns target 29
        groups = windows_by_chunk(windows, length, 101, size)
        assert len(groups) == 4 and sum(len(g) for g in groups) == len(windows)
        for c, group in enumerate(groups):
            for w in group:
                assert c * size < w.start + length - w.num_scored + 1 <= (c + 1) * size
    blocks = span_blocks(30, 60, 16)
    assert [(b.start, b.length) for b in blocks] == [(30, 16), (46, 14)]
    assert cosine_lr(1.0, 0, 5) == 1.0 and cosine_lr(1.0, 4, 5) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(1.0, 2, 5) == pytest.approx(0.5)


def _lora(model, cfg, docs):
    lora = DocumentLora(model, cfg, CPU)
    lora.fresh(0, docs)
    return lora


def test_lora_with_b_zero_is_the_plain_forward_with_every_switch_on():
    cfg = ModelConfig(**RECORD_LIKE, doc_mask=True)
    model = _model(cfg)
    idx = torch.as_tensor(_stream(40, 64, seed=5)).view(2, 20)
    with torch.no_grad():
        plain = model(idx)
    lora = _lora(model, dataclasses.replace(EVAL, lora_targets=list(LORA_TARGETS)), 2)
    lora.mode.restart()
    with torch.no_grad(), lora.mode:
        adapted = model(idx)
    assert torch.equal(plain, adapted)
    slots = {n: [lora.slots[id(w)] for w in ws] for n, ws in target_weights(model, ["q", "head"]).items()}
    assert slots == {"q": [1, 2, 2, 1], "head": [1]}  # looped layers 1-2 run twice: one adapter per pass


@pytest.mark.parametrize("target, source, sink", [("o_side", "attn.q", "attn.out"), ("mlp_side", "mlp.up", "mlp.down")])
def test_side_adapters_carry_the_block_input_to_its_output_in_every_pass(target, source, sink):
    """The records' O-side / MLP-side adapters (TECHNIQUES 5.4): the output of `sink`
    gains (alpha/r) x A^T B^T, x the input of `source` in the same pass, per document row,
    in float64, in every pass of the looped layers."""
    model = _model(ModelConfig(**RECORD_LIKE)).double()
    lora = _lora(model, dataclasses.replace(EVAL, lora_targets=[target], lora_rank=3, lora_alpha=6.0), 2)
    gen = torch.Generator().manual_seed(10)
    for a, b in lora.mode.adapters.values():
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 0.3)
    seen = {i: {"x": [], "y": []} for i in range(len(model.blocks))}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.get_submodule(source).register_forward_pre_hook(
            lambda m, args, i=i: seen[i]["x"].append(args[0])))
        hooks.append(block.get_submodule(sink).register_forward_hook(
            lambda m, args, out, i=i: seen[i]["y"].append((args[0], out))))
    idx = torch.as_tensor(_stream(30, 64, seed=6)).view(2, 15)
    lora.mode.restart()
    with torch.no_grad(), lora.mode:
        adapted = model(idx)
    for h in hooks:
        h.remove()
    passes = [len(seen[i]["y"]) for i in seen]
    assert passes == [1, 2, 2, 1]  # layers 1-2 looped
    for i, block in enumerate(model.blocks):
        a, b = lora.mode.adapters[("side", id(block.get_submodule(sink).weight))]
        for slot, (x, (inp, out)) in enumerate(zip(seen[i]["x"], seen[i]["y"])):
            plain = F.linear(inp, block.get_submodule(sink).weight)
            side = 2.0 * (x @ a[:, slot].transpose(-1, -2)) @ b[:, slot].transpose(-1, -2)
            torch.testing.assert_close(out, plain + side, rtol=1e-12, atol=1e-12)
            assert side.abs().max() > 1e-3
    assert not torch.allclose(adapted, model(idx), atol=1e-3)


def test_adapters_equal_merged_weights_in_float64():
    """Each document's adapters act as W + (alpha/r) B A on its own row, every pass: checked
    against a separately built float64 model with those weights merged in."""
    cfg = ModelConfig(**{**RECORD_LIKE, "num_loops": 0})
    model = _model(cfg).double()
    ecfg = dataclasses.replace(EVAL, lora_targets=["q", "k", "v", "o", "up", "down"], lora_rank=3, lora_alpha=6.0)
    lora = _lora(model, ecfg, 2)
    gen = torch.Generator().manual_seed(9)
    for a, b in lora.mode.adapters.values():
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 0.3)
    idx = torch.as_tensor(_stream(30, 64, seed=6)).view(2, 15)
    lora.mode.restart()
    with torch.no_grad(), lora.mode:
        adapted = model(idx)
    names = {id(p): n for n, p in model.named_parameters()}
    for row in range(2):
        merged = _model(cfg).double()
        state = merged.state_dict()
        for key, (a, b) in lora.mode.adapters.items():
            state[names[key]] = state[names[key]] + 2.0 * b[row, 0] @ a[row, 0]
        merged.load_state_dict(state)
        with torch.no_grad():
            ref = merged(idx[row : row + 1])
        torch.testing.assert_close(adapted[row : row + 1], ref, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(adapted[row : row + 1], model(idx[row : row + 1]), atol=1e-3)


def test_a_batch_forwards_only_its_unfinished_documents_and_each_as_if_alone():
    """Documents of 40, 20 and 9 targets in chunks of 7 (6, 3 and 2 chunks): the forwards
    run 3, 3, 2 rows, then the longest document alone padded to 2 rows. In float64 the
    longest document's losses are those of a batch where it is the only document (same
    adapters: the same batch index and row count), so neither the other rows nor the
    padding reach it."""
    tokens = np.random.default_rng(7).integers(BOS + 1, 64, 70)
    tokens[[0, 40, 60]] = BOS
    docs = queue_order(documents(tokens, BOS))
    assert [e - s for s, e in docs] == [40, 20, 9]
    stream_t, bytes_t = stream_tensors(tokens, _bytes(tokens))
    cfg = dataclasses.replace(EVAL, lora_warm_start_a=False)
    rows_seen, ledgers = [], []
    for batch in (docs, docs[:1]):
        model = _model(ModelConfig(**RECORD_LIKE)).double()
        model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].size(0)))
        ledgers.append(Ledger(len(tokens)))
        score_batch(model, DocumentLora(model, cfg, CPU), 0, batch, stream_t, bytes_t,
                    torch.zeros(3, dtype=torch.float64), rows=3, device=CPU, autocast_dtype=None, ledger=ledgers[-1])
    assert rows_seen == [3, 3, 2, 2, 2, 2] + [2] * 6
    longest = slice(1, 41)
    assert (ledgers[0].times_scored[1:] == 1).all()
    np.testing.assert_allclose(ledgers[0].nll[longest], ledgers[1].nll[longest], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="longest first"):
        score_batch(model, DocumentLora(model, cfg, CPU), 0, docs[::-1], stream_t, bytes_t,
                    torch.zeros(3, dtype=torch.float64), rows=3, device=CPU, autocast_dtype=None, ledger=None)


@pytest.mark.parametrize("mode", DOC_MODES)
def test_without_learning_each_chunk_is_scored_on_the_last_seq_len_tokens_of_its_document(mode):
    """With both learning rates 0, B stays 0 and the weights stay put, so every target's
    loss is the plain model's on its chunk's window: the inputs of its own document, at
    most `seq_len` of them, ending at the chunk's last target. Recomputed here window by
    window in float64, documents found from the BOS tokens; documents of 61 and 38
    targets with windows of 24 make most windows start inside their document."""
    tokens = np.random.default_rng(12).integers(BOS + 1, 64, 140)
    tokens[[0, 61, 99, 120]] = BOS
    cfg = dataclasses.replace(EVAL, lora_lr=0.0, phase_lr=0.0, phase_boundaries=[2])
    ledger = Ledger(len(tokens))
    score_mode(mode, _model(ModelConfig(**RECORD_LIKE)).double(), tokens, _bytes(tokens), cfg, device=CPU,
               ledger=ledger)
    plain = _model(ModelConfig(**RECORD_LIKE)).double()
    K, L = cfg.lora_chunk_tokens, cfg.seq_len
    expected = np.full(len(tokens), np.nan)
    for s, e in _bos_documents(tokens):
        for first in range(s, e, K):
            end = min(first + K, e)
            w = max(s, end - L)
            window = torch.as_tensor(tokens[w : end + 1])
            with torch.no_grad():
                logp = torch.log_softmax(plain(window[None, :-1])[0].double(), dim=-1)
            nll = -logp[torch.arange(end - w), window[1:]]
            expected[first + 1 : end + 1] = nll[first - w :].numpy()
    assert (ledger.times_scored[1:] == 1).all()
    np.testing.assert_allclose(ledger.nll[1:], expected[1:], rtol=2e-6, atol=0)


def test_a_documents_last_chunk_is_scored_and_never_stepped_on():
    """The step after a chunk is for the document's later chunks: a batch whose documents
    all fit one chunk takes no optimizer step at all, and one with a document of two
    chunks takes exactly one (with warm-started A a step after the last chunk would still
    reach the next batch)."""
    cfg = dataclasses.replace(EVAL, lora_chunk_tokens=7, lora_warm_start_a=True)
    for bos, steps in (([0, 7, 14], 0), ([0, 12, 17], 1)):  # targets 7, 7, 5 / 12, 5, 2
        tokens = np.random.default_rng(4).integers(BOS + 1, 64, 20)
        tokens[bos] = BOS
        docs = queue_order(documents(tokens, BOS))
        stream_t, bytes_t = stream_tensors(tokens, _bytes(tokens))
        model = _model(ModelConfig(**RECORD_LIKE))
        lora = DocumentLora(model, cfg, CPU)
        score_batch(model, lora, 0, docs, stream_t, bytes_t, torch.zeros(3, dtype=torch.float64), rows=3,
                    device=CPU, autocast_dtype=None, ledger=None)
        taken = {int(state["step"]) for state in lora.opt.state.values()}
        assert taken == (set() if steps == 0 else {steps}), bos


@pytest.mark.parametrize("warm_start_a", [True, False])
def test_warm_started_a_is_the_previous_batchs_trained_a(warm_start_a):
    """`lora_warm_start_a`: a batch starts from the A the previous batch ended with (B
    at zero); without it every batch draws its own A."""
    model = _model(ModelConfig(**RECORD_LIKE))
    cfg = dataclasses.replace(EVAL, lora_warm_start_a=warm_start_a)
    lora = _lora(model, cfg, 3)
    with torch.no_grad():
        for a, b in lora.mode.adapters.values():  # as if trained
            a.add_(0.25)
            b.add_(0.5)
    trained = {key: a.detach().clone() for key, (a, _) in lora.mode.adapters.items()}
    lora.end_batch()
    lora.fresh(1, 3)
    for key, (a, b) in lora.mode.adapters.items():
        assert torch.equal(a, trained[key]) == warm_start_a, key
        assert not b.any() and a.requires_grad and b.requires_grad


def test_a_forgotten_warm_start_draws_a_afresh_and_a_reset_sgd_starts_without_momentum():
    """After a phase: `forget` makes the next batch draw its A as a first batch would, and
    `reset_momentum` makes the next SGD step a first step (buffer = its gradient)."""
    model = _model(ModelConfig(**RECORD_LIKE))
    cfg = dataclasses.replace(EVAL, lora_warm_start_a=True)
    first = _lora(model, cfg, 3)
    drawn = {key: a.detach().clone() for key, (a, _) in first.mode.adapters.items()}
    with torch.no_grad():
        for a, _ in first.mode.adapters.values():  # as if trained
            a.add_(0.25)
    first.end_batch()
    first.forget()
    first.fresh(0, 3)  # batch 0's seed: the same draw as the first batch's
    for key, (a, _) in first.mode.adapters.items():
        assert torch.equal(a.detach(), drawn[key]), key
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    trainer = SGDTrainer.__new__(SGDTrainer)
    trainer.opt = torch.optim.SGD([p], lr=1.0, momentum=0.9)
    for _ in range(2):
        p.grad = torch.ones(3, dtype=torch.float64)
        trainer.opt.step()
    trainer.reset_momentum()
    before = p.detach().clone()
    p.grad = torch.ones(3, dtype=torch.float64)
    trainer.opt.step()
    assert torch.equal(before - p.detach(), torch.ones(3, dtype=torch.float64))  # lr x g: no momentum left


def test_sgd_steps_are_plain_momentum_sgd_on_the_batch_mean_with_clipping_and_frozen_blocks():
    """SGDTrainer against a plain float64 loop written here: each global batch of
    `batch_seqs` blocks (of unequal lengths; the trainer pads them) gives the mean NLL
    over the batch's targets; the gradient's norm is clipped to `grad_clip` (small here,
    so every step clips); then v <- m v + g, p <- p - lr v; the first block's
    parameters never move and take gradients again after `restore`."""
    cfg = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                      bos_id=BOS)
    model, ref = _model(cfg).double(), _model(cfg).double()
    tokens = torch.as_tensor(_stream(120, 64, seed=5))
    blocks = span_blocks(0, 50, 16) + span_blocks(60, 119, 16)  # 16, 16, 16, 2, 16, 16, 16, 11 targets
    lr, momentum, clip, epochs, batch = 0.1, 0.9, 0.05, 2, 3
    trainer = SGDTrainer(model, momentum=momentum, grad_clip=clip, freeze_blocks=1, batch_seqs=batch, device=CPU,
                         autocast_dtype=None, rank=0, world_size=1)
    trainer.train(tokens, blocks, lr=lr, epochs=epochs)
    trainer.restore()

    frozen = {id(p) for p in ref.blocks[0].parameters()}
    params = [p for p in ref.parameters() if id(p) not in frozen]
    velocity, clipped = [None] * len(params), []
    ref.train()
    for _ in range(epochs):
        for i in range(0, len(blocks), batch):
            loss = 0.0
            for blk in blocks[i : i + batch]:
                window = tokens[blk.start : blk.start + blk.length + 1]
                logits = ref(window[None, :-1])[0].double()
                loss = loss - torch.log_softmax(logits, dim=-1)[torch.arange(blk.length), window[1:]].sum()
            grads = torch.autograd.grad(loss / sum(blk.length for blk in blocks[i : i + batch]), params)
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            factor = min(1.0, clip / (norm + 1e-6))
            clipped.append(factor < 1.0)
            with torch.no_grad():
                for k, (p, g) in enumerate(zip(params, grads)):
                    velocity[k] = g * factor if velocity[k] is None else momentum * velocity[k] + g * factor
                    p -= lr * velocity[k]
    assert all(clipped) and len(clipped) == epochs * 3
    untouched = _model(cfg).double()
    for (name, got), want, before in zip(model.named_parameters(), ref.parameters(), untouched.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=name)
        assert torch.equal(got, before) == name.startswith("blocks.0."), name
        assert got.requires_grad, name


def test_row_groups_partition_the_rows_in_balanced_groups_of_two_or_more():
    for group_rows in (0, 3, 4, 5, 32):
        for rows in range(2, 70):
            groups = row_groups(rows, group_rows)
            assert groups[0][0] == 0 and groups[-1][1] == rows
            assert all(b == c for (_, b), (c, _) in zip(groups, groups[1:]))  # contiguous, in order
            sizes = [b - a for a, b in groups]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
            if group_rows:
                assert max(sizes) <= group_rows and len(groups) == -(-rows // group_rows)
            else:
                assert groups == [(0, rows)]


def test_a_batch_in_row_groups_takes_the_same_steps_as_all_rows_at_once():
    """Seven documents in chunks of 7, groups of at most 3 rows: the forwards run 2, 3, 2
    rows (then fewer as documents finish), and in float64 every score and every adapter
    after the batch equal those of the batch run all at once."""
    rng = np.random.default_rng(11)
    lengths = [30, 26, 22, 19, 15, 12, 8]
    tokens = np.concatenate([[BOS, *rng.integers(BOS + 1, 64, n - 1)] for n in lengths] + [[BOS]])
    docs = queue_order(documents(tokens, BOS))
    assert len(docs) == 7
    stream_t, bytes_t = stream_tensors(tokens, _bytes(tokens))
    results = []
    for group_rows in (0, 3):
        cfg = dataclasses.replace(EVAL, lora_batch_docs=7, lora_group_rows=group_rows)
        model = _model(ModelConfig(**RECORD_LIKE)).double()
        rows_seen = []
        model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].size(0)))
        lora, ledger = DocumentLora(model, cfg, CPU), Ledger(len(tokens))
        sums = torch.zeros(3, dtype=torch.float64)
        score_batch(model, lora, 0, docs, stream_t, bytes_t, sums, rows=7, device=CPU, autocast_dtype=None,
                    ledger=ledger)
        results.append((rows_seen, ledger, sums, [(a.detach(), b.detach()) for a, b in lora.mode.adapters.values()]))
    (whole_rows, whole, whole_sums, whole_adapters), (group_rows_seen, grouped, grouped_sums, grouped_adapters) = results
    assert whole_rows[0] == 7 and group_rows_seen[:3] == [2, 3, 2] and max(group_rows_seen) == 3
    assert (grouped.times_scored[1:] == 1).all()
    np.testing.assert_allclose(grouped.nll, whole.nll, rtol=1e-12, atol=0)
    torch.testing.assert_close(grouped_sums, whole_sums, rtol=1e-12, atol=0)
    assert len(grouped_adapters) == len(whole_adapters)  # the same weights, in the same order
    for (a, b), (grouped_a, grouped_b) in zip(whole_adapters, grouped_adapters):
        torch.testing.assert_close(grouped_a, a, rtol=1e-9, atol=1e-12)  # AdamW divides tiny gradients
        torch.testing.assert_close(grouped_b, b, rtol=1e-9, atol=1e-12)
    assert any(b.abs().sum() > 0 for _, b in whole_adapters)  # the steps did train


def test_selected_positions_are_the_full_forwards_in_float64():
    """`select` runs the head on some positions only: their logits are those of the whole
    forward, and their NLL given targets is a plain float64 log-softmax of those
    (soft-capped) logits, written here, to float32's precision (the model's loss)."""
    model = _model(ModelConfig(**RECORD_LIKE)).double()
    idx = torch.as_tensor(_stream(40, 64, seed=2)).view(2, 20)
    select = torch.tensor([[19, 3, 3, 0], [7, 8, 9, 19]])
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, select=select)
        targets = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        nll = model(idx, targets, select=select)
    expected = torch.stack([full[r, select[r]] for r in range(2)])
    torch.testing.assert_close(picked, expected, rtol=1e-12, atol=1e-12)
    cap = model.cfg.logit_softcap
    raw = torch.stack([full[r, select[r]] for r in range(2)])  # already capped by the model
    raw = raw.double()  # the model's soft cap and loss run in float32, whatever the weights
    log_probs = raw - torch.logsumexp(raw, dim=-1, keepdim=True)
    torch.testing.assert_close(nll.double(), -log_probs.gather(-1, targets[..., None]).squeeze(-1),
                               rtol=1e-6, atol=1e-6)
    assert cap > 0 and raw.abs().max() < cap


def test_the_head_adapter_changes_the_logits():
    model = _model(ModelConfig(**RECORD_LIKE))
    lora = _lora(model, dataclasses.replace(EVAL, lora_targets=["head"]), 1)
    (a, b), = lora.mode.adapters.values()
    with torch.no_grad():
        b.fill_(0.5)
    idx = torch.as_tensor(_stream(12, 64, seed=1))[None]
    lora.mode.restart()
    with torch.no_grad():
        plain = model(idx)
        with lora.mode:
            adapted = model(idx)
    assert not torch.allclose(plain, adapted, atol=1e-3)


def test_evaluate_reloads_the_artifact_per_mode_and_reports_the_budget(stream):
    loads = []

    def load():
        loads.append(1)
        return _model(ModelConfig(**RECORD_LIKE))

    cfg = dataclasses.replace(EVAL, final_mode="ttt_sgd", modes=["sliding", "ttt_sgd", "nonoverlap"], warmup=True)
    metrics = evaluate(cfg, load, stream, _bytes(stream), CPU)
    assert len(loads) == 3 and metrics["val_bpb"] == metrics["val_bpb_ttt_sgd"]
    alone, _ = _ledger("sliding", stream)
    assert metrics["val_bpb_sliding"] == pytest.approx(alone.nll[1:].sum() / np.log(2) / _bytes(stream)[1:].sum())
    for mode in cfg.modes:
        assert metrics[f"eval_seconds_{mode}"] >= 0 and metrics[f"projected_8xh100_seconds_{mode}"] > 0
    assert 0 < metrics["eval_seconds_timed_as_records"] <= metrics["eval_seconds_ttt_sgd"]
    assert metrics["projected_8xh100_seconds"] == metrics["projected_8xh100_seconds_ttt_sgd"]
    assert metrics["eval_seconds"] == metrics["eval_seconds_ttt_sgd"]  # the final mode's: what the budget counts
    assert metrics["eval_seconds_all_modes"] == pytest.approx(sum(metrics[f"eval_seconds_{m}"] for m in cfg.modes))
    assert metrics["tokens_scored"] == len(stream) - 1


@pytest.mark.parametrize("compiled", [False, True])
def test_each_compiled_mode_compiles_from_empty_caches_of_its_own(compiled, stream, tmp_path, monkeypatch):
    """evaluate.compile: each mode's read, compile, warm-up and loop run inside a
    `cold_compile` of its own (an empty Inductor cache directory per mode, gone after
    it), so neither an earlier run nor a diagnostic mode shortens the compile that
    `eval_seconds` counts; eager evaluation keeps the process's settings. (Whether
    Inductor honours the directory: tests/test_graphs.py.) The spy stands in for the
    compile and warm-up, so the modes score eagerly."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []

    def spy(model, mode, cfg, device, autocast_dtype, *, progress=False):
        where = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        seen.append((mode, where, where.exists() and not any(where.iterdir())))

    monkeypatch.setattr(eval_run, "prepare", spy)
    cfg = dataclasses.replace(EVAL, modes=["sliding", "nonoverlap"], final_mode="sliding", compile=compiled)
    evaluate(cfg, lambda: _model(ModelConfig(**RECORD_LIKE)), stream, _bytes(stream), CPU)
    assert [mode for mode, _, _ in seen] == cfg.modes
    dirs = [where for _, where, _ in seen]
    if compiled:
        assert all(empty for _, _, empty in seen) and len(set(dirs)) == 2 and tmp_path not in dirs
        assert not any(where.exists() for where in dirs)
    else:
        assert dirs == [tmp_path, tmp_path]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_timed_mode_splits_the_setup_into_the_read_and_the_warm_up_and_counts_graphs_built_in_the_loop(
        stream, monkeypatch, capsys):
    """`timed_mode` is how `evaluate` and `bench.eval_speed` both time a mode: the setup
    holds the artifact read and the warm-up, the loop the scoring, and graphs built inside
    the loop are counted and warned about. The read and the warm-up sleep here, so their
    shares of the setup have known lower bounds; the scoring is the real one."""
    warmup = {"scoring": 0.05}

    def slow_read():
        time.sleep(0.1)
        return _model(ModelConfig(**RECORD_LIKE))

    def spy_prepare(model, mode, cfg, device, autocast_dtype, *, progress=False):
        time.sleep(0.05)
        return warmup

    def scoring_that_builds_two_graphs(*args, **kwargs):
        torch._dynamo.utils.counters["stats"]["unique_graphs"] += 2  # as a shape the warm-up missed would
        return score_mode(*args, **kwargs)

    monkeypatch.setattr(eval_run, "prepare", spy_prepare)
    monkeypatch.setattr(eval_run, "score_mode", scoring_that_builds_two_graphs)
    cfg = dataclasses.replace(EVAL, modes=["sliding"], final_mode="sliding", compile=True)
    run = eval_run.timed_mode("sliding", cfg, slow_read, stream, _bytes(stream), CPU, None, progress=False)
    assert run.load_seconds >= 0.1 and run.timing.setup_seconds >= run.load_seconds + 0.05
    assert run.warmup_seconds_by_call == warmup and run.timing.loop_seconds > 0
    assert run.graphs_compiled_in_loop == 2 and "built 2 graph(s) inside the timed loop" in capsys.readouterr().out
    expected = score_mode("sliding", _model(ModelConfig(**RECORD_LIKE)), stream, _bytes(stream), cfg, device=CPU)
    assert run.result.sums == expected.sums and run.timing.tokens == expected.sums.num_targets == len(stream) - 1
    assert (run.timing.world_size, run.timing.syncs, run.timing.balance) == (1, expected.syncs, expected.balance)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_the_warm_up_times_each_kind_of_call_of_its_mode_and_leaves_the_weights(mode):
    """The warm-up makes the calls of the mode's loop and no other, each timed apart (a
    compiled graph's cost, which the budget pays), and leaves the weights, their gradient
    flags and the training flag as it found them."""
    model = _model(ModelConfig(**RECORD_LIKE))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    seconds = eval_run.warm_up(model, mode, dataclasses.replace(EVAL, ttt_freeze_blocks=1), CPU, None)
    expected = {"nonoverlap": ["scoring"], "sliding": ["scoring"], "ttt_sgd": ["scoring", "sgd_step"],
                "ttt_lora": ["adapters"], "ttt_phased": ["sgd_step", "adapters"]}[mode]
    assert list(seconds) == expected and all(s >= 0 for s in seconds.values())
    assert model.training
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad and p.grad is None, name


def test_compiled_evaluation_scores_as_eager_with_every_graph_built_by_the_warm_up(stream, capsys):
    """evaluate.compile with aot_eager (dynamo's and AOTAutograd's graphs: the part that
    could lose an adapter or a state; Inductor's code generation is torch's) scores as
    eager: `sliding` for the scoring graph, `ttt_phased` for the adapters' and the global
    SGD step's. The loops' fixed rows and varying length leave no graph to build inside
    the timed loop. A 2-layer model keeps the tracing short (about 30 s on 2 cores)."""
    small = ModelConfig(**{**RECORD_LIKE, "num_layers": 2, "xsa_last_n": 2, "value_embed_layers": (1,),
                           "num_loops": 0, "loop_start": 0, "loop_end": 0, "parallel_start": 1})
    cfg = dataclasses.replace(EVAL, modes=["sliding", "ttt_phased"], final_mode="ttt_phased", warmup=True,
                              ttt_freeze_blocks=1,  # which weights take gradients is part of a graph
                              lora_batch_docs=6, lora_group_rows=3,  # forwards of all live rows and of groups
                              lora_targets=["q", "k", "v", "o_side", "mlp_side", "head"])  # the records' set
    assert len(queue_order(documents(stream, BOS))) > 6  # full batches of 6 rows, so the warm-up runs 2 groups
    eager = evaluate(cfg, lambda: _model(small), stream, _bytes(stream), CPU)
    capsys.readouterr()
    compiled = evaluate(dataclasses.replace(cfg, compile=True, compile_backend="aot_eager"),
                        lambda: _model(small), stream, _bytes(stream), CPU, progress=True)
    out = capsys.readouterr().out
    assert "inside the timed loop" not in out
    calls = {"sliding": "scoring", "ttt_phased": "sgd_step [0-9.]+ s, adapters"}  # each kind of call timed apart
    for mode in cfg.modes:  # the minutes of a record-size compile are announced, then timed and counted
        assert f"evaluate: {mode}: warm-up on random tokens, compiling (aot_eager)\n" in out
        built = re.search(rf"evaluate: {mode}: warm-up done in [0-9.]+ s \({calls[mode]} [0-9.]+ s\), "
                          r"(\d+) graph\(s\) built", out)
        assert built and int(built.group(1)) > 0, mode
    for mode in cfg.modes:  # float32's epsilon: traced and eager graphs may multiply the adapters in other orders
        assert compiled[f"val_bpb_{mode}"] == pytest.approx(eager[f"val_bpb_{mode}"], rel=1.2e-7, abs=0), mode
    assert compiled["tokens_scored"] == eager["tokens_scored"]


def test_the_last_chunk_is_never_trained_on_and_every_step_is_a_sync(stream, monkeypatch):
    """ttt_sgd trains chunks 0..n-2, each on exactly its own targets, `ttt_epochs` times in
    steps of `ttt_batch_seqs` blocks; the mode reports one sync per step plus the final
    reduction, in one process too (the 8xH100 projection adds them there)."""
    trained, steps = [], []
    original_train, original_step = SGDTrainer.train, SGDTrainer._step

    def train(self, stream_, blocks, **kwargs):
        trained.append([(b.start, b.start + b.length) for b in blocks])
        return original_train(self, stream_, blocks, **kwargs)

    def step(self, *args):
        steps.append(1)
        return original_step(self, *args)

    monkeypatch.setattr(SGDTrainer, "train", train)
    monkeypatch.setattr(SGDTrainer, "_step", step)
    _, result = _ledger("ttt_sgd", stream)
    C, n = EVAL.ttt_chunk_tokens, len(stream)
    chunks = -(-(n - 1) // C)
    assert len(trained) == chunks - 1  # the last chunk: nothing is scored after it
    for c, spans in enumerate(trained):
        targets = [t for s, e in spans for t in range(s + 1, e + 1)]
        assert targets == list(range(c * C + 1, min((c + 1) * C, n - 1) + 1))
    expected_steps = sum(EVAL.ttt_epochs * -(-len(spans) // EVAL.ttt_batch_seqs) for spans in trained)
    assert len(steps) == expected_steps > 0 and result.syncs == expected_steps + 1
    steps.clear()
    _, phased = _ledger("ttt_phased", stream)
    assert len(steps) > 0 and phased.syncs == len(steps) + 1


def test_each_phase_trains_on_the_first_boundary_documents_of_the_queue_once_they_are_scored(stream, monkeypatch):
    """ttt_phased, events in order: batches of 3 documents scored, and after the batch that
    completes each boundary (3 and 6 of 10 documents; none after the last batch) one
    global pass: the first `boundary` documents of the length-sorted queue, each cut in
    blocks of at most seq_len targets, grouped in order into chunks of at least
    ttt_chunk_tokens targets (the first chunk here is exactly 48: two blocks of 24), chunk c
    of n at 0.5 phase_lr (1 + cos(pi c / n)), phase_epochs each, after the SGD's momentum
    is cleared and the adapters' kept A forgotten (each phase as the records run it: a
    fresh SGD, then fresh LoRAs). The queue and the cuts are recomputed here from the BOS
    positions."""
    import pgolf_core.eval.lora as lora_module

    events = []
    original_score = lora_module.score_batch

    def score(model, lora, batch_index, docs, *args, **kwargs):
        events.append(("score", batch_index))
        return original_score(model, lora, batch_index, docs, *args, **kwargs)

    def train(self, stream_, blocks, *, lr, epochs):
        events.append(("train", [(b.start, b.length) for b in blocks], lr, epochs))

    monkeypatch.setattr(lora_module, "score_batch", score)
    monkeypatch.setattr(SGDTrainer, "train", train)
    monkeypatch.setattr(SGDTrainer, "reset_momentum", lambda self: events.append(("reset_momentum",)))
    monkeypatch.setattr(lora_module.DocumentLora, "forget", lambda self: events.append(("forget",)))
    cfg = dataclasses.replace(EVAL, phase_boundaries=[3, 6], phase_epochs=2, phase_lr=0.3, ttt_chunk_tokens=48)
    score_mode("ttt_phased", _model(ModelConfig(**RECORD_LIKE)), stream, _bytes(stream), cfg, device=CPU)

    docs = _bos_documents(stream)
    assert len(docs) == 10
    queue = sorted(docs, key=lambda d: (d[0] - d[1], d[0]))
    expected = []
    for batch_index in range(4):
        expected.append(("score", batch_index))
        if batch_index in (0, 1):  # documents 3 and 6 scored: the phases of boundaries 3 and 6
            chunks, current = [], []
            for s, e in queue[: 3 * (batch_index + 1)]:
                for first in range(s, e, cfg.seq_len):
                    current.append((first, min(cfg.seq_len, e - first)))
                    if sum(length for _, length in current) >= cfg.ttt_chunk_tokens:
                        chunks.append(current)
                        current = []
            chunks += [current] if current else []
            expected += [("reset_momentum",), ("forget",)]
            expected += [("train", chunk, 0.5 * 0.3 * (1 + math.cos(math.pi * c / len(chunks))), 2)
                         for c, chunk in enumerate(chunks)]
    assert [e[:2] for e in events] == [e[:2] for e in expected]
    for got, want in zip(events, expected):
        if got[0] == "train":
            assert got[2] == pytest.approx(want[2], rel=1e-12) and got[3] == want[3]


def test_projection_model_and_budget_check():
    t = budget.ModeTiming(setup_seconds=30.0, loop_seconds=800.0, world_size=1, syncs=1000, tokens=1000)
    assert budget.project_8xh100(t, 0.001) == pytest.approx(30 + 100 + 1)
    assert budget.project_8xh100(t, 0.001, tokens=2000) == pytest.approx(30 + 2 * 101)
    eight = dataclasses.replace(t, world_size=8)
    assert budget.project_8xh100(eight, 0.001) == pytest.approx(830)  # measured on 8: as measured
    uneven = dataclasses.replace(t, balance=1.25)  # the slowest of 8 ranks holds 1.25 even shares
    assert budget.project_8xh100(uneven, 0.001) == pytest.approx(30 + 125 + 1)
    assert budget.project_8xh100(uneven, 0.001, tokens=2000) == pytest.approx(30 + 2 * 126)
    budget.check_budget("ttt_phased", 599.0, 600.0)
    budget.check_budget("ttt_phased", 10_000.0, 0.0)  # no limit set
    with pytest.raises(RuntimeError, match="evaluate.max_eval_seconds"):
        budget.check_budget("ttt_phased", 601.0, 600.0)


def test_config_names_the_bad_key():
    with pytest.raises(ValueError, match="evaluate.lora_targets"):
        EvaluateConfig(lora_targets=["q", "gate"])
    with pytest.raises(ValueError, match="evaluate.final_mode"):
        EvaluateConfig(final_mode="ttt_lora")
    with pytest.raises(ValueError, match="evaluate.lora_group_rows"):
        EvaluateConfig(lora_group_rows=2)
    with pytest.raises(ValueError, match="evaluate.lora_chunk_tokens"):
        EvaluateConfig(seq_len=32, stride=8, lora_chunk_tokens=48)
    with pytest.raises(ValueError, match="evaluate.phase_boundaries"):
        EvaluateConfig(phase_boundaries=[10, 5])


def test_the_stage_reads_no_training_shard(tmp_path, monkeypatch, tiny_sp, tiny_tokenizer_dir, embedded_docs):
    """Every file the evaluate stage opens, recorded through an audit hook: validation
    shards, the tokenizer and the artifact only, with train shards lying beside them."""
    from pgolf_core import artifact
    from stages import evaluate as stage

    ids = [tok for doc in embedded_docs[:3] for tok in [tiny_sp.bos_id()] + tiny_sp.encode(doc[:300])]
    shards = tmp_path / "shards"
    data.write_split(shards, "val", np.array(ids, dtype=np.uint16), 10_000)
    data.write_split(shards, "train", np.array(ids * 2, dtype=np.uint16), 10_000)
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {modes: [sliding, ttt_sgd, ttt_lora, ttt_phased], final_mode: ttt_phased, "
                      "seq_len: 32, stride: 16, ttt_chunk_tokens: 64, lora_rank: 2, lora_chunk_tokens: 16, "
                      "lora_batch_docs: 2, phase_boundaries: [2]}\n")
    model_cfg = ModelConfig(vocab_size=tiny_sp.vocab_size(), num_layers=2, model_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_mult=2, bos_id=tiny_sp.bos_id())
    monkeypatch.setattr(artifact, "load_model", lambda path: (open(path, "rb").close(), GPT(model_cfg))[1])
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "model.bin").write_bytes(b"stand-in")
    opened = []
    recording = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if recording[0] and event == "open" else None)
    monkeypatch.setattr(sys, "argv", ["evaluate", "--params", str(params), "--artifact", str(tmp_path / "artifact"),
                                      "--shards", str(shards), "--tokenizer", str(tiny_tokenizer_dir),
                                      "--metrics", str(tmp_path / "eval.json")])
    try:
        stage.main()
    finally:
        recording[0] = False
    read = [Path(p).name for p in opened if p.startswith(str(shards))]
    assert any(n.startswith("fineweb_val_") for n in read), read
    assert not any(n.startswith("fineweb_train_") for n in read), read
    metrics = json.loads((tmp_path / "eval.json").read_text())
    labels = json.loads((tmp_path / "provenance" / "eval.json").read_text())["labels"]
    assert metrics["tokens_scored"] == len(ids) - 1 and labels["final_mode"] == "ttt_phased"
    assert metrics["val_bpb"] == metrics["val_bpb_ttt_phased"] > 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_scored_bytes_are_the_decoded_texts_utf8_length(mode, tiny_sp, embedded_docs):
    pieces = [tiny_sp.encode(doc[:200]) for doc in embedded_docs[10:15]]
    ids = np.array([tok for p in pieces for tok in [tiny_sp.bos_id()] + p])
    model = GPT(ModelConfig(vocab_size=tiny_sp.vocab_size(), num_layers=1, model_dim=16, num_heads=2,
                            num_kv_heads=1, mlp_mult=2, bos_id=tiny_sp.bos_id()))
    cfg = dataclasses.replace(EVAL, ttt_chunk_tokens=100, lora_batch_docs=2, phase_boundaries=[2])
    result = score_mode(mode, model, ids, position_bytes(byte_tables(tiny_sp), ids), cfg, device=CPU)
    assert result.sums.num_targets == len(ids) - 1
    assert result.sums.num_bytes == sum(len(tiny_sp.decode(p).encode("utf-8")) for p in pieces)


TWO_PROCESS_SCRIPT = '''
import json, sys
import numpy as np
import torch
import torch.distributed as td
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
torch.set_num_threads(1)
from pgolf_core import dist
from pgolf_core.eval.run import score_mode
from pgolf_core.eval.sliding import Ledger, stream_tensors
import test_ttt as t

dist.init("cpu")
stream = t._stream(300, 64, seed=3)
out = {}
for mode in t.ALL_MODES:
    ledger = Ledger(len(stream))
    result = score_mode(mode, t._model(t.ModelConfig(**t.RECORD_LIKE)), stream, t._bytes(stream), t.EVAL,
                        device=torch.device("cpu"), ledger=ledger)
    counts = torch.as_tensor(ledger.times_scored)
    dist.all_reduce_sum(counts)
    out[mode] = [result.sums.nll_nats, result.sums.num_bytes, result.sums.num_targets, counts.tolist()]
one_seq = t.dataclasses.replace(t.EVAL, ttt_batch_seqs=1)  # rank 1 has no sequence in any step
out["one_seq"] = score_mode("ttt_sgd", t._model(t.ModelConfig(**t.RECORD_LIKE)), stream, t._bytes(stream), one_seq,
                            device=torch.device("cpu")).sums.nll_nats
if dist.is_main():
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
dist.shutdown()
'''


@pytest.mark.slow
def test_two_processes_share_the_work_and_agree_with_one(tmp_path, stream):
    """Under torchrun (2 processes, gloo) every mode scores each target once across the
    ranks and its sums equal one process's (to the order of the gradient all-reduce)."""
    import subprocess

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([*torchrun(tmp_path, 2),
                          str(script), str(root), str(tmp_path / "out.json")], cwd=tmp_path, capture_output=True,
                         text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for mode in ALL_MODES:
        nll, nbytes, ntargets, counts = out[mode]
        one = _ledger(mode, stream)[1].sums
        assert counts[0] == 0 and set(counts[1:]) == {1}, mode
        assert (nbytes, ntargets) == (one.num_bytes, one.num_targets)
        assert nll == pytest.approx(one.nll_nats, rel=1e-5), mode
    one_seq = dataclasses.replace(EVAL, ttt_batch_seqs=1)
    alone = score_mode("ttt_sgd", _model(ModelConfig(**RECORD_LIKE)), stream, _bytes(stream), one_seq, device=CPU)
    assert out["one_seq"] == pytest.approx(alone.sums.nll_nats, rel=1e-5)


# every mode, and the record profiles' warm-started A: (mode, config) by name
CAUSAL_CASES = {**{mode: (mode, EVAL) for mode in ALL_MODES},
                "ttt_lora-warm_start_a": ("ttt_lora", dataclasses.replace(EVAL, lora_warm_start_a=True))}

TWO_PROCESS_CAUSAL_SCRIPT = '''
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
torch.set_num_threads(1)
from pgolf_core import dist
import test_ttt as t

dist.init("cpu")
assert dist.world_size() == 2
stream = t._stream(300, 64, seed=3)
out = {}
for name, (mode, cfg) in t.CAUSAL_CASES.items():
    nll, counts = [], []
    for tokens in [stream] + [cut.tokens for cut in t._cuts(mode, stream)]:
        ledger, _ = t._ledger(mode, tokens, cfg)
        mine = ledger.times_scored > 0
        assert mine.any(), name  # this rank scored its share
        # float64 and 0 where the other rank scores: x + 0.0 is x, so each gathered loss is
        # bit for bit the one its rank computed (checked below), whatever the reduction order
        local = np.where(mine, ledger.nll, 0.0)
        assert (local[mine] == local[mine].astype(np.float32)).all()  # float32 losses, exact in float64
        gathered = dist.all_reduce_sum(torch.as_tensor(local)).numpy()
        assert np.array_equal(gathered[mine], local[mine]), name
        nll.append(gathered)
        counts.append(dist.all_reduce_sum(torch.as_tensor(ledger.times_scored)).numpy())
    out[name + "/nll"], out[name + "/times_scored"] = np.stack(nll), np.stack(counts)
if dist.is_main():
    np.savez(sys.argv[2], **out)
dist.shutdown()
'''


@pytest.mark.slow
def test_two_processes_losses_up_to_p_ignore_every_later_token(tmp_path, stream):
    """The causality tests above, under torchrun with 2 processes (gloo), at the same cut
    points, every mode and warm-started A, in one launch: each target is scored exactly
    once across the ranks, in the base run and in every perturbed one, and every loss up
    to p (stream order; queue order for the document modes) is bit-identical to the base
    run's, some later one not.

    Why 2 processes: there the ranks split the scoring (windows, document batches) and
    SGD all-reduces the gradient of blocks that each rank takes its share of, phases see
    the documents every rank has scored, and warm-started A carries over a rank's own
    earlier batches. A leak through the shared gradient, through which documents a phase
    trains on, or through a rank's carried state would show here and not in 1 process.
    Each rank's losses are gathered by an all-reduce in float64 of its own losses and
    zeros elsewhere, which leaves each fp32 loss exact (the script checks it). Checked
    by mutation: rank 1 training on blocks one chunk later (a future leak through the
    gradient all-reduce), or a phase counting a round's documents as scored one batch per
    rank early, fails here while the 1-process tests pass."""
    import os
    import subprocess

    script = tmp_path / "causal.py"
    script.write_text(TWO_PROCESS_CAUSAL_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([*torchrun(tmp_path, 2),
                          str(script), str(root), str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for name, (mode, _) in CAUSAL_CASES.items():
        cuts = _cuts(mode, stream)
        nll, counts = out[name + "/nll"], out[name + "/times_scored"]
        assert len(nll) == len(counts) == 1 + len(cuts)
        for times_scored in counts:
            assert times_scored[0] == 0 and (times_scored[1:] == 1).all(), name
        for cut, after in zip(cuts, nll[1:]):
            _assert_causal(f"{name} on 2 processes", cut, nll[0], after)


def _least_loaded_first(costs, world, phase_after):
    """The deal written out: within each segment (ending after a phase batch or the
    last), each batch in turn to the rank holding the least cost, the lowest on ties."""
    segments, hands, loads = [], [[] for _ in range(world)], [0.0] * world
    for b, cost in enumerate(costs):
        rank = loads.index(min(loads))
        hands[rank].append(b)
        loads[rank] += float(cost)
        if b in phase_after or b == len(costs) - 1:
            segments.append(hands)
            hands, loads = [[] for _ in range(world)], [0.0] * world
    return segments


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_deal_gives_each_batch_to_the_least_loaded_rank_between_phases(world):
    """Every batch once; each rank's in queue order; no segment crosses a phase; each
    batch to the least-loaded rank of its segment (longest processing time first), so a
    segment's slowest rank holds at most an even share plus one batch (Graham's bound);
    `deal_balance` is the slowest ranks' sum over an even split."""
    rng = np.random.default_rng(world)
    costs = sorted(rng.integers(1, 10_000, 40).tolist(), reverse=True)
    costs[30:33] = [9_000, 5, 7_000]  # not only decreasing
    phase_after = {5, 6, 20}
    segments = deal(costs, world, phase_after)
    assert segments == _least_loaded_first(costs, world, phase_after)
    assert sorted(b for segment in segments for hand in segment for b in hand) == list(range(40))
    starts = [0, 6, 7, 21]
    for segment, first, last in zip(segments, starts, [5, 6, 20, 39]):
        assert len(segment) == world and sorted(b for hand in segment for b in hand) == list(range(first, last + 1))
        loads = [sum(costs[b] for b in hand) for hand in segment]
        assert all(hand == sorted(hand) for hand in segment)
        assert max(loads) <= sum(loads) / world + max(costs[first : last + 1])
    slowest = sum(max(sum(costs[b] for b in hand) for hand in segment) for segment in segments)
    assert deal_balance(costs, world, phase_after) == pytest.approx(slowest * world / sum(costs), rel=1e-15)
    if world == 1:
        assert segments == [[list(range(0, 6))], [[6]], [list(range(7, 21))], [list(range(21, 40))]]
        assert deal_balance(costs, world, phase_after) == 1.0


def test_forward_positions_are_what_the_batch_loop_forwards():
    """Counted by a hook on the model in `score_batch` (rows x length of every forward):
    documents of 40, 20, 9, 3 and 1 targets in chunks of 7 with windows of at most 24, in
    a batch of 5 rows and, without the shortest, of 6 rows (a short last batch); the
    longest is capped by the window, the shortest padded to MIN_LENGTH and the last
    forwards to MIN_ROWS."""
    tokens = np.random.default_rng(7).integers(BOS + 1, 64, 75)
    tokens[[0, 40, 60, 69, 72, 73]] = BOS
    docs = queue_order(documents(tokens, BOS))
    assert [e - s for s, e in docs] == [40, 20, 9, 3, 1, 1]
    stream_t, bytes_t = stream_tensors(tokens, _bytes(tokens))
    for batch, rows in ((docs[:5], 5), (docs[:4], 6)):
        model = _model(ModelConfig(**RECORD_LIKE))
        forwarded = []
        model.register_forward_pre_hook(lambda module, args: forwarded.append(args[0].size(0) * args[0].size(1)))
        score_batch(model, DocumentLora(model, EVAL, CPU), 0, batch, stream_t, bytes_t,
                    torch.zeros(3, dtype=torch.float64), rows=rows, device=CPU, autocast_dtype=None, ledger=None)
        assert forward_positions(batch, rows, EVAL.lora_chunk_tokens, EVAL.seq_len) == sum(forwarded)


def test_the_document_modes_projection_is_stretched_by_the_balance_of_8_ranks(stream):
    """On 1 process the ranks' balance of the 8xH100 run scales the projected loop
    (`deal_balance` of 8 over that of 1, which is 1), here computed from the stream's
    batches by hand."""
    cfg = dataclasses.replace(EVAL, modes=["ttt_phased"], final_mode="ttt_phased", lora_batch_docs=1)
    metrics = evaluate(cfg, lambda: _model(ModelConfig(**RECORD_LIKE)), stream, _bytes(stream), CPU)
    queue = queue_order(documents(stream, BOS))
    costs = [forward_positions([doc], 1, cfg.lora_chunk_tokens, cfg.seq_len) for doc in queue]
    balance = deal_balance(costs, 8, {b - 1 for b in cfg.phase_boundaries})
    assert balance > 1.0  # 10 single-document batches of unequal work on 8 ranks
    loop = metrics["eval_seconds_timed_as_records"]
    setup = metrics["eval_seconds"] - loop
    syncs = metrics["projected_8xh100_seconds"] - setup - loop / 8 * balance
    assert 0 < syncs / cfg.sync_seconds == pytest.approx(round(syncs / cfg.sync_seconds), abs=1e-3)


def test_eval_speed_smoke_run_on_cpu(tmp_path):
    """bench/eval_speed.py must run before a GPU session needs it (its figures come from the GPU)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eval_speed.json"
    # a val shard of known documents (BOS = 1), 46 sequences of 32 plus one token
    lengths = [300, 5, 17, 16, 33, 600, 1, 64, 437]
    rng = np.random.default_rng(3)
    stream = np.concatenate([np.r_[1, rng.integers(2, 1024, n - 1)] for n in lengths])
    assert len(stream) == 46 * 32 + 1
    data.write_split(tmp_path / "shards", "val", stream.astype(np.uint16), 10_000)
    run = subprocess.run([sys.executable, "-m", "bench.eval_speed", "--profile", "profiles/cpu.yaml", "--device", "cpu",
                          "--shards", str(tmp_path / "shards"), "--tokens", "5000", "--modes", "ttt_phased", "ttt_sgd",
                          "--set", "seq_len=32", "stride=16", "lora_rank=2", "lora_chunk_tokens=16",
                          "ttt_chunk_tokens=512", "lora_batch_docs=1", "--out", str(out)],
                         cwd=root, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text()) and result["complete"]
    assert result["command"].startswith("python -m bench.eval_speed") and result["git_commit"] and result["final_mode"] == "ttt_phased"
    for mode in ("ttt_phased", "ttt_sgd"):
        assert result[f"tokens_per_second_{mode}"] > 0 and result[f"projected_8xh100_seconds_{mode}"] > 0
        timed = result["per_mode"][mode]
        assert timed["peak_mem_mib"] > 0 and timed["load_seconds"] >= 0 and timed["warmup_seconds"] >= 0
        assert abs(timed["load_seconds"] + timed["warmup_seconds"] - timed["setup_seconds"]) <= 0.02  # the setup's two parts
        by_call = timed["warmup_seconds_by_call"]  # within the warm-up, each kind of call the loop makes
        assert set(by_call) == {"ttt_phased": {"sgd_step", "adapters"}, "ttt_sgd": {"scoring", "sgd_step"}}[mode]
        assert 0 <= sum(by_call.values()) <= timed["warmup_seconds"] + 0.02
    assert result["phase_boundaries_scaled"] == [1]  # 833..2500 of 50,000 documents, for a handful
    # the LoRA loop's window tokens, counted here chunk by chunk: a document's targets run to
    # the next BOS (the last one to the stream's end), chunks of 16, windows of at most 32
    window_tokens = 0
    for first, last in _bos_documents(stream):
        scored = 0
        while scored < last - first:
            scored = min(scored + 16, last - first)
            window_tokens += min(scored, 32)
    assert result["timed_tokens"] == len(stream) - 1 and result["timed_documents"] == len(lengths)
    assert result["mean_document_tokens"] == round((len(stream) - 1) / len(lengths), 1)
    assert result["lora_window_tokens_per_target"] == round(window_tokens / (len(stream) - 1), 3)


def test_eager_phases_build_no_sgd_graph_and_score_as_eager(stream, capsys):
    """evaluate.compile_phases off: `ttt_phased` compiles only the adapters' graph; its
    warm-up makes no SGD-step call, its phases train eager (torch.compile's force_eager
    stance: without it the first phase would build the SGD step's graph inside the timed
    loop), and the scores equal eager evaluation's to float32's epsilon. The 2-layer
    model of the test above keeps the tracing short."""
    small = ModelConfig(**{**RECORD_LIKE, "num_layers": 2, "xsa_last_n": 2, "value_embed_layers": (1,),
                           "num_loops": 0, "loop_start": 0, "loop_end": 0, "parallel_start": 1})
    cfg = dataclasses.replace(EVAL, modes=["ttt_phased"], final_mode="ttt_phased", warmup=True, compile_phases=False,
                              lora_batch_docs=6, lora_group_rows=3, lora_targets=["q", "k", "v", "o_side", "mlp_side", "head"])
    eager = evaluate(cfg, lambda: _model(small), stream, _bytes(stream), CPU)
    capsys.readouterr()
    graphs_before = compiled_graphs()
    compiled = evaluate(dataclasses.replace(cfg, compile=True, compile_backend="aot_eager"),
                        lambda: _model(small), stream, _bytes(stream), CPU, progress=True)
    out = capsys.readouterr().out
    built = re.search(r"evaluate: ttt_phased: warm-up done in [0-9.]+ s \(adapters [0-9.]+ s\), (\d+) graph\(s\) built", out)
    assert built and int(built.group(1)) > 0 and "sgd_step" not in out
    assert "inside the timed loop" not in out and compiled_graphs() - graphs_before == int(built.group(1))
    assert compiled["val_bpb_ttt_phased"] == pytest.approx(eager["val_bpb_ttt_phased"], rel=1.2e-7, abs=0)
    _, phased = _ledger("ttt_phased", stream, cfg, small)
    assert phased.syncs > 1  # the phases did train: one sync per SGD step, plus the final sum
