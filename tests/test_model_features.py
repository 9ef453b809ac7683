"""The records' model features on a tiny configuration: index lists, shapes, causality,
gradients everywhere, SmearGate at BOS, and features that start as the identity."""

import dataclasses

import pytest
import torch

from pgolf_core.attention import Attention, Rotary
from pgolf_core.kernels import Kernels
from pgolf_core.loss import token_nll
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT, layer_sequence
from pgolf_core.optim import orthogonalize, param_groups

BASE = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)
ALL_ON = dict(rope_dims=4, mlp_activation="leaky_relu2", qk_gain_init=5.0, ln_scale=True, resid_mix=True,
              unet_skips=True, xsa_last_n=6, smear_gate=True, attn_gate=True, attn_gate_scale=0.5,
              value_embed_layers=(4, 5), value_embed_dim=8, value_residual=True, loop_start=1, loop_end=2,
              num_loops=2, parallel_start=4)


def perturbed(model: GPT) -> GPT:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_recurrence_index_lists_match_the_records():
    record = ModelConfig(**{**BASE, "num_layers": 11}, unet_skips=True, loop_start=4, loop_end=5, num_loops=2)
    assert layer_sequence(record, True) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert layer_sequence(record, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    wider = dataclasses.replace(record, loop_start=3)
    assert layer_sequence(wider, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert GPT(wider).skip_weights.shape == (8, 32)  # sized for the looped encoder
    assert layer_sequence(ModelConfig(**BASE), True) == ([], list(range(6)))


@pytest.mark.parametrize("mode", ["merge", "routed"])
@pytest.mark.parametrize("looping", [False, True])
def test_all_features_causal_and_every_parameter_learns(mode, looping):
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode=mode)))
    idx = torch.randint(2, 64, (2, 20))
    idx[:, 7] = 1  # a BOS inside the sequence
    logits = model(idx, looping=looping)
    assert logits.shape == (2, 20, 64)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 64
    torch.testing.assert_close(model(changed, looping=looping)[:, :12], logits[:, :12], rtol=0, atol=0)
    token_nll(logits[:, :-1], idx[:, 1:]).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert dead == []
    num_skips = len(layer_sequence(model.cfg, looping)[0])  # 3 without the loop, 5 with it
    assert model.skip_gates.grad[:num_skips].abs().min() > 0
    assert not model.skip_gates.grad[num_skips:].abs().sum()  # rows only the looped encoder uses


@pytest.mark.parametrize("mode, lane_params", [("merge", ["lane_merge"]), ("routed", ["lane_keep", "lane_route"])])
def test_both_residual_lanes_receive_gradient(mode, lane_params):
    model = perturbed(GPT(ModelConfig(**BASE, parallel_mode=mode, parallel_start=3)))
    token_nll(model(torch.randint(0, 64, (2, 16))), torch.randint(0, 64, (2, 16))).mean().backward()
    for name in lane_params:
        grad = getattr(model, name).grad
        assert grad is not None and (grad[3:] if name != "lane_merge" else grad).abs().min() > 0
    for i in range(3, 6):  # attention feeds lane 0, the MLP lane 1: both branches learn
        assert model.blocks[i].attn.q.weight.grad.abs().sum() > 0
        assert model.blocks[i].mlp.up.weight.grad.abs().sum() > 0


def test_smear_gate_never_mixes_across_bos():
    model = perturbed(GPT(ModelConfig(**BASE, smear_gate=True)))
    with torch.no_grad():
        model.smear_lambda.fill_(1.0)
    idx = torch.randint(2, 64, (1, 10))
    idx[0, 5] = 1
    other = idx.clone()
    other[0, 4] = (other[0, 4] + 1) % 64 or 2  # change the token before the BOS
    a, b = model.embed(idx), model.embed(other)
    torch.testing.assert_close(a[0, 5], b[0, 5], rtol=0, atol=0)  # BOS does not see the previous doc
    assert not torch.allclose(a[0, 4], b[0, 4])
    assert not torch.allclose(model.embed(idx)[0, 7], model.embed(idx.roll(1, 1))[0, 7])  # smear is live elsewhere


@pytest.mark.parametrize("feature", [dict(resid_mix=True), dict(smear_gate=True), dict(value_embed_layers=(2, 5))])
def test_identity_initialised_features_restore_the_plain_model_exactly(feature):
    torch.manual_seed(0)
    plain = perturbed(GPT(ModelConfig(**BASE)))
    with_feature = GPT(ModelConfig(**BASE, **feature))
    missing = with_feature.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("mix" in k or "smear" in k or "value" in k for k in missing)
    idx = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(with_feature(idx), plain(idx), rtol=0, atol=0)


def test_xsa_output_is_orthogonal_to_the_tokens_own_value():
    attn = Attention(ModelConfig(**BASE, xsa_last_n=1), layer=5)
    y, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    out = attn._exclude_self_value(y, v).view(2, 2, 2, 7, 8)
    dots = (out * torch.nn.functional.normalize(v, dim=-1)[:, :, None]).sum(-1)
    assert dots.abs().max() < 1e-5


def test_partial_rotary_leaves_the_other_channels_alone():
    x = torch.randn(1, 2, 9, 16)
    out = Rotary(4, 10000.0)(x)
    torch.testing.assert_close(out[..., 4:], x[..., 4:], rtol=0, atol=0)
    assert torch.allclose(out[:, :, 0], x[:, :, 0]) and not torch.allclose(out[..., :4], x[..., :4])


def test_optimizer_roles_follow_module_types():
    model = GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed"))
    roles = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in roles["embedding"]} == {"tok_emb.weight", "value_embed.weight"}
    matrices = {names[id(p)] for p in roles["matrices"]}
    assert "value_proj.weight" in matrices and not any("gate" in n or "mix" in n or "skip" in n for n in matrices)


def test_polar_express_lands_closer_to_the_polar_factor_than_the_quintic():
    G = torch.randn(64, 128, dtype=torch.float64) + 0.1
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    errors = {c: torch.diagonal(U.mT @ orthogonalize(G, 5, torch.float64, c) @ Vh.mT).sub(1).abs().max()
              for c in ("quintic", "polar_express")}
    assert errors["polar_express"] < errors["quintic"]


@pytest.mark.parametrize("looping", [False, True])
def test_the_full_model_traces_without_graph_breaks(looping):
    """torch.compile's fast path needs one graph per loop state (no breaks, no Python fallbacks)."""
    torch._dynamo.reset()
    model = GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed", low_precision_residual=True, doc_mask=True))
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 16)), looping=looping)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()  # the training call: loss (the fused autograd.Function) inside the same graph
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)),
                                               looping=looping)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()  # and under autocast, where the residual stream drops to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)),
                                                   looping=looping)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("looping", [False, True])
def test_compiled_training_call_matches_eager(looping):
    """The training call through AOT autograd (what torch.compile differentiates: the
    fused loss's forward and backward included) gives eager's loss and gradients."""
    torch._dynamo.reset()
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed", doc_mask=True)))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    eager_loss = model(idx, targets, looping=looping).mean()
    eager_loss.backward()
    eager = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets, looping=looping).mean()
    compiled_loss.backward()
    compiled = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    assert (compiled - eager).norm() / eager.norm() < 1e-5


def test_one_compiled_model_builds_one_graph_per_loop_state():
    """The loop state is a forward argument: compiled with fullgraph (a graph break would
    raise), the training call builds one graph for each state and reuses it, with no
    recompile when the trainer switches back and forth."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed", doc_mask=True)))
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    before = counters["stats"]["unique_graphs"]
    losses = {looping: compiled(idx, targets, looping=looping) for looping in (False, True, False, True)}
    assert counters["stats"]["unique_graphs"] - before == 2
    for looping, loss in losses.items():
        torch.testing.assert_close(loss, model(idx, targets, looping=looping), rtol=0, atol=0)
    assert not torch.equal(losses[False], losses[True])
    torch._dynamo.reset()


def test_the_loop_state_defaults_to_the_one_evaluation_runs():
    """Without `looping` the recurrence runs whenever the config has one."""
    looped = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed")))
    idx = torch.randint(2, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(looped(idx), looped(idx, looping=True))
        assert not torch.equal(looped(idx), looped(idx, looping=False))
        plain = perturbed(GPT(ModelConfig(**BASE)))
        assert torch.equal(plain(idx), plain(idx, looping=True)) and torch.equal(plain(idx), plain(idx, looping=False))


@pytest.mark.parametrize("mode", ["merge", "routed"])
def test_low_precision_residual_keeps_the_stream_in_the_autocast_dtype(mode):
    """Under bf16 autocast the switch keeps every block's output (the residual stream) in
    bf16 and stays close to the float32 stream; without autocast it changes nothing."""
    configs = [ModelConfig(**BASE, **ALL_ON, parallel_mode=mode, low_precision_residual=flag) for flag in (False, True)]
    torch.manual_seed(0)
    plain = perturbed(GPT(configs[0]))
    low = GPT(configs[1])
    low.load_state_dict(plain.state_dict())
    idx = torch.randint(2, 64, (2, 20))
    idx[:, 7] = 1
    targets = torch.roll(idx, -1, 1)
    torch.testing.assert_close(low(idx, targets), plain(idx, targets), rtol=0, atol=0)  # float32: identical
    for model, dtype in ((plain, torch.float32), (low, torch.bfloat16)):
        seen, lanes_seen, merge = [], [], model._merge_lanes
        hooks = [b.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype)) for b in model.blocks]
        model._merge_lanes = lambda lanes: lanes_seen.append(merge(lanes).dtype) or merge(lanes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, targets)
        for h in hooks:
            h.remove()
        del model._merge_lanes
        assert seen and set(seen) == {dtype} and lanes_seen == [dtype], (mode, seen, lanes_seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [m(idx, targets).mean() for m in (plain, low)]
    assert abs(losses[1] - losses[0]) / losses[0] < 0.02


@pytest.mark.parametrize("doc_mask", [False, True])
def test_document_mask_keeps_attention_inside_documents(doc_mask):
    """With `doc_mask`, what follows a BOS never depends on the tokens before it (every
    feature on); without it, it does. Causality holds either way."""
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed", doc_mask=doc_mask)))
    idx = torch.randint(2, 64, (2, 24))
    idx[:, 10] = 1  # the second document starts at position 10
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 62 + 2  # a token of the first document
    logits, other = model(idx), model(changed)
    torch.testing.assert_close(other[:, :3], logits[:, :3], rtol=0, atol=0)
    after_bos_equal = torch.equal(other[:, 10:], logits[:, 10:])
    assert after_bos_equal == doc_mask


def test_document_block_mask_matches_the_dense_mask(monkeypatch):
    """The FlexAttention form of the mask (what compiled CUDA graphs use) gives the dense
    SDPA form's outputs; forward only: FlexAttention has no backward on a CPU."""
    from pgolf_core import kernels

    torch._dynamo.reset()
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed", doc_mask=True))).eval()
    idx = torch.randint(2, 64, (2, 160))
    idx[0, [5, 70, 150]] = 1
    idx[1, 129] = 1  # a document starting just past a 128-token block edge
    with torch.no_grad():
        dense = model(idx)
        monkeypatch.setattr(kernels, "_block_mask_wanted", lambda ids: torch.compiler.is_compiling())
        flex = torch.compile(model, fullgraph=True)(idx)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def test_the_fa4_path_without_documents_is_plain_causal_attention(monkeypatch):
    """With FA4 enabled, compiled CUDA graphs take a causal block mask; its outputs are
    SDPA's plain causal ones (FlexAttention's Triton kernels stand in for FA4's here)."""
    from pgolf_core import kernels

    torch._dynamo.reset()
    fa4 = Kernels(flash_attn=True)  # as resolved on a CUDA device with flash_attn.cute
    model = perturbed(GPT(ModelConfig(**BASE, **ALL_ON, parallel_mode="routed"), fa4)).eval()
    idx = torch.randint(2, 64, (2, 160))
    idx[0, 70] = 1
    asked = []  # the FA4 choice each layer's flex_attention call received
    with torch.no_grad():
        plain = model(idx)
        monkeypatch.setattr(kernels, "_flex_options", lambda flash_attn: asked.append(flash_attn) and None)
        monkeypatch.setattr(kernels, "_block_mask_wanted", lambda ids: torch.compiler.is_compiling())
        assert kernels.attention_mask(idx, 1, documents=False, flash_attn=True) is None  # eager: plain SDPA
        flex = torch.compile(model, fullgraph=True)(idx)
    torch.testing.assert_close(flex, plain, rtol=1e-4, atol=1e-4)
    assert asked and set(asked) == {True}
    assert fa4.attention_path(torch.device("cuda")) == "flex_attention_fa4"
    assert fa4.attention_path(torch.device("cuda"), compiled=False) == "sdpa"
