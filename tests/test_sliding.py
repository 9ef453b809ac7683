import numpy as np
import pytest
import torch

from pgolf_core.bpb import ByteTables, position_bytes
from pgolf_core.eval.sliding import plan_windows, score_windows
from pgolf_core.loss import token_nll
from pgolf_core.model import GPT


@pytest.mark.parametrize("num_tokens, window, stride", [
    (2, 8, 4), (9, 8, 8), (10, 8, 8), (100, 8, 3), (100, 16, 16), (1000, 64, 64), (1001, 64, 7), (5, 64, 32),
])
def test_every_target_is_scored_exactly_once(num_tokens, window, stride):
    length, windows = plan_windows(num_tokens, window, stride)
    counts = np.zeros(num_tokens, dtype=int)
    for w in windows:
        assert w.start >= 0 and w.start + length <= num_tokens - 1 and 0 < w.num_scored <= length
        counts[w.start + length - w.num_scored + 1 : w.start + length + 1] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()
    if len(windows) > 1:  # later windows keep at least window - stride tokens of context
        assert all(length - w.num_scored >= length - stride for w in windows[1:])


def _tables(vocab):
    rng = np.random.default_rng(0)
    return ByteTables(base_bytes=rng.integers(1, 4, vocab), has_space=rng.random(vocab) < 0.3,
                      is_boundary=np.arange(vocab) < 2)


@pytest.mark.parametrize("stride", [5, 16])
def test_scores_equal_a_brute_force_per_target_loop(tiny_model_config, stride):
    model = GPT(tiny_model_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = np.random.default_rng(1).integers(0, tiny_model_config.vocab_size, 70)
    tables = _tables(tiny_model_config.vocab_size)
    sums = score_windows(model, tokens, position_bytes(tables, tokens), window=16, stride=stride, batch_seqs=3, device=torch.device("cpu"))
    nll, nbytes = 0.0, 0
    length, windows = plan_windows(len(tokens), 16, stride)
    for w in windows:  # one window at a time, each scored target recomputed from its own context
        x = torch.as_tensor(tokens[w.start : w.start + length + 1])
        per_token = token_nll(model(x[None, :-1]), x[None, 1:])[0].double()
        nll += per_token[-w.num_scored:].sum().item()
        prev, tgt = x[:-1][-w.num_scored:].numpy(), x[1:][-w.num_scored:].numpy()
        nbytes += int((tables.base_bytes[tgt] + (tables.has_space[tgt] & ~tables.is_boundary[prev])).sum())
    assert sums.num_targets == len(tokens) - 1 and sums.num_bytes == nbytes
    assert sums.nll_nats == pytest.approx(nll, rel=1e-6)


def test_ranks_partition_the_windows(tiny_model_config):
    model = GPT(tiny_model_config).eval()
    tokens = np.random.default_rng(2).integers(0, tiny_model_config.vocab_size, 200)
    kw = dict(window=16, stride=4, batch_seqs=4, device=torch.device("cpu"))
    counts = position_bytes(_tables(tiny_model_config.vocab_size), tokens)
    whole = score_windows(model, tokens, counts, **kw)
    parts = [score_windows(model, tokens, counts, rank=r, world_size=3, **kw)
             for r in range(3)]
    assert sum(p.num_targets for p in parts) == whole.num_targets == 199
    assert sum(p.nll_nats for p in parts) == pytest.approx(whole.nll_nats, rel=1e-9)


def test_a_rank_with_no_windows_adds_nothing(tiny_model_config):
    """More ranks than windows (a short stream): the ranks past the last window score
    nothing and still reach the final sum."""
    model = GPT(tiny_model_config).eval()
    tokens = np.random.default_rng(3).integers(0, tiny_model_config.vocab_size, 20)
    counts = position_bytes(_tables(tiny_model_config.vocab_size), tokens)
    kw = dict(window=32, stride=32, batch_seqs=4, device=torch.device("cpu"))
    whole = score_windows(model, tokens, counts, **kw)
    parts = [score_windows(model, tokens, counts, rank=r, world_size=3, **kw) for r in range(3)]
    assert [p.num_targets for p in parts] == [whole.num_targets, 0, 0] and whole.num_targets == 19
    assert parts[1].nll_nats == parts[2].nll_nats == parts[1].num_bytes == 0


def test_scores_run_the_recurrence_as_asked(tiny_model_config):
    """`looping` reaches the model (validation during training scores it in the trainer's
    loop state); without it the model runs as evaluation does, looped."""
    import dataclasses

    model = GPT(dataclasses.replace(tiny_model_config, num_loops=1, loop_start=0, loop_end=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = np.random.default_rng(1).integers(0, tiny_model_config.vocab_size, 40)
    byte_counts = position_bytes(_tables(tiny_model_config.vocab_size), tokens)
    score = lambda **kw: score_windows(model, tokens, byte_counts, window=16, stride=16, batch_seqs=3,  # noqa: E731
                                       device=torch.device("cpu"), **kw).nll_nats
    assert score() == score(looping=True) != score(looping=False)
