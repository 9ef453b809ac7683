"""The model's formulas pinned against a plain float64 reference.

`reference_logits` below is written from TECHNIQUES.md §2 (and §3.2 / §3.4 for Muon and
the EMA), not from pgolf_core: it reads the model's parameters by name and recomputes
the logits token by token, head by head, with every constant spelt out here (the gate's
12 input channels, the value embedding's 0.1, BigramHash's multipliers, ...), so that a
wrong lane, gate, norm scale or gain placement in the model shows up as a mismatch even
where "every parameter gets a gradient" would still pass. Each record feature is
compared on its own and all together, on random inputs, with parameters perturbed off
their initial values (zero-initialised projections would hide most of the formulas).
"""

import math

import pytest
import torch

from pgolf_core.config import ModelConfig

from pgolf_core.model import GPT
from pgolf_core.optim import Muon, orthogonalize
from pgolf_core.train import ema_update

BASE = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)
BOS = 1


# --------------------------------------------------------------------------- reference


def rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def rotate(x, dims, base):
    """Partial RoPE (§2.3): channel i < dims/2 pairs with i + dims/2, frequency
    base^(-2i/dims), angle t * frequency; channels >= dims untouched. x: (T, E)."""
    out = x.clone()
    half = dims // 2
    for t in range(x.shape[0]):
        for i in range(half):
            angle = t * base ** (-2.0 * i / dims)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + half]
            out[t, i], out[t, i + half] = a * c - b * s, a * s + b * c
    return out


def allowed(idx_row, t, s, doc_mask):
    """Causal; with the document mask, also no BOS in (s, t]."""
    if s > t:
        return False
    return not doc_mask or not any(int(idx_row[u]) == BOS for u in range(s + 1, t + 1))


def reference_attention(cfg, P, layer, a, idx, v0, ve):
    """One layer's attention on a = RMSNorm(x_in) * s_l (B, T, D) -> (output, raw v)."""
    B, T, D = a.shape
    H, K = cfg.num_heads, cfg.num_kv_heads
    E, G = D // H, H // K
    pre = f"blocks.{layer}.attn."
    q = (a @ P[pre + "q.weight"].T).view(B, T, H, E)
    k = (a @ P[pre + "k.weight"].T).view(B, T, K, E)
    v_raw = a @ P[pre + "v.weight"].T
    v = v_raw
    if layer in cfg.value_embed_layers:
        scale = P[pre + "value_embed_scale"]
        if cfg.value_embed_tables == 2:
            v = v + 0.1 * (scale[0] * ve[0] + scale[1] * ve[1])
        else:
            v = v + 0.1 * scale[0] * ve
    if cfg.value_residual and layer > 0:
        if cfg.value_residual_mode == "gated":  # #569: (1 - sig(g)) v + sig(g) v0
            w = sigmoid(P[pre + "value_gate"][0])
            v = (1 - w) * v + w * v0
        else:
            lam = P[pre + "value_mix"]
            v = lam[0] * v0 + lam[1] * v
    v = v.view(B, T, K, E)
    dims = cfg.rope_dims or E
    y = torch.zeros(B, T, H, E, dtype=a.dtype)
    for b in range(B):
        for h in range(H):
            g = h // G  # the KV head of query head h's group
            qh = rotate(rms(q[b, :, h]), dims, cfg.rope_base)  # QK-norm first, then positions
            kh = rotate(rms(k[b, :, g]), dims, cfg.rope_base)
            if cfg.qk_gain_init:
                qh = qh * P[pre + "qk_gain"][h]  # the gain after the norm: it sets the logit scale
            scores = qh @ kh.T / math.sqrt(E)
            for t in range(T):
                keep = torch.tensor([allowed(idx[b], t, s, cfg.doc_mask) for s in range(T)])
                p = torch.softmax(scores[t].masked_fill(~keep, float("-inf")), dim=0)
                out = p @ v[b, :, g]
                if layer >= cfg.num_layers - cfg.xsa_last_n:  # XSA: drop the own-value component
                    unit = v[b, t, g] / v[b, t, g].norm()
                    out = out - (out @ unit) * unit
                if cfg.attn_gate:  # sparse gate: sig(c * W a[:12]) per head
                    out = out * sigmoid(cfg.attn_gate_scale * (P[pre + "gate"][h] @ a[b, t, :12]))
                y[b, t, h] = out
    return y.reshape(B, T, D) @ P[pre + "out.weight"].T, v_raw


def reference_mlp(cfg, P, layer, h):
    z = h @ P[f"blocks.{layer}.mlp.up.weight"].T
    if cfg.mlp_activation == "leaky_relu2":
        z = torch.where(z > 0, z, 0.5 * z) ** 2
    else:
        z = torch.where(z > 0, z, 0.0) ** 2
    return z @ P[f"blocks.{layer}.mlp.down.weight"].T


def reference_embedding(cfg, P, idx):
    """x0 (§2.7): E[ids] (+ BigramHash), smeared (never at a BOS), then RMSNorm."""
    B, T = idx.shape
    x = P["tok_emb.weight"][idx]
    if cfg.bigram_buckets:
        n = cfg.bigram_buckets
        buckets = torch.full((B, T), n - 1, dtype=torch.long)
        for b in range(B):
            for t in range(1, T):
                cur, prev = int(idx[b, t]), int(idx[b, t - 1])
                if cur != BOS:
                    buckets[b, t] = ((36313 * cur) ^ (27191 * prev)) % (n - 1)
        feature = P["bigram.table.weight"][buckets] @ P["bigram.proj.weight"].T
        x = x + P["bigram.scale"][0] * feature
    if cfg.smear_gate:
        smeared = x.clone()
        for b in range(B):
            for t in range(1, T):
                if int(idx[b, t]) == BOS:
                    continue
                if cfg.smear_gate_mode == "channel":  # 03-19: (1 - sig(g)) x_t + sig(g) x_{t-1}
                    w = sigmoid(P["smear_channel"])
                    smeared[b, t] = (1 - w) * x[b, t] + w * x[b, t - 1]
                else:  # 04-16: x_t + lambda * sig(w . x_t[:12]) x_{t-1}
                    w = P["smear_lambda"][0] * sigmoid(P["smear_w"] @ x[b, t, :12])
                    smeared[b, t] = x[b, t] + w * x[b, t - 1]
        x = smeared
    return rms(x)


def reference_sequence(cfg, looping):
    """§2.5: [0..ls-1] + [ls..le] * (n+1) + [le+1..L-1]; the U-Net encoder is the first half."""
    L = cfg.num_layers
    if looping and cfg.num_loops:
        ls, le = cfg.loop_start, cfg.loop_end
        seq = list(range(ls)) + list(range(ls, le + 1)) * (cfg.num_loops + 1) + list(range(le + 1, L))
    else:
        seq = list(range(L))
    if not cfg.unet_skips:
        return [], seq
    return seq[: len(seq) // 2], seq[len(seq) // 2 :]


def reference_logits(model: GPT, idx: torch.Tensor, looping: bool | None = None) -> torch.Tensor:
    """The model's logits from its weights by the formulas above; `looping` as GPT.forward takes it."""
    cfg = model.cfg
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    x0 = reference_embedding(cfg, P, idx)
    ve = None
    if cfg.value_embed_layers:
        ve = P["value_embed.weight"][idx] @ P["value_proj.weight"].T
        if cfg.value_embed_tables == 2:
            ve = (ve, P["value_embed2.weight"][idx] @ P["value_proj2.weight"].T)

    def scale(layer):  # LN scale 1/sqrt(l+1), l the physical layer (§2.2)
        return 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0

    def mixed(layer, x):
        if not cfg.resid_mix:
            return x
        m = P[f"blocks.{layer}.mix"]
        return m[0] * x + m[1] * x0

    def attn(layer, x_in, v0):
        out, v = reference_attention(cfg, P, layer, rms(x_in) * scale(layer), idx, v0, ve)
        return P[f"blocks.{layer}.attn_scale"] * out, v

    def mlp(layer, x):
        return P[f"blocks.{layer}.mlp_scale"] * reference_mlp(cfg, P, layer, rms(x) * scale(layer))

    encoder, decoder = reference_sequence(cfg, cfg.num_loops > 0 if looping is None else looping)
    x, v0, skips, lanes = x0, None, [], None
    for layer in encoder:
        x_in = mixed(layer, x)
        a, v = attn(layer, x_in, v0)
        x = x_in + a
        x = x + mlp(layer, x)
        v0 = v if v0 is None else v0
        skips.append(x)
    for j, layer in enumerate(decoder):
        parallel = cfg.parallel_mode != "none" and layer >= cfg.parallel_start
        if parallel and cfg.parallel_mode == "routed" and lanes is None:
            lanes = [x, x]  # §2.6, 04-10+: split first; this layer's skip goes to lane 0 only
        if j < len(encoder):  # §2.4: lerp(w * skip, x, sig(g)), into lane 0 once split
            w, g = P["skip_weights"][j], sigmoid(P["skip_gates"][j])
            skip = skips.pop()
            if lanes is None:
                x = g * x + (1 - g) * w * skip
            else:
                lanes[0] = g * lanes[0] + (1 - g) * w * skip
        if parallel and cfg.parallel_mode == "merge" and lanes is None:
            lanes = [x, x]  # #1477: the skip is added to the stream, then it splits
        if lanes is not None:
            attn_in = mixed(layer, lanes[0])
            a, v = attn(layer, attn_in, v0)
            m = mlp(layer, lanes[1])
            if cfg.parallel_mode == "merge":  # #1477: each branch to its own lane
                lanes = [attn_in + a, lanes[1] + m]
            else:  # routed (04-10+): rho * lane + P[branch, lane] * branch
                rho, R = P["lane_keep"][layer], P["lane_route"][layer]
                lanes = [rho[0] * lanes[0] + R[0, 0] * a + R[1, 0] * m,
                         rho[1] * lanes[1] + R[0, 1] * a + R[1, 1] * m]
        elif parallel:  # GPT-J (§2.6): x_in + A(N(x_in)) + M(N(x_in))
            x_in = mixed(layer, x)
            a, v = attn(layer, x_in, v0)
            x = x_in + a + mlp(layer, x_in)
        else:
            x_in = mixed(layer, x)
            a, v = attn(layer, x_in, v0)
            x = x_in + a
            x = x + mlp(layer, x)
        v0 = v if v0 is None else v0
    if lanes is not None:
        if cfg.parallel_mode == "merge":
            lam = P["lane_merge"][0]
            x = lam * lanes[0] + (1 - lam) * lanes[1]
        else:
            x = (lanes[0] + lanes[1]) / 2
    logits = rms(x) @ P["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


# --------------------------------------------------------------------------- comparisons


def perturbed(model: GPT) -> GPT:
    """Every parameter moved off its initial value (zeros, ones, 0.5s), so that each
    gate, scale and projection takes part in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def random_ids(B=2, T=10):
    idx = torch.randint(2, BASE["vocab_size"], (B, T))
    idx[0, 4] = BOS  # a document boundary inside a row
    idx[1, 0] = BOS
    return idx


FEATURES = {
    "plain": dict(),
    "leaky_relu2": dict(mlp_activation="leaky_relu2"),
    "ln_scale": dict(ln_scale=True),
    "qk_gain": dict(qk_gain_init=5.0),
    "partial_rope": dict(rope_dims=4),
    "xsa": dict(xsa_last_n=3),
    "resid_mix": dict(resid_mix=True),
    "unet_skips": dict(unet_skips=True),
    "smear_gate": dict(smear_gate=True),
    "attn_gate": dict(attn_gate=True, attn_gate_scale=0.5),
    "value_embed": dict(value_embed_layers=(4, 5), value_embed_dim=8),
    "value_residual": dict(value_residual=True),
    "doc_mask": dict(doc_mask=True),
    "loop": dict(unet_skips=True, loop_start=1, loop_end=2, num_loops=2),
    "merge_lanes": dict(parallel_mode="merge", parallel_start=3),
    "routed_lanes": dict(parallel_mode="routed", parallel_start=3),
    "merge_lanes_with_skips": dict(parallel_mode="merge", parallel_start=4, unet_skips=True, resid_mix=True),
    "routed_lanes_with_skips": dict(parallel_mode="routed", parallel_start=4, unet_skips=True, resid_mix=True),
    # the seeds' switches (issue 23)
    "gptj": dict(parallel_mode="gptj", parallel_start=3),
    "gptj_with_skips": dict(parallel_mode="gptj", parallel_start=4, unet_skips=True, resid_mix=True),
    "gated_value_residual": dict(value_residual=True, value_residual_mode="gated"),
    "bigram_hash": dict(bigram_buckets=7, bigram_dim=8),
    "channel_smear_gate": dict(smear_gate=True, smear_gate_mode="channel"),
    "two_value_tables": dict(value_embed_layers=(1, 4), value_embed_dim=8, value_embed_tables=2),
}
RECORD = dict(rope_dims=4, mlp_activation="leaky_relu2", qk_gain_init=5.0, ln_scale=True, resid_mix=True,
              unet_skips=True, xsa_last_n=6, smear_gate=True, attn_gate=True, attn_gate_scale=0.5,
              loop_start=1, loop_end=2, num_loops=2, doc_mask=True)
FEATURES["record_routed"] = dict(RECORD, parallel_mode="routed", parallel_start=4)
FEATURES["record_merge"] = dict(RECORD, parallel_mode="merge", parallel_start=4)
FEATURES["record_gptj_seeds"] = dict(RECORD, parallel_mode="gptj", parallel_start=4, value_residual=True,
                                     value_residual_mode="gated", bigram_buckets=7, bigram_dim=8,
                                     smear_gate_mode="channel", value_embed_layers=(0, 5), value_embed_dim=8,
                                     value_embed_tables=2)


CASES = [(name, False) for name in sorted(FEATURES)] + \
        [(name, True) for name in sorted(FEATURES) if FEATURES[name].get("num_loops")]


@pytest.mark.parametrize("name, looping", CASES)
def test_model_matches_the_float64_reference(name, looping):
    features = FEATURES[name]
    torch.manual_seed(0)
    model = perturbed(GPT(ModelConfig(**BASE, **features))).double()
    idx = random_ids()
    with torch.no_grad():
        got = model(idx, looping=looping)
    expected = reference_logits(model, idx, looping)
    # the model returns float32 logits (the loss's dtype), hence not 1e-12
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1  # the comparison is not between two near-constant outputs


def test_reference_tells_the_lane_forms_apart():
    """The comparison has teeth: the same weights read as another lane form or without
    the LN scale give logits far from the model's."""
    torch.manual_seed(0)
    model = perturbed(GPT(ModelConfig(**BASE, **FEATURES["routed_lanes_with_skips"], ln_scale=True))).double()
    idx = random_ids()
    with torch.no_grad():
        got = model(idx)
    for wrong in (dict(parallel_mode="gptj"), dict(ln_scale=False)):
        other = GPT(ModelConfig(**{**BASE, **FEATURES["routed_lanes_with_skips"], "ln_scale": True, **wrong})).double()
        other.load_state_dict(model.state_dict(), strict=False)
        assert (reference_logits(other, idx) - got.double()).abs().max() > 1e-2, wrong


# --------------------------------------------------------------------------- optimizer, EMA

# TECHNIQUES.md §3.2, written out here rather than imported
QUINTIC = [(3.4445, -4.7750, 2.0315)] * 5
POLAR_EXPRESS = [(8.1566, -22.4833, 15.8788), (4.0429, -2.8089, 0.5000), (3.8917, -2.7725, 0.5061),
                 (3.2858, -2.3681, 0.4645), (2.3465, -1.7098, 0.4232)]


def reference_newton_schulz(u, table):
    wide = u.T if u.shape[0] > u.shape[1] else u
    x = wide / (torch.linalg.matrix_norm(wide) + 1e-7)
    for a, b, c in table:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if u.shape[0] > u.shape[1] else x


@pytest.mark.parametrize("name, table", [("quintic", QUINTIC), ("polar_express", POLAR_EXPRESS)])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_newton_schulz_matches_the_reference(name, table, shape):
    G = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(orthogonalize(G, 5, torch.float64, name), reference_newton_schulz(G, table),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("row_normalize", [False, True])
def test_muon_step_with_muoneq_r_matches_the_reference(row_normalize):
    """Two Muon steps: b <- mu b + g; u = g + mu b; (MuonEq-R) each row of u over its L2
    norm; Newton-Schulz; times sqrt(max(1, rows/cols)); W <- W (1 - lr wd) - lr update."""
    torch.manual_seed(1)
    shape, lr, mu, wd = (20, 12), 0.05, 0.9, 0.1
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    expected, buf = w.detach().clone(), torch.zeros(*shape, dtype=torch.float64)
    opt = Muon([w], lr=lr, momentum=mu, weight_decay=wd, ns_dtype=torch.float64,
               ns_coefficients="polar_express", row_normalize=row_normalize)
    for _ in range(2):
        g = torch.randn(*shape, dtype=torch.float64) * torch.linspace(0.1, 3.0, shape[0], dtype=torch.float64)[:, None]
        w.grad = g.clone()
        opt.step()
        buf = mu * buf + g
        u = g + mu * buf
        if row_normalize:
            u = u / torch.sqrt((u * u).sum(1, keepdim=True)).clamp_min(1e-7)
        update = reference_newton_schulz(u, POLAR_EXPRESS) * math.sqrt(max(1.0, shape[0] / shape[1]))
        expected = expected * (1 - lr * wd) - lr * update
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)


def test_row_normalization_changes_the_update():
    """Rows of very different norms: MuonEq-R's update differs from plain Muon's (so the
    test above compares two different formulas, not one twice)."""
    g = torch.randn(20, 12, dtype=torch.float64) * torch.linspace(0.1, 3.0, 20, dtype=torch.float64)[:, None]
    steps = []
    for flag in (False, True):
        w = torch.nn.Parameter(torch.zeros(20, 12, dtype=torch.float64))
        w.grad = g.clone()
        Muon([w], lr=1.0, momentum=0.0, ns_dtype=torch.float64, row_normalize=flag).step()
        steps.append(w.detach().clone())
    assert (steps[0] - steps[1]).abs().max() > 1e-2


def test_ema_update_matches_the_reference():
    """§3.4: e <- d e + (1 - d) w for every state-dict tensor, in float32, three steps."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**BASE, resid_mix=True))
    decay = 0.9
    ema = [v.detach().float().clone() for v in model.state_dict().values()]
    expected = [e.double() for e in ema]
    for _ in range(3):
        perturbed(model)
        ema_update(ema, model, decay)
        expected = [decay * e + (1 - decay) * v.double() for e, v in zip(expected, model.state_dict().values())]
    for e, x in zip(ema, expected):
        assert e.dtype == torch.float32
        torch.testing.assert_close(e.double(), x, rtol=1e-6, atol=1e-7)
