"""Typed configuration: `params.yaml` sections -> frozen dataclasses.

The only module that reads YAML. Each stage loads its own section; an unknown key is
rejected with the nearest valid key named, and a wrongly typed value names the key,
the value found and the type expected. `dvc exp run -S` edits params.yaml, so this is
the one override path (no env vars, no CLI flags for hyperparameters).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

EVAL_MODES = ("nonoverlap", "sliding", "ttt_sgd", "ttt_lora", "ttt_phased")
LORA_TARGETS = ("q", "k", "v", "o", "up", "down", "head", "o_side", "mlp_side")  # eval.lora: target_weights, SIDE_SITES
TOKENIZE_SOURCES = ("embedded", "jsonl", "docs_cache", "published")
COMPRESSORS = ("zlib", "lzma", "brotli", "zstd")  # the default set: pure Python wheels, always available
ALL_COMPRESSORS = (*COMPRESSORS, "lrzip")  # lrzip (ZPAQ) runs the system binary, where one exists
LAYOUT_ORDERS = ("row", "col")  # layouts: an order, then optionally "+nn" and/or "+shuffle" (artifact_layout)
EVAL_COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: dynamo's and AOTAutograd's graphs, run eagerly
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # no CUDA-graph modes: the host already runs ahead of the GPU
QUANT_METHODS = ("rtn", "gptq", "gptq_lite")
CLIP_METHODS = ("percentile", "sdclip")
SCRIPT_PAYLOADS = ("base85", "latin1")  # bundle.self_extracting
CHALLENGE_ARTIFACT_BYTES = 16_000_000  # the challenge's cap, decimal, code included: a params value may only lower it


@dataclass(frozen=True, kw_only=True)
class CategoryBits:
    """Integer width per weight category (`quant.category_of`): the records spend more
    bits where a rounding error costs more (int7/int8 tied embedding, int6 matrices;
    #1453: int7 attention, int5 MLP)."""

    attention: int = 8
    mlp: int = 8
    embedding: int = 8
    other: int = 8  # matrices of no named category (value embeddings, their projection)

    def __post_init__(self):
        for name in ("attention", "mlp", "embedding", "other"):
            if getattr(self, name) not in (5, 6, 7, 8):
                raise ValueError(f"quantize.bits.{name}={getattr(self, name)}: must be 5, 6, 7 or 8")


@dataclass(frozen=True, kw_only=True)
class CategoryClip:
    """SDClip's k per category: a row's clip is k standard deviations (TECHNIQUES §4.2;
    the 04-27 record's values as defaults). Larger k, coarser grid, fewer bytes."""

    attention: float = 13.0
    mlp: float = 11.5
    embedding: float = 14.0
    other: float = 12.85  # the single k of the 04-05 record's matrices

    def __post_init__(self):
        for name in ("attention", "mlp", "embedding", "other"):
            if not getattr(self, name) > 0:
                raise ValueError(f"quantize.sdclip_k.{name}={getattr(self, name)}: must be positive")


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    source: str = "embedded"  # "embedded" (stdlib text), "jsonl", "docs_cache" or "published" (hub)
    jsonl_path: str = ""  # a JSONL of {"text": ...} documents when source == "jsonl"
    hub_repo: str = ""  # HF dataset repo for the hub sources ("" = the challenge's, per source)
    hub_dataset: str = "fineweb10B_sp8192"  # source "published": the manifest's dataset name
    hub_revision: str = "main"  # branch, tag or commit; pin a commit for reproducible runs
    train_shards: int = 80  # source "published": how many train shards to fetch
    val_documents: int = 250  # the first N documents are the validation split
    max_documents: int = 0  # keep only the first N documents (0 = all); for quick profiles
    min_doc_chars: int = 200  # embedded corpus: shorter docstrings are dropped
    vocab_size: int = 1024  # SentencePiece BPE vocabulary (8192 in the GPU profiles)
    # "caseops": factor letter case into operators (lossless). On the CPU pipeline at equal
    # steps it lowered val_bpb by 0.033 (embedded corpus) and 0.043 (dev corpus), 2026-11-23
    case_transform: str = "none"
    shard_tokens: int = 10_000_000  # tokens per train shard file
    tokenizer_train_documents: int = 0  # train documents the tokenizer learns from (0 = all)
    num_threads: int = 2  # SentencePiece training threads
    num_workers: int = 2  # processes encoding documents into shards

    def __post_init__(self):
        _choice("tokenize.source", self.source, TOKENIZE_SOURCES)
        _choice("tokenize.case_transform", self.case_transform, ("none", "caseops"))
        if self.case_transform == "caseops" and self.source == "published":
            raise ValueError("tokenize.case_transform 'caseops' needs text: it cannot apply to the "
                             "published (already tokenized) shards; use source 'docs_cache'")
        if self.source == "jsonl" and not self.jsonl_path:
            raise ValueError("tokenize.jsonl_path is empty but tokenize.source is 'jsonl'")
        _positive("tokenize.val_documents", self.val_documents)
        if self.train_shards < 0:
            raise ValueError(f"tokenize.train_shards={self.train_shards}: must be >= 0")
        _positive("tokenize.shard_tokens", self.shard_tokens)
        _positive("tokenize.num_threads", self.num_threads)
        _positive("tokenize.num_workers", self.num_workers)
        if self.tokenizer_train_documents < 0:
            raise ValueError(f"tokenize.tokenizer_train_documents={self.tokenizer_train_documents}: must be >= 0")
        if not 260 < self.vocab_size <= 65536:
            raise ValueError(
                f"tokenize.vocab_size={self.vocab_size}: must exceed 260 (4 specials + 256 "
                "byte-fallback pieces) and fit uint16 shards (<= 65536)"
            )
        if self.max_documents and self.max_documents <= self.val_documents:
            raise ValueError(
                f"tokenize.max_documents={self.max_documents} leaves no training documents "
                f"after tokenize.val_documents={self.val_documents}"
            )


@dataclass(frozen=True, kw_only=True)
class NgramConfig:
    max_order: int = 3  # highest n-gram order counted and scored: 3, 4 or 5
    order3_buckets: int = 64  # hashed (t-2) buckets per previous token (order-3 contexts = vocab * this); power of two
    order4_buckets: int = 4  # hashed (t-3) buckets per order-3 context; power of two; read when max_order >= 4
    order5_buckets: int = 2  # hashed (t-4) buckets per order-4 context; power of two; read when max_order == 5
    max_memory_mib: int = 2048  # MiB cap on the count tables of all workers; hashed buckets fold to fit
    num_workers: int = 1  # counting processes, each a contiguous group of train shards (counts do not depend on it)

    def __post_init__(self):
        if self.max_order not in (3, 4, 5):
            raise ValueError(f"ngrams.max_order={self.max_order}: must be 3, 4 or 5")
        for name in ("order3_buckets", "order4_buckets", "order5_buckets"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"ngrams.{name}={value}: must be a power of two (1, 2, 4, ...)")
        _positive("ngrams.max_memory_mib", self.max_memory_mib)
        _positive("ngrams.num_workers", self.num_workers)

    @property
    def buckets(self) -> tuple[int, ...]:
        """Hashed buckets per context of orders 3..max_order."""
        return (self.order3_buckets, self.order4_buckets, self.order5_buckets)[: self.max_order - 2]


GATE_INPUT_DIMS = 12  # the sparse attention gate and the input SmearGate read the first 12 channels of their input
MLP_ACTIVATIONS = ("relu2", "leaky_relu2")
PARALLEL_MODES = ("none", "merge", "routed", "gptj")
SMEAR_GATE_MODES = ("input", "channel")
VALUE_RESIDUAL_MODES = ("linear", "gated")
BOS_ID = 1  # the challenge data's BOS (pgolf_core.tokenizer checks every tokenizer against it)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """`train.model`: the architecture, exactly what `model.GPT` takes (and what a model
    file's metadata records). Every feature of the records (TECHNIQUES.md §2) is a switch,
    off by default, so the plain model is the baseline."""

    vocab_size: int = 0  # 0: the tokenizer's (the train stage fills it in); otherwise it must equal it
    num_layers: int = 4
    model_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention: num_heads % num_kv_heads == 0
    mlp_mult: int = 4  # MLP hidden = mlp_mult * model_dim
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotary channels per head (0 = all; 16 of 64 in the record)
    logit_softcap: float = 30.0  # logits = c * tanh(logits / c)
    embed_init_std: float = 0.005  # the tied embedding's initial N(0, std)
    mlp_activation: str = "relu2"  # "relu2" or "leaky_relu2" (slope 0.5, squared)
    qk_gain_init: float = 0.0  # learned per-head query gain, initial value (0 = none; 5.0 record)
    ln_scale: bool = False  # normed block inputs scaled by 1/sqrt(layer + 1)
    resid_mix: bool = False  # block input = m0 * x + m1 * x0 (per channel; m0=1, m1=0 at init)
    unet_skips: bool = False  # encoder outputs feed the decoder through learned gates
    xsa_last_n: int = 0  # exclusive self-attention in the last N layers
    smear_gate: bool = False  # previous-token smear on the embeddings, never across a BOS
    # "input": x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1} (04-16, #1667);
    # "channel": x_t <- (1 - sigmoid(g)) * x_t + sigmoid(g) * x_{t-1}, g per channel (03-19, #65/#569)
    smear_gate_mode: str = "input"
    attn_gate: bool = False  # sparse sigmoid gate per head on the attention output
    attn_gate_scale: float = 1.0
    value_embed_layers: tuple = ()  # layers whose v gets a shared value embedding
    value_embed_dim: int = 128
    value_embed_tables: int = 1  # 1, or 2: two tables with a scale each per layer (#1453)
    value_residual: bool = False  # later layers mix layer 0's v into theirs
    value_residual_mode: str = "linear"  # "linear": l0 * v0 + l1 * v; "gated": lerp(v, v0, sigmoid(g)), g init -1.5 (#569)
    bigram_buckets: int = 0  # BigramHash buckets of (previous, current) token pairs (0 = off; 2048 in #569, 6144 in #687)
    bigram_dim: int = 128  # BigramHash table width (projected to model_dim)
    loop_start: int = 0  # depth recurrence: layers loop_start..loop_end re-run num_loops more times
    loop_end: int = 0
    num_loops: int = 0  # 0 = no recurrence (the field order is a model file's metadata order: kept)
    parallel_mode: str = "none"  # "none", "merge" (two lanes, learned merge), "routed" (learned routing) or "gptj" (one stream)
    parallel_start: int = 0  # first physical decoder layer run in parallel
    # GPU: the residual stream in bf16, like the records' bf16 weights: half its bytes, 17 % of
    # Inductor's elementwise bytes in the record step. On the CPU model under bf16 autocast it
    # cost nothing measurable (val_bpb +0.0002 +- 0.0024 over 3 seeds, 2026-11-23); the record-
    # scale curve (gpu_session.sh devf32residual) is still open. On in the record profiles.
    low_precision_residual: bool = False
    # Attention never crosses a BOS (the records' varlen attention, 04-10+). Off in the record
    # profiles until a GPU prices it: its FlexAttention path has never been timed
    # (`gpu_session.sh docmask docmaskoff devdocmask`, bench/NOTES.md item 7).
    doc_mask: bool = False
    bos_id: int = BOS_ID  # the id that starts every document (fixed by the data format)

    def __post_init__(self):
        object.__setattr__(self, "value_embed_layers", tuple(self.value_embed_layers))
        key = "train.model."
        if self.vocab_size < 0:
            raise ValueError(f"{key}vocab_size={self.vocab_size}: must be >= 0 (0 = the tokenizer's)")
        for name in ("num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "value_embed_dim",
                     "bigram_dim"):
            _positive(key + name, getattr(self, name))
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"{key}model_dim={self.model_dim} must split into {key}num_heads={self.num_heads} "
                             "heads of even size (rotary pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{key}num_heads={self.num_heads} is not a multiple of "
                             f"{key}num_kv_heads={self.num_kv_heads}")
        _choice(key + "mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _choice(key + "parallel_mode", self.parallel_mode, PARALLEL_MODES)
        _choice(key + "smear_gate_mode", self.smear_gate_mode, SMEAR_GATE_MODES)
        _choice(key + "value_residual_mode", self.value_residual_mode, VALUE_RESIDUAL_MODES)
        _choice(key + "value_embed_tables", self.value_embed_tables, (1, 2))
        if self.value_embed_tables == 2 and not self.value_embed_layers:
            raise ValueError(f"{key}value_embed_tables=2 needs {key}value_embed_layers: no layer would read the tables")
        if self.bigram_buckets < 0 or self.bigram_buckets == 1:
            raise ValueError(f"{key}bigram_buckets={self.bigram_buckets}: must be 0 (off) or at least 2 "
                             "(one bucket is position 0's)")
        if self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            raise ValueError(f"{key}rope_dims={self.rope_dims}: must be even and at most head_dim={self.head_dim}")
        if self.num_loops < 0:
            raise ValueError(f"{key}num_loops={self.num_loops}: must be >= 0 (0 = no recurrence)")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise ValueError(f"{key}loop_start..loop_end = {self.loop_start}..{self.loop_end} is not inside "
                             f"0..{self.num_layers - 1}")
        if ((self.smear_gate and self.smear_gate_mode == "input") or self.attn_gate) and self.model_dim < GATE_INPUT_DIMS:
            raise ValueError(f"gates read {GATE_INPUT_DIMS} channels; {key}model_dim={self.model_dim} is smaller")
        if any(not 0 <= i < self.num_layers for i in self.value_embed_layers):
            raise ValueError(f"{key}value_embed_layers={list(self.value_embed_layers)} outside 0..{self.num_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        """This config for a tokenizer of `vocab_size` pieces: fills in 0, refuses a mismatch."""
        if self.vocab_size not in (0, vocab_size):
            raise ValueError(f"train.model.vocab_size={self.vocab_size} but the tokenizer has {vocab_size} pieces "
                             "(set it to 0 to take the tokenizer's)")
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown} (written by a newer pgolf?)")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """`train.optimizer`: Muon on the 2-D block matrices, Adam on the embedding and the
    vectors, the gradient clip and the weight EMA."""

    matrix_lr: float = 0.02  # Muon, 2-D block matrices
    embed_lr: float = 0.03  # Adam, tied embedding
    scalar_lr: float = 0.02  # Adam, norms' gains and other vectors
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85  # momentum ramps linearly from this value
    muon_momentum_warmup_steps: int = 100
    ns_steps: int = 5  # Newton-Schulz iterations
    ns_coefficients: str = "quintic"  # "quintic" or "polar_express" (per-iteration tuples)
    muon_row_normalize: bool = False  # MuonEq-R: unit rows before Newton-Schulz
    # under torchrun, each process orthogonalizes its share of the matrices (same update); off
    # until bench/muon_shard.py shows a share's kernels save more than the all-gather costs
    muon_shard: bool = False
    weight_decay: float = 0.0  # decoupled, Muon matrices
    embed_weight_decay: float = 0.0  # decoupled (AdamW), the embedding
    scalar_weight_decay: float = 0.0  # decoupled (AdamW), the vectors and gates
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    # Under torchrun: clip each process's own gradient, then average (the 04-10+ records'
    # manual-comm optimizer, TECHNIQUES §7), instead of clipping the DDP average (04-08 and
    # before). Each process clips on its own norm, which exceeds the average's, so this
    # clips more. Its all-reduce waits for the backward instead of overlapping it.
    clip_before_all_reduce: bool = False
    ema_decay: float = 0.99  # EMA of weights; the EMA weights are what is saved (0 = off)

    def __post_init__(self):
        key = "train.optimizer."
        _positive(key + "ns_steps", self.ns_steps)
        _choice(key + "ns_coefficients", self.ns_coefficients, ("quintic", "polar_express"))
        for name in ("matrix_lr", "embed_lr", "scalar_lr", "weight_decay", "embed_weight_decay",
                     "scalar_weight_decay", "grad_clip", "muon_momentum_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key}{name}={getattr(self, name)}: must be >= 0")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "adam_beta1", "adam_beta2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{key}{name}={getattr(self, name)}: must lie in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """`train.schedule`: how long training runs and how the learning rate and the loop
    switch follow its progress (steps done, or wall-clock seconds used)."""

    mode: str = "steps"  # "steps" (comparable across machines) or "wallclock" (fills the cap)
    iterations: int = 250  # optimizer steps (mode "steps"; an upper bound in "wallclock")
    max_wallclock_seconds: float = 0.0  # hard cap on timed training (0 = none; 600 in the challenge)
    calib_reserve_seconds: float = 0.0  # of the cap, kept for GPTQ calibration (counts in the budget)
    warmup_steps: int = 0  # linear LR warm-up
    warmdown_frac: float = 0.4  # final fraction of the run with LR decaying linearly
    min_lr_frac: float = 0.0  # LR floor as a fraction of the peak
    loop_start_frac: float = 0.35  # fraction of training after which depth recurrence switches on

    def __post_init__(self):
        key = "train.schedule."
        _choice(key + "mode", self.mode, ("steps", "wallclock"))
        _positive(key + "iterations", self.iterations)
        if self.warmup_steps < 0:
            raise ValueError(f"{key}warmup_steps={self.warmup_steps}: must be >= 0")
        for name in ("warmdown_frac", "min_lr_frac", "loop_start_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{key}{name}={getattr(self, name)}: must lie in [0, 1]")
        if self.max_wallclock_seconds < 0 or self.calib_reserve_seconds < 0:
            raise ValueError(f"{key}max_wallclock_seconds and {key}calib_reserve_seconds must be >= 0")
        if self.max_wallclock_seconds and self.calib_reserve_seconds >= self.max_wallclock_seconds:
            raise ValueError(f"{key}calib_reserve_seconds={self.calib_reserve_seconds} leaves no training time "
                             f"in {key}max_wallclock_seconds={self.max_wallclock_seconds}")
        if self.mode == "wallclock" and self.max_wallclock_seconds <= 0:
            raise ValueError(f"{key}mode 'wallclock' needs {key}max_wallclock_seconds > 0")

    @property
    def train_seconds_cap(self) -> float:
        """Seconds of timed training: the wall-clock cap minus the calibration reserve."""
        return self.max_wallclock_seconds - self.calib_reserve_seconds


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """`train.runtime`: where and how the steps run, and what the run reports. None of
    these changes the math (kernels and compilation change summation order only)."""

    device: str = "auto"  # "auto", "cpu" or "cuda"
    compile: bool = False  # torch.compile the model (GPU profiles)
    compile_mode: str = "default"  # torch.compile mode: "default" or "max-autotune-no-cudagraphs" (Triton matmuls with fused epilogues)
    compile_tune_kernels: bool = False  # Inductor tunes its own kernels' block sizes (coordinate descent; slower compile)
    # Inductor's default: a norm's backward and the per-channel weight gradients in one kernel.
    # Off in the record profiles: in the record's backward those kernels spill on sm_90 (255
    # registers, ~180 KB shared memory; torch 2.11 predates the fix, PyTorch #179494), and
    # on an H100 they made the looped step 3.2 % slower (2026-11-24, at 2ce279e)
    compile_mix_order_reduction: bool = True
    flash_attn: bool = True  # FlashAttention 4 (via FlexAttention) in compiled CUDA runs, when flash_attn.cute is installed
    # CUDA training steps: MLP up-projection + activation in one Triton matmul (needs triton).
    # On an H100 the step ran 2.2 % (unlooped) and 2.4 % (looped) faster (2026-11-24); off
    # until its compiled sm_90 kernels match float64 and its training curve matches the
    # plain MLP's (gpu_session.sh fusedmlp devfusedmlp)
    fused_mlp: bool = False
    # CUDA training steps: the soft-capped cross-entropy in two Triton kernels (needs triton).
    # Its sm_90 code spends 22-26 instructions per logit forward against the 34-44 of
    # Inductor's loss, which is issue-bound: 2-5 ms/step predicted; off until a GPU times it
    # (gpu_session.sh fusedcestep)
    fused_ce: bool = False
    log_every: int = 1  # steps between loss logs and wall-clock checks (each is a host sync)
    val_every: int = 50  # steps between validations (0 = only at the end)
    val_tokens: int = 65536  # validation tokens scored at periodic checks (0 = all)
    snapshot_every: int = 0  # steps between resumable snapshots of the run (0 = none)

    def __post_init__(self):
        key = "train.runtime."
        _choice(key + "device", self.device, ("auto", "cpu", "cuda"))
        _choice(key + "compile_mode", self.compile_mode, COMPILE_MODES)
        _positive(key + "log_every", self.log_every)
        for name in ("val_every", "val_tokens", "snapshot_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key}{name}={getattr(self, name)}: must be >= 0 (0 = off)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """`train`: the model, its optimizer, the schedule and the runtime, plus what they
    share: the batch geometry, the seed and the calibration that follows training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seq_len: int = 256  # tokens per training sequence
    batch_tokens: int = 8192  # global tokens per optimizer step, whatever the world size
    micro_batch_seqs: int = 32  # sequences per forward pass per process (accumulation fills the rest)
    calib_batches: int = 8  # GPTQ Hessians: batches of micro_batch_seqs x seq_len train tokens per process, read after training (0 = none)
    seed: int = 1337

    def __post_init__(self):
        for name in ("seq_len", "batch_tokens", "micro_batch_seqs"):
            _positive(f"train.{name}", getattr(self, name))
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"train.batch_tokens={self.batch_tokens} is not a multiple of train.seq_len={self.seq_len}")
        if self.calib_batches < 0:
            raise ValueError(f"train.calib_batches={self.calib_batches}: must be >= 0 (0 collects no Hessians)")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    method: str = "rtn"  # "rtn" (round to nearest), "gptq" (full-Hessian, needs train.calib_batches > 0) or "gptq_lite" (rtn, each row's clip the least-error of lite_percentiles)
    clip: str = "percentile"  # per-row scale: "percentile" of |w| or "sdclip" (k * std of the row)
    clip_percentile: float = 99.99  # clip "percentile": the |w| percentile that sets the scale (100 = max)
    lite_percentiles: list = field(default_factory=lambda: [99.9, 99.95, 99.99, 99.999, 100.0])  # gptq_lite: each row's candidate clips (03-22)
    sdclip_k: CategoryClip = field(default_factory=CategoryClip)  # clip "sdclip": k per category
    sdclip_search: list = field(default_factory=list)  # candidate k: each category takes the one of least calibration output error (needs Hessians; [] = off)
    sdclip_search_bytes: int = 0  # with sdclip_search: the least-error k per category whose artifact + code fits this (decimal; 0 = error alone)
    bits: CategoryBits = field(default_factory=CategoryBits)  # integer width per category
    damp: float = 0.01  # gptq: added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # gptq: columns quantized per block before the error goes on to the rest
    act_order: bool = True  # gptq: columns in order of decreasing H_jj (the most sensitive first)
    passthrough_max_numel: int = 4096  # tensors this small (and all 1-D) stay fp16
    compressors: list = field(default_factory=lambda: list(COMPRESSORS))  # the smallest wins
    layouts: list = field(default_factory=lambda: ["row"])  # per group, the smallest (layout, codec) wins
    chunk_bytes: int = 2_000_000  # a group's bytes are compressed in independent chunks of this size, all at once (0: whole)
    gate_int8: bool = False  # attention gates as int8 rows (scale max|row|/127) instead of fp16 (04-19)
    lqer_rank: int = 0  # rank of the low-rank correction of the quantization error (0 = off; 04-27: 4)
    lqer_top_k: int = 3  # LQER corrects the k matrices of largest ||W - Wq||_F (04-27: 3)
    prune_fraction: float = 0.0  # zero this fraction of each quantized matrix by |w| before quantizing
    fit_bytes: int = 0  # zero +-1 integers of least damage until artifact + code <= this (decimal; 0 = off)

    def __post_init__(self):
        _choice("quantize.method", self.method, QUANT_METHODS)
        _choice("quantize.clip", self.clip, CLIP_METHODS)
        for k in self.sdclip_search:
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
                raise ValueError(f"quantize.sdclip_search: {k!r} is not a positive k")
        if self.sdclip_search and self.clip != "sdclip":
            raise ValueError(f"quantize.sdclip_search chooses SDClip's k, but quantize.clip is {self.clip!r}: "
                             "set quantize.clip: sdclip")
        if not 0 <= self.sdclip_search_bytes <= CHALLENGE_ARTIFACT_BYTES:
            raise ValueError(f"quantize.sdclip_search_bytes={self.sdclip_search_bytes}: must lie in "
                             f"[0, {CHALLENGE_ARTIFACT_BYTES:,}] (decimal bytes of artifact + code; 0 = off)")
        if self.sdclip_search_bytes and not self.sdclip_search:
            raise ValueError("quantize.sdclip_search_bytes chooses among the k of quantize.sdclip_search, which is "
                             "empty: list candidate k there")
        if not 50.0 < self.clip_percentile <= 100.0:
            raise ValueError(f"quantize.clip_percentile={self.clip_percentile}: must lie in (50, 100]")
        if not self.lite_percentiles:
            raise ValueError("quantize.lite_percentiles is empty: name at least one |w| percentile in (50, 100]")
        for percentile in self.lite_percentiles:
            if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
                raise ValueError(f"quantize.lite_percentiles: {percentile!r} is not a percentile in (50, 100]")
        if self.method == "gptq_lite" and self.clip != "percentile":
            raise ValueError(f"quantize.method 'gptq_lite' chooses each row's clip among quantize.lite_percentiles, "
                             f"so quantize.clip {self.clip!r} does not apply: set quantize.clip: percentile")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"quantize.damp={self.damp}: must lie in [0, 1)")
        _positive("quantize.block_size", self.block_size)
        if not self.compressors:
            raise ValueError("quantize.compressors is empty: name at least one of " + ", ".join(COMPRESSORS))
        for name in self.compressors:
            _choice("quantize.compressors[]", name, ALL_COMPRESSORS)
        if not self.layouts:
            raise ValueError("quantize.layouts is empty: name at least one, e.g. 'row'")
        for name in self.layouts:
            check_layout_name("quantize.layouts[]", name)
        if self.chunk_bytes < 0:
            raise ValueError(f"quantize.chunk_bytes={self.chunk_bytes}: must be >= 0 (0: each group compressed whole)")
        if self.lqer_rank < 0:
            raise ValueError(f"quantize.lqer_rank={self.lqer_rank}: must be >= 0 (0 = off)")
        _positive("quantize.lqer_top_k", self.lqer_top_k)
        if not 0.0 <= self.prune_fraction < 1.0:
            raise ValueError(f"quantize.prune_fraction={self.prune_fraction}: must lie in [0, 1)")
        if not 0 <= self.fit_bytes <= CHALLENGE_ARTIFACT_BYTES:
            raise ValueError(f"quantize.fit_bytes={self.fit_bytes}: must lie in [0, {CHALLENGE_ARTIFACT_BYTES:,}] "
                             "(decimal bytes of artifact + code; 0 = off)")

    @property
    def uses_hessians(self) -> bool:
        """Whether quantizing needs the calibration Hessians (GPTQ, or the search over k)."""
        return self.method == "gptq" or bool(self.sdclip_search)


def check_layout_name(key: str, name: str) -> None:
    """A layout is "row" or "col", then optionally "+nn" (rows reordered), then optionally
    "+shuffle" (fp16 bytes split even/odd), e.g. "col+nn+shuffle"; anything else is refused."""
    parts = name.split("+") if isinstance(name, str) else []
    rest = parts[1:]
    ok = bool(parts) and parts[0] in LAYOUT_ORDERS and rest in ([], ["nn"], ["shuffle"], ["nn", "shuffle"])
    if not ok:
        raise ValueError(f"{key}={name!r}: expected 'row' or 'col', optionally followed by '+nn' and/or "
                         "'+shuffle' in that order (e.g. 'col+nn+shuffle')")


@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    max_artifact_bytes: int = CHALLENGE_ARTIFACT_BYTES  # decimal, code included; may be lowered, never raised
    max_quant_damage: float = 0.0  # fail when val_bpb_roundtrip - val_bpb_float exceeds this (0 = no check)
    batch_seqs: int = 32  # sequences per evaluation forward pass
    seq_len: int = 256  # evaluation sequence length of the round-trip check

    def __post_init__(self):
        if not 0 < self.max_artifact_bytes <= CHALLENGE_ARTIFACT_BYTES:
            raise ValueError(f"verify.max_artifact_bytes={self.max_artifact_bytes}: must lie in "
                             f"(0, {CHALLENGE_ARTIFACT_BYTES:,}]: the challenge's cap may be lowered, never raised, "
                             "so that fits_16mb means what it says")
        if self.max_quant_damage < 0:
            raise ValueError(f"verify.max_quant_damage={self.max_quant_damage}: must be >= 0 (0 = no check)")
        _positive("verify.batch_seqs", self.batch_seqs)
        _positive("verify.seq_len", self.seq_len)


@dataclass(frozen=True)
class ScriptConfig:
    """How the `script` stage ships train_gpt.py when its self-extracting form is the
    smaller one. `payload`: `base85` (ASCII, as the records shipped: 1.25 bytes per
    compressed byte) or `latin1` (raw LZMA2 in a str literal of a file that declares
    `coding: latin-1`, PEP 263: about 1.02 bytes per compressed byte; about 10.9 KB less
    for the record profile's script: the README quotes both sizes). Python runs both alike; a tool that reads
    the script as UTF-8 text fails on `latin1`, so it is opt-in until the challenge's own
    counting of code bytes is known to read the file's bytes. Not offered: a denser text
    that stays UTF-8, base 123 over ASCII 1-127 less the line ends, quote and backslash
    (6.94 bits a byte where base85 carries 6.41), would cut the record profile's brotli
    payload text from 58,029 to 53,565 bytes (2026-12-06; its decoder adds a few hundred)
    but puts terminal control codes (ESC, SO) in the file; printable ASCII alone (94
    symbols) would save at most 1.4 KB."""
    payload: str = "base85"

    def __post_init__(self):
        _choice("script.payload", self.payload, SCRIPT_PAYLOADS)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    final_mode: str = "sliding"  # the mode reported as val_bpb, fixed before evaluating
    modes: list = field(default_factory=lambda: ["nonoverlap", "sliding"])  # modes to run (EVAL_MODES)
    seq_len: int = 256  # window length (non-overlapping block length too)
    stride: int = 64  # sliding: new targets scored per window
    batch_seqs: int = 32  # windows per forward pass
    truncate_to_seq_len: bool = False  # score only ((N-1)//seq_len)*seq_len targets, as the records
    # ttt_sgd (TECHNIQUES.md 5.3): score a chunk with sliding windows, then train on it
    ttt_chunk_tokens: int = 32768  # targets per chunk (chunk c owns targets (cC, (c+1)C])
    ttt_lr: float = 0.005  # SGD peak LR, cosine over all chunks to 0 at the last (never trained on; TECHNIQUES §5.3)
    ttt_momentum: float = 0.9
    ttt_epochs: int = 3  # passes over each chunk
    ttt_grad_clip: float = 1.0  # global grad-norm clip after the all-reduce (0 = off)
    ttt_freeze_blocks: int = 0  # leading blocks kept fixed
    ttt_batch_seqs: int = 32  # training sequences (seq_len tokens) per step, over all processes
    # ttt_lora (TECHNIQUES.md 5.4): per-document adapters, a chunk scored then one AdamW step
    lora_targets: list = field(default_factory=lambda: ["q", "k", "v", "o_side", "mlp_side", "head"])  # LORA_TARGETS; the records' set
    lora_rank: int = 96
    lora_alpha: float = 144.0  # adapter output scale alpha / rank
    lora_chunk_tokens: int = 48  # targets scored per forward, then one step
    lora_batch_docs: int = 64  # documents per batch (each its own adapters)
    lora_group_rows: int = 0  # rows per forward and backward of a chunk's step (0 = all): bounds memory, same step
    lora_lr: float = 1e-4
    lora_beta1: float = 0.0
    lora_beta2: float = 0.999
    lora_eps: float = 1e-10
    lora_weight_decay: float = 0.5
    lora_warm_start_a: bool = False  # keep A across batches (legal; documents no longer independent)
    # ttt_phased (TECHNIQUES.md 5.5): ttt_lora, pausing for global SGD on fully scored documents
    phase_boundaries: list = field(default_factory=lambda: [833, 1666, 2500])  # scored-document counts
    phase_lr: float = 0.001  # global SGD peak LR (cosine over the phase's chunks); momentum, clip, chunk as ttt_*
    phase_epochs: int = 1
    # budget (DESIGN.md: the final mode <= 600 s on 8xH100, artifact read to final sum)
    warmup: bool = True  # each forward/backward the mode's loop runs, on random tokens, before the loop's timer
    compile: bool = False  # torch.compile the evaluation model (dynamic shapes; the warm-up builds the graphs)
    compile_backend: str = "inductor"  # EVAL_COMPILE_BACKENDS; aot_eager traces the same graphs without codegen
    # ttt_phased's global SGD passes in a compiled graph (false: eager, and the warm-up builds no
    # SGD-step graph, about half of that mode's compile; the passes train a few percent of the
    # tokens the adapters see, at eager speed: bench/NOTES.md weighs the trade)
    compile_phases: bool = True
    max_eval_seconds: float = 0.0  # fail when the final mode's 8xH100 projection exceeds it (0 = no check)
    sync_seconds: float = 0.0002  # projection: cost of one cross-process synchronisation on 8xH100

    def __post_init__(self):
        for mode in self.modes:
            _choice("evaluate.modes[]", mode, EVAL_MODES)
        _choice("evaluate.final_mode", self.final_mode, EVAL_MODES)
        if self.final_mode not in self.modes:
            raise ValueError(f"evaluate.final_mode={self.final_mode!r} is not in evaluate.modes={self.modes}")
        for name in ("seq_len", "batch_seqs", "ttt_chunk_tokens", "ttt_epochs", "ttt_batch_seqs", "lora_rank",
                     "lora_chunk_tokens", "lora_batch_docs", "phase_epochs"):
            _positive(f"evaluate.{name}", getattr(self, name))
        if not 0 < self.stride <= self.seq_len:
            raise ValueError(f"evaluate.stride={self.stride}: must lie in [1, seq_len={self.seq_len}]")
        if self.lora_group_rows != 0 and self.lora_group_rows < 3:
            raise ValueError(f"evaluate.lora_group_rows={self.lora_group_rows}: must be 0 (all rows at once) or at "
                             "least 3 (balanced groups then keep 2 rows or more: a 1-row forward would recompile)")
        if self.lora_chunk_tokens > self.seq_len:
            raise ValueError(f"evaluate.lora_chunk_tokens={self.lora_chunk_tokens}: a chunk is scored in one "
                             f"window, so it must not exceed evaluate.seq_len={self.seq_len}")
        for name in ("ttt_freeze_blocks", "ttt_grad_clip", "ttt_lr", "lora_lr", "lora_weight_decay", "phase_lr",
                     "max_eval_seconds", "sync_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"evaluate.{name}={getattr(self, name)}: must be >= 0")
        for name in ("ttt_momentum", "lora_beta1", "lora_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"evaluate.{name}={getattr(self, name)}: must lie in [0, 1)")
        if not self.lora_targets:
            raise ValueError("evaluate.lora_targets is empty: name at least one of " + ", ".join(LORA_TARGETS))
        for name in self.lora_targets:
            _choice("evaluate.lora_targets[]", name, LORA_TARGETS)
        _choice("evaluate.compile_backend", self.compile_backend, EVAL_COMPILE_BACKENDS)
        if any(not isinstance(b, int) or b <= 0 for b in self.phase_boundaries) or \
                list(self.phase_boundaries) != sorted(set(self.phase_boundaries)):
            raise ValueError(f"evaluate.phase_boundaries={self.phase_boundaries}: must be increasing positive "
                             "document counts")


# A key whose scalar value became a subsection: where the value lives now.
_MOVED_SCALARS: dict[type, dict[str, str]] = {TrainConfig: {"schedule": "mode"}}

# A key that no longer exists: why, so that an old params file is refused with the reason.
_REMOVED: dict[type, dict[str, str]] = {VerifyConfig: {
    "time_budget_seconds": "the training budget is the challenge's 600 s (pgolf_core/challenge.py), checked by "
                           "verify on a challenge run only; delete the key"}}

SECTIONS: dict[str, type] = {
    "tokenize": TokenizeConfig,
    "ngrams": NgramConfig,
    "train": TrainConfig,
    "quantize": QuantizeConfig,
    "verify": VerifyConfig,
    "evaluate": EvaluateConfig,
    "script": ScriptConfig,
}


def load_params(path: str | Path) -> dict:
    """Read params.yaml; names the file when it is missing or not a mapping."""
    path = Path(path)
    params = _read_mapping(path, "params file")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section {unknown[0]!r}{_nearest(unknown[0], list(SECTIONS))}")
    return params


def load_section(path: str | Path, section: str):
    """The typed config of one section of params.yaml (defaults for absent keys)."""
    return build_section(section, load_params(path).get(section) or {})


def build_section(section: str, values: dict):
    """Validate `values` against the section's dataclass and build it."""
    return _build(section, SECTIONS[section], values)


def _build(prefix: str, cls: type, values):
    """`cls` from a mapping, nested dataclass fields from nested mappings; errors carry the
    dotted key (`quantize.bits.mlp`). A key that moved into a subsection is refused with
    its new place (`train.matrix_lr moved to train.optimizer.matrix_lr`)."""
    if not isinstance(values, dict):
        raise ValueError(f"params {prefix!r} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, "
                         f"found {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            moved = _moved_to(cls, key)
            if moved:
                raise ValueError(f"params key {prefix}.{key} moved to {prefix}.{moved}")
            if key in _REMOVED.get(cls, {}):
                raise ValueError(f"params key {prefix}.{key} was removed: {_REMOVED[cls][key]}")
            raise ValueError(f"unknown params key {prefix}.{key}{_nearest(key, _nested_names(cls))}")
        if dataclasses.is_dataclass(hints[key]) and not isinstance(value, dict) and key in _MOVED_SCALARS.get(cls, {}):
            raise ValueError(f"params key {prefix}.{key} is a section now: its value moved to "
                             f"{prefix}.{key}.{_MOVED_SCALARS[cls][key]}")
        values = {**values, key: _coerce(f"{prefix}.{key}", value, hints[key])}
    return cls(**values)


def _nested_names(cls: type) -> dict[str, str]:
    """Every key a mapping for `cls` may hold, and each subsection's keys by their dotted
    path (so that a near miss of a nested key is named with its place)."""
    names = {f.name: f.name for f in dataclasses.fields(cls)}
    for leaf in _leaf_keys("", cls):
        names.setdefault(leaf.rsplit(".", 1)[-1], leaf.lstrip("."))
    return names


def _moved_to(cls: type, key: str) -> str:
    """The dotted place of `key` inside one of `cls`'s subsections ("" when none has it)."""
    nested = (leaf.lstrip(".") for leaf in _leaf_keys("", cls) if leaf.count(".") > 1)
    return next((path for path in nested if path.rsplit(".", 1)[-1] == key), "")


def parse_assignments(assignments: list[str]) -> dict:
    """["a.b=value", ...] -> {"a": {"b": value}}, values read as YAML (like `dvc exp run
    -S`, whose dotted keys name nested mappings); the keys are checked when the mapping
    builds a section."""
    import yaml  # noqa: PLC0415 - only the params tooling reads YAML (see _read_mapping)

    values: dict = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r}: {name} was given a value and subkeys both")
        node[leaf] = yaml.safe_load(value)
    return values


def section_keys(section: str) -> list[str]:
    """Leaf keys of a section, dotted as `dvc exp run -S` takes them (`train.optimizer.matrix_lr`)."""
    return _leaf_keys(section, SECTIONS[section])


def _leaf_keys(prefix: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        keys += _leaf_keys(f"{prefix}.{f.name}", sub) if dataclasses.is_dataclass(sub) else [f"{prefix}.{f.name}"]
    return keys


def to_dict(config) -> dict:
    """A config as plain YAML-able values (tuples as lists), subsections as mappings."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else list(value) if isinstance(value, tuple) else value
    return out


def _coerce(key: str, value, expected):
    if dataclasses.is_dataclass(expected):
        return _build(key, expected, value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ValueError(f"params key {key}: expected true/false, found {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"params key {key}: expected an integer, found {value!r}")
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if expected in (float, str, list, tuple) and not isinstance(value, expected):
        raise ValueError(f"params key {key}: expected {'list' if expected is tuple else expected.__name__}, "
                         f"found {value!r}")
    return value


def _read_mapping(path: Path, what: str) -> dict:
    import yaml  # noqa: PLC0415 - here, not at the top: the model imports ModelConfig, and code that only
    # builds models (an exported submission script) must not need PyYAML

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections, found {type(values).__name__}")
    return values


def _nearest(name: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices` (a mapping: its keys are matched,
    its values shown), else the valid names."""
    shown = choices if isinstance(choices, dict) else {c: c for c in choices}
    close = difflib.get_close_matches(name, list(shown), n=1, cutoff=0.5)
    return f" (did you mean {shown[close[0]]!r}?)" if close else f" (valid: {', '.join(sorted(set(shown.values())))})"


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{key}={value}: must be positive")


PARAMS_HEADER = """\
# Every hyperparameter of the pipeline, grouped by stage; each key is documented (with
# its unit) in pgolf_core/config.py. Written by `python -m pgolf_core.profile {profile}`:
# the defaults with that profile's overrides. No YAML anchors: `dvc exp run -S key=value`
# rewrites only the key it names.
"""


def read_profile(path: str | Path) -> dict:
    """A profile's overrides by section, its `base:` profile (a path relative to it) first."""
    path = Path(path)
    values = _read_mapping(path, "profile")
    merged = read_profile(path.parent / values.pop("base")) if "base" in values else {}
    for section, overrides in values.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown section {section!r}{_nearest(section, list(SECTIONS))}")
        merged[section] = merge_nested(merged.get(section, {}), overrides or {})
    return merged


def merge_nested(base: dict, overrides: dict) -> dict:
    """`overrides` on `base`, nested mappings merged key by key (a profile may set one category)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_profile(profile: str | Path, params_path: str | Path) -> dict:
    """Write params.yaml = every section's defaults overridden by the profile, all keys
    spelt out (so DVC tracks each one); returns the typed configs by section."""
    import yaml  # noqa: PLC0415 - see _read_mapping

    overrides = read_profile(profile)
    configs = {name: build_section(name, overrides.get(name) or {}) for name in SECTIONS}
    text = yaml.safe_dump({name: to_dict(cfg) for name, cfg in configs.items()}, sort_keys=False,
                          default_flow_style=False)
    with open(params_path, "w", encoding="utf-8") as f:
        f.write(PARAMS_HEADER.format(profile=profile) + text)
    return configs
