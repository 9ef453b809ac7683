"""The seeds' model switches of issue 23 (GPT-J lanes, gated value residual, BigramHash,
the per-channel SmearGate, two value-embedding tables): causal, every parameter learns,
off means today's model, the properties each one promises, optimizer roles, and one
graph under torch.compile. Their formulas are pinned in test_model_reference.py."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_core.config import ModelConfig, build_section
from pgolf_core.loss import token_nll
from pgolf_core.model import GPT
from pgolf_core.optim import param_groups

BASE = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)
RECORD = dict(rope_dims=4, mlp_activation="leaky_relu2", qk_gain_init=5.0, ln_scale=True, resid_mix=True,
              unet_skips=True, xsa_last_n=6, smear_gate=True, attn_gate=True, attn_gate_scale=0.5,
              loop_start=1, loop_end=2, num_loops=2, doc_mask=True)
SWITCHES = {
    "gptj": dict(parallel_mode="gptj", parallel_start=3),
    "gated_value_residual": dict(value_residual=True, value_residual_mode="gated"),
    "bigram_hash": dict(bigram_buckets=32, bigram_dim=8),
    "channel_smear_gate": dict(smear_gate=True, smear_gate_mode="channel"),
    "two_value_tables": dict(value_embed_layers=(2, 5), value_embed_dim=8, value_embed_tables=2),
}
ALL_SEEDS = {k: v for switch in SWITCHES.values() for k, v in switch.items()}
RECORD_WITH_SEEDS = {**RECORD, **ALL_SEEDS, "parallel_start": 4}
NEW_PARAMETERS = ("bigram.", "smear_channel", "value_gate", "value_embed2", "value_proj2")


def perturbed(model: GPT) -> GPT:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids_with_bos(B=2, T=20):
    idx = torch.randint(2, 64, (B, T))
    idx[:, 7] = 1
    return idx


@pytest.mark.parametrize("name", sorted(SWITCHES) + ["all_with_record"])
def test_switch_is_causal_and_every_parameter_learns(name):
    features = RECORD_WITH_SEEDS if name == "all_with_record" else SWITCHES[name]
    model = perturbed(GPT(ModelConfig(**BASE, **features)))
    looping = name == "all_with_record"
    idx = ids_with_bos()
    logits = model(idx, looping=looping)
    for t in (0, 8, 12):  # at the row start, just after the BOS, inside the second document
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 62 + 2
        other = model(changed, looping=looping)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.equal(other[:, t:], logits[:, t:])
    token_nll(logits[:, :-1], idx[:, 1:]).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert dead == []


# Logits of the model before the seed switches existed, written by the code at commit
# 0272572 (the parent of the switches' commit 6e68a69) running `_model_before_switches`
# below: numpy's savez_compressed of {"logits_<mode>": float32 (1, 16, 64), "idx_<mode>"}.
# "routed" was rewritten by the commit that splits its lanes before the first parallel
# layer's skip (the 04-10+ order, TECHNIQUES §2.6), a deliberate change of that model.
# Regenerate only for a deliberate change of the default model, and say so in its commit.
GOLDEN = Path(__file__).parent / "golden" / "model_before_seed_switches.npz"
GOLDEN_TOLERANCE = 1e-5  # absolute, on logits of mean magnitude above 0.1 (see _model_before_switches)
GOLDEN_FEATURES = dict(BASE, **RECORD, value_embed_layers=(4, 5), value_embed_dim=8, value_residual=True,
                       parallel_start=4)


def _model_before_switches(mode: str) -> tuple[GPT, torch.Tensor]:
    """The golden model and input: seeded init, perturbed, computed in float64, so that
    the matmuls' summation order does not move the float32 logits. They still move by
    about one float32 step from machine to machine (2.4e-7 at most, in 749 of 1,024
    logits, on the machine of 2026-12-05 against the one that wrote the file; the same
    with ATen's default, AVX2 and AVX512 kernels): parts of the forward, such as the
    rotary tables, are float32 whatever the model's dtype."""
    torch.manual_seed(0)
    model = perturbed(GPT(ModelConfig(**GOLDEN_FEATURES, parallel_mode=mode))).double()
    idx = torch.randint(2, 64, (1, 16))
    idx[:, 7] = 1
    return model, idx


@pytest.mark.parametrize("mode", ["none", "merge", "routed"])
def test_switches_off_build_the_model_from_before_the_switches(mode):
    """Every new field at its off value: no new parameter, and the logits of the model as
    it was before the switches were added, to within the float32 noise between machines
    (the reference tests pin the formulas; the record profile's parameter count is pinned
    in test_profile.py)."""
    golden = np.load(GOLDEN)
    model, idx = _model_before_switches(mode)
    assert not any(any(k in n for k in NEW_PARAMETERS) for n in model.state_dict())
    assert torch.equal(idx, torch.from_numpy(golden[f"idx_{mode}"]))
    with torch.no_grad():
        logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().mean() > 0.1
    # GOLDEN_TOLERANCE: 40 times the machines' spread; a change of the model's own arithmetic
    # is far above it (the head's logits x (1 + 1e-4) move by up to 1.9e-4, and fail)
    torch.testing.assert_close(logits, torch.from_numpy(golden[f"logits_{mode}"]), rtol=0, atol=GOLDEN_TOLERANCE)


@pytest.mark.parametrize("feature, base", [(dict(bigram_buckets=32, bigram_dim=8), dict()),
                                           (dict(value_embed_tables=2), dict(value_embed_layers=(2, 5), value_embed_dim=8))])
def test_zero_projection_switches_start_as_the_model_without_them(feature, base):
    """BigramHash and the second value table start with a zero projection: switched on,
    a fresh model computes exactly what the model without them computes."""
    torch.manual_seed(0)
    without = perturbed(GPT(ModelConfig(**BASE, **base)))
    with_it = GPT(ModelConfig(**BASE, **base, **feature))
    state = without.state_dict()
    for name, value in with_it.state_dict().items():  # the second table's scale: any value
        if name in state and state[name].shape != value.shape:
            state[name] = torch.cat([state[name], torch.randn(1)])
    missing = with_it.load_state_dict(state, strict=False).missing_keys
    assert missing and all(any(k in n for k in NEW_PARAMETERS) for n in missing)
    idx = ids_with_bos()
    torch.testing.assert_close(with_it(idx), without(idx), rtol=0, atol=0)


def test_gated_value_residual_mixes_about_18_percent_of_v0_at_init():
    """#569: g_l = -1.5, sigmoid(-1.5) = 0.1824; layer 0 (the source of v0) has no gate.
    Checked on the values layer 3's attention actually used: 0.8176 v_3 + 0.1824 v_0."""
    model = perturbed(GPT(ModelConfig(**BASE, value_residual=True, value_residual_mode="gated")))
    fresh = GPT(ModelConfig(**BASE, value_residual=True, value_residual_mode="gated"))
    assert fresh.blocks[0].attn.value_gate is None and fresh.blocks[0].attn.value_mix is None
    for block in fresh.blocks[1:]:
        assert torch.sigmoid(block.attn.value_gate).item() == pytest.approx(0.1824, abs=1e-4)
        assert block.attn.value_mix is None
    with torch.no_grad():
        model.blocks[3].attn.value_gate.fill_(-1.5)
    seen = {}
    for i in (0, 3):
        model.blocks[i].attn.v.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(f"raw{i}", out))
    import pgolf_core.attention as attention

    used = {}
    original = attention.causal_attention

    def spy(q, k, v, mask=None, *args):
        used.setdefault("v", []).append(v)
        return original(q, k, v, mask, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "causal_attention", spy)
        model(ids_with_bos())
    B, K, T, E = used["v"][3].shape
    v3 = used["v"][3].transpose(1, 2).reshape(B, T, K * E)
    w = 1 / (1 + 2.718281828459045 ** 1.5)  # sigmoid(-1.5) = 0.1824
    torch.testing.assert_close(v3, (1 - w) * seen["raw3"] + w * seen["raw0"], rtol=1e-5, atol=1e-6)


def test_bigram_bucket_depends_on_the_current_and_previous_token_only():
    model = GPT(ModelConfig(**BASE, bigram_buckets=2048, bigram_dim=8))
    idx = torch.tensor([[5, 3, 9, 1, 7, 7, 60]])
    buckets = model.bigram.bucket_ids(idx)[0].tolist()
    assert buckets[0] == 2047 and buckets[3] == 2047  # no previous token; a BOS never sees the last document
    assert buckets[1] == ((36313 * 3) ^ (27191 * 5)) % 2047  # the records' hash, worked by hand
    assert buckets[6] == ((36313 * 60) ^ (27191 * 7)) % 2047
    assert max(buckets[i] for i in (1, 2, 4, 5, 6)) < 2047
    torch.manual_seed(0)
    idx = torch.randint(2, 64, (4, 30))
    base = model.bigram.bucket_ids(idx)
    for t in range(1, 29):
        for moved, should_change in ((t + 1, False), (t - 2, False), (t, True), (t - 1, True)):
            if moved < 0:
                continue
            changed = idx.clone()
            changed[:, moved] = (changed[:, moved] + 7) % 62 + 2
            equal = torch.equal(model.bigram.bucket_ids(changed)[:, t], base[:, t])
            assert equal != should_change, (t, moved)


def test_channel_smear_gate_never_mixes_across_bos():
    model = perturbed(GPT(ModelConfig(**BASE, smear_gate=True, smear_gate_mode="channel")))
    idx = torch.randint(2, 64, (1, 10))
    idx[0, 5] = 1
    other = idx.clone()
    other[0, 4] = (other[0, 4] + 1) % 62 + 2  # the token before the BOS
    a, b = model.embed(idx), model.embed(other)
    torch.testing.assert_close(a[0, 5], b[0, 5], rtol=0, atol=0)  # BOS does not see the previous document
    torch.testing.assert_close(a[0, 5], torch.nn.functional.rms_norm(model.tok_emb.weight[1], (32,)),
                               rtol=0, atol=0)  # and it is its own embedding, unmixed
    changed_after = idx.clone()
    changed_after[0, 5 + 1] = (changed_after[0, 6] + 1) % 62 + 2
    assert not torch.equal(model.embed(changed_after)[0, 7], a[0, 7])  # and live after the BOS


def test_gptj_block_reads_the_block_input_in_both_branches():
    """GPT-J form: the MLP's input is the block input, not x + attention; so with the
    attention's output projection zeroed, switching the form on changes nothing, and
    with it perturbed, it does."""
    torch.manual_seed(0)
    plain = perturbed(GPT(ModelConfig(**BASE)))
    gptj = GPT(ModelConfig(**BASE, parallel_mode="gptj", parallel_start=3))
    gptj.load_state_dict(plain.state_dict())
    idx = ids_with_bos()
    assert not torch.equal(gptj(idx), plain(idx))
    with torch.no_grad():
        for model in (plain, gptj):
            for block in model.blocks[3:]:
                block.attn.out.weight.zero_()
    torch.testing.assert_close(gptj(idx), plain(idx), rtol=0, atol=0)


def test_new_parameters_go_to_the_right_optimizer_group():
    model = GPT(ModelConfig(**BASE, **ALL_SEEDS))
    names = {id(p): n for n, p in model.named_parameters()}
    roles = {role: {names[id(p)] for p in ps} for role, ps in param_groups(model).items()}
    assert {"bigram.table.weight", "value_embed2.weight"} <= roles["embedding"]  # Adam, the embedding's lr
    assert {"bigram.proj.weight", "value_proj2.weight"} <= roles["matrices"]  # Muon
    assert {"bigram.scale", "smear_channel", "blocks.1.attn.value_gate",
            "blocks.2.attn.value_embed_scale"} <= roles["scalars"]


@pytest.mark.parametrize("looping", [False, True])
def test_seed_switches_trace_as_one_graph(looping):
    torch._dynamo.reset()
    model = GPT(ModelConfig(**BASE, **RECORD_WITH_SEEDS, low_precision_residual=True))
    idx = ids_with_bos(2, 16)
    explanation = torch._dynamo.explain(model)(idx, torch.roll(idx, -1, 1), looping=looping)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(idx, torch.roll(idx, -1, 1), looping=looping)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_train_config_carries_the_switches_and_names_bad_values():
    cfg = build_section("train", {"model": dict(
        parallel_mode="gptj", value_residual=True, value_residual_mode="gated", bigram_buckets=2048, bigram_dim=64,
        smear_gate=True, smear_gate_mode="channel", value_embed_layers=[2, 3], value_embed_tables=2)})
    model = cfg.model.with_vocab(1024)
    assert (model.parallel_mode, model.value_residual_mode, model.bigram_buckets, model.bigram_dim,
            model.smear_gate_mode, model.value_embed_tables) == ("gptj", "gated", 2048, 64, "channel", 2)
    for bad, key in ((dict(value_residual_mode="sigmoid"), "train.model.value_residual_mode"),
                     (dict(smear_gate_mode="per_channel"), "train.model.smear_gate_mode"),
                     (dict(parallel_mode="gpt-j"), "train.model.parallel_mode"),
                     (dict(value_embed_tables=3), "train.model.value_embed_tables"),
                     (dict(value_embed_tables=2), "train.model.value_embed_layers"),
                     (dict(bigram_buckets=1), "train.model.bigram_buckets"),
                     (dict(bigram_buckets=64, bigram_dim=0), "train.model.bigram_dim")):
        with pytest.raises(ValueError, match=key):
            build_section("train", {"model": bad})
    with pytest.raises(ValueError, match="value_embed_tables"):
        ModelConfig(**BASE, value_embed_tables=2)
    assert ModelConfig.from_json(ModelConfig(**BASE, **ALL_SEEDS).to_json()) == ModelConfig(**BASE, **ALL_SEEDS)
