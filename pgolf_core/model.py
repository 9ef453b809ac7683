"""The GPT: pre-norm blocks, rotary positions, grouped-query attention, squared-ReLU
MLP, tied embeddings and a soft-capped output; plus the challenge records' features
(TECHNIQUES.md §2), each a `ModelConfig` switch that is off by default, so the plain
model is exactly the baseline.

Shapes: B batch, T time, D model_dim, V vocab. RMSNorm has no weight anywhere; the
learned per-channel `attn_scale` / `mlp_scale` gains weight each residual branch.
Output and down projections start at zero, so every block starts as the identity.
Features: U-Net skips with learned gates, depth recurrence (a span of layers re-run
in forward calls with `looping`), two forms of parallel residual lanes and GPT-J's
single-stream parallel block, layer-wise norm scale 1/sqrt(layer+1), a residual mix
with the embedding x0, SmearGate in two forms (never across a BOS), BigramHash,
LeakyReLU(0.5)^2, document-masked attention, and the attention options of
`attention.py`. Training's kernels (`kernels.Kernels`) are handed to the model at
construction; without them it runs the plain paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf_core.attention import Attention, rms_norm
from pgolf_core.config import GATE_INPUT_DIMS, ModelConfig
from pgolf_core.kernels import Kernels, attention_mask
from pgolf_core.loss import fused_softcap_nll, softcap, softcap_nll

LANE_MODES = ("merge", "routed")  # the parallel modes that split the stream into two lanes
# BigramHash's multipliers (TECHNIQUES.md §2.7, the 03-19..03-31 records): the bucket of
# position t is (36313 * tok_t XOR 27191 * tok_{t-1}) mod (buckets - 1).
BIGRAM_MUL_CURRENT, BIGRAM_MUL_PREVIOUS = 36313, 27191


def layer_sequence(cfg: ModelConfig, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder) physical layer indices. With recurrence on the span repeats:
    [0..s-1] + [s..e] * (num_loops + 1) + [e+1..L-1]; with U-Net skips the first half is
    the encoder. Without skips everything is "decoder"."""
    seq = list(range(cfg.num_layers))
    if looping and cfg.num_loops:
        span = list(range(cfg.loop_start, cfg.loop_end + 1))
        seq = seq[: cfg.loop_start] + span * (cfg.num_loops + 1) + seq[cfg.loop_end + 1 :]
    if not cfg.unet_skips:
        return [], seq
    half = len(seq) // 2
    return seq[:half], seq[half:]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()  # training's fused MLP, when resolved for it
        self.up = nn.Linear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, bias=False)
        self.slope = 0.5 if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.mlp_wanted(x):  # the same math, less memory traffic
            return self.kernels.mlp(x, self.up.weight, self.down.weight, self.slope)
        h = self.up(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.down(h.square())


class BigramHash(nn.Module):
    """A hashed table of (previous token, current token) pairs, projected to the model
    width and added to the token embedding (#569: 2,048 buckets; #687: 6,144; TECHNIQUES
    §2.7). It gives the first layer a bigram feature at the cost of one lookup, where the
    attention would otherwise spend capacity learning to copy the previous token.

    The bucket of position t reads tokens t and t-1 only (never the target t+1). Position
    0 and every BOS go to the last bucket, which no pair hashes to: a window's first token
    has no previous token, and a document's BOS must not see the previous document (the
    records only special-cased position 0; the BOS rule is the SmearGate fix of #1851
    applied here, so that a document-masked model stays document-independent).

    The table starts N(0, 0.02) and the projection at zero, so the model starts as the
    plain one and the projection gets gradient from the first step (a zero table too
    would leave both without gradient); `scale` (0.05, TECHNIQUES §2.7) is the learnable
    output scale."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.table = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.full((1,), 0.05))

    def bucket_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) bucket ids."""
        idx = idx.long()  # 36313 * 65535 overflows int32
        cur, prev = idx[:, 1:], idx[:, :-1]
        hashed = torch.bitwise_xor(BIGRAM_MUL_CURRENT * cur, BIGRAM_MUL_PREVIOUS * prev) % (self.buckets - 1)
        hashed = hashed.masked_fill(cur == self.bos_id, self.buckets - 1)
        return torch.cat([torch.full_like(idx[:, :1], self.buckets - 1), hashed], dim=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(self.table(self.bucket_ids(idx)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or Kernels()
        self.attn = Attention(cfg, layer, flash_attn=kernels.flash_attn)
        self.mlp = MLP(cfg, kernels)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.mix = nn.Parameter(torch.stack([torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)])) \
            if cfg.resid_mix else None

    def mixed(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            return x
        mix = self.mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def attn_branch(self, x: torch.Tensor, v0, value_embed, mask) -> tuple[torch.Tensor, torch.Tensor]:
        y, v = self.attn(rms_norm(x) * self.norm_scale, v0, value_embed, mask)
        return self.attn_scale.to(x.dtype) * y, v

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)

    def forward(self, x, x0, v0=None, value_embed=None, mask=None,
                single_stream: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`single_stream`: the GPT-J parallel form (04-06 #1412 / 04-09 #1493, TECHNIQUES
        §2.6): attention and MLP both read the block input and add to the one residual,
        x + A(N(x)) + M(N(x)), instead of the MLP reading x + A(N(x)). The two branches
        no longer wait for each other, and the records found it narrowed the
        quantization gap."""
        x = self.mixed(x, x0)
        a, v = self.attn_branch(x, v0, value_embed, mask)
        if single_stream:
            return x + a + self.mlp_branch(x), v
        x = x + a
        return x + self.mlp_branch(x), v


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        """`kernels`: training's, from `dispatch.resolve_kernels`; None: the plain set (SDPA,
        the plain MLP and loss), what evaluation, calibration and loading a checkpoint build."""
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"vocab_size={cfg.vocab_size}: a model needs its tokenizer's vocabulary "
                             "(ModelConfig.with_vocab; train.model.vocab_size 0 means the tokenizer's)")
        self.cfg = cfg
        self.kernels = kernels or Kernels()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, i, self.kernels) for i in range(cfg.num_layers))
        self.head_input = nn.Identity()  # the output head's normalised input, where GPTQ calibration hooks in
        num_skips = max(min(len(e), len(d)) for e, d in (layer_sequence(cfg, False), layer_sequence(cfg, True)))
        if cfg.unet_skips:
            self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
            self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim))
        if cfg.smear_gate and cfg.smear_gate_mode == "input":
            self.smear_w = nn.Parameter(torch.zeros(GATE_INPUT_DIMS))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        elif cfg.smear_gate:  # "channel" (03-19, #65; in #569): sigmoid(0) = an even mix at start, as there
            self.smear_channel = nn.Parameter(torch.zeros(cfg.model_dim))
        if cfg.bigram_buckets:
            self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, cfg.bos_id)
        if cfg.value_embed_layers:
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.value_embed_dim)
            self.value_proj = nn.Linear(cfg.value_embed_dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        if cfg.value_embed_tables == 2:  # #1453: a second table, weighed by its own scale in each layer
            self.value_embed2 = nn.Embedding(cfg.vocab_size, cfg.value_embed_dim)
            self.value_proj2 = nn.Linear(cfg.value_embed_dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        if cfg.parallel_mode == "merge":
            self.lane_merge = nn.Parameter(torch.full((1,), 0.5))
        elif cfg.parallel_mode == "routed":
            self.lane_keep = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
            self.lane_route = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding N(0, embed_init_std); Q, K, V, up orthogonal; out and down zero;
        value embeddings N(0, 0.01) and the BigramHash table N(0, 0.02), each with a zero
        projection (so each starts as the plain model)."""
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.embed_init_std)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                nn.init.orthogonal_(linear.weight)
            nn.init.zeros_(block.attn.out.weight)
            nn.init.zeros_(block.mlp.down.weight)
        if self.cfg.value_embed_layers:
            nn.init.normal_(self.value_embed.weight, std=0.01)
            nn.init.zeros_(self.value_proj.weight)
        if self.cfg.value_embed_tables == 2:
            nn.init.normal_(self.value_embed2.weight, std=0.01)
            nn.init.zeros_(self.value_proj2.weight)
        if self.cfg.bigram_buckets:
            nn.init.normal_(self.bigram.table.weight, std=0.02)
            nn.init.zeros_(self.bigram.proj.weight)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) normalized embeddings x0: the token embedding plus the
        BigramHash feature, smeared with the previous token."""
        x = self.tok_emb(idx)
        if self.cfg.bigram_buckets:
            x = x + self.bigram(idx)
        if self.cfg.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the records' bf16 stream: half the bytes per pass
        if self.cfg.smear_gate and self.cfg.smear_gate_mode == "channel":
            # a fixed per-channel mix with the previous token; where the current token is a
            # BOS the weight is 0, so a document never sees the one before it
            gate = torch.sigmoid(self.smear_channel.to(x.dtype)) * (idx[:, 1:, None] != self.cfg.bos_id)
            x = torch.cat([x[:, :1], torch.lerp(x[:, 1:], x[:, :-1], gate)], dim=1)
        elif self.cfg.smear_gate:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(x[..., :GATE_INPUT_DIMS] @ self.smear_w.to(x.dtype))  # (B, T)
            gate = gate * (idx != self.cfg.bos_id)  # a document's BOS never sees the previous document
            x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:, None] * x[:, :-1]], dim=1)
        return rms_norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                looping: bool | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> soft-capped logits (B, T, V) in float32, or, given `targets`
        (B, T), the per-token NLL (B, T): the loss is then part of the compiled graph, so
        the float32 logits of the whole batch never reach memory. `looping`: run the
        recurrence (the trainer switches it on part-way); None: whenever the config has
        one, as evaluation runs the model. A Python bool, so torch.compile builds one graph
        per loop state. `select` (B, K): only those positions of each row reach the head
        (logits (B, K, V); `targets` then (B, K)): document LoRA scores 48 positions of
        windows up to 2,048 long and a sliding window 64, and the head and the loss over
        the others would be about an eighth of the record model's work and its largest
        tensors."""
        x = x0 = self.embed(idx)
        value_embed = self.value_proj(self.value_embed(idx)) if self.cfg.value_embed_layers else None
        if self.cfg.value_embed_tables == 2:  # (2, B, T, K*E): the attention weighs each with its own scale
            value_embed = torch.stack([value_embed, self.value_proj2(self.value_embed2(idx))])
        mask = attention_mask(idx, self.cfg.bos_id, self.cfg.doc_mask, self.kernels.flash_attn)
        encoder, decoder = layer_sequence(self.cfg, self.cfg.num_loops > 0 if looping is None else looping)
        skips, v0, lanes = [], None, None
        for i in encoder:
            x, v = self.blocks[i](x, x0, v0, value_embed, mask)
            v0 = v if v0 is None else v0
            skips.append(x)
        for j, i in enumerate(decoder):
            parallel = self.cfg.parallel_mode != "none" and i >= self.cfg.parallel_start
            splits_here = lanes is None and parallel and self.cfg.parallel_mode in LANE_MODES
            if splits_here and self.cfg.parallel_mode == "routed":
                # 04-10+: the lanes split before the first parallel layer's skip, which goes
                # to lane 0 only, as every later one; #1477 ("merge") adds it before splitting
                lanes = [x, x]
            if j < len(encoder):  # U-Net: decoder step j takes the most recent encoder output
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                gate = torch.sigmoid(self.skip_gates[j]).to(x.dtype)
                if lanes is None:
                    x = torch.lerp(skip, x, gate)
                else:
                    lanes[0] = torch.lerp(skip, lanes[0], gate)
            if lanes is not None or splits_here:
                lanes = lanes or [x, x]
                lanes, v = self._parallel_block(i, lanes, x0, v0, value_embed, mask)
            else:
                x, v = self.blocks[i](x, x0, v0, value_embed, mask, single_stream=parallel)
            v0 = v if v0 is None else v0
        if lanes is not None:
            x = self._merge_lanes(lanes)
        h = rms_norm(x)
        if select is not None:
            h = h.gather(1, select[..., None].expand(-1, -1, h.size(-1)))
        logits = F.linear(self.head_input(h), self.tok_emb.weight)
        cap = self.cfg.logit_softcap
        if targets is None:
            return softcap(logits, cap)
        if self.kernels.loss_wanted(logits, cap):  # the same loss in two Triton kernels
            return self.kernels.loss(logits, targets, cap)
        return (fused_softcap_nll if torch.is_grad_enabled() else softcap_nll)(logits, targets, cap)

    def _parallel_block(self, i: int, lanes: list, x0, v0, value_embed, mask) -> tuple[list, torch.Tensor]:
        """One layer on two lanes: attention reads (mixed) lane 0, the MLP reads lane 1.
        "merge" (#1477) adds each branch to its own lane; "routed" (the record) routes
        both branch outputs into both lanes with learned weights."""
        block = self.blocks[i]
        attn_in = block.mixed(lanes[0], x0)
        a, v = block.attn_branch(attn_in, v0, value_embed, mask)
        m = block.mlp_branch(lanes[1])
        if self.cfg.parallel_mode == "merge":
            return [attn_in + a, lanes[1] + m], v
        dtype = lanes[0].dtype
        keep, route = self.lane_keep[i].to(dtype), self.lane_route[i].to(dtype)  # (2,), (branch, lane)
        return [keep[0] * lanes[0] + route[0, 0] * a + route[1, 0] * m,
                keep[1] * lanes[1] + route[0, 1] * a + route[1, 1] * m], v

    def _merge_lanes(self, lanes: list) -> torch.Tensor:
        if self.cfg.parallel_mode == "merge":
            merge = self.lane_merge.to(lanes[0].dtype)
            return merge * lanes[0] + (1 - merge) * lanes[1]
        return 0.5 * (lanes[0] + lanes[1])

