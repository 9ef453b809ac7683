"""The entry of the exported `train_gpt.py` (issue 22): one launch that trains, calibrates,
quantizes, packs, writes the artifact, reloads it and scores it, as a challenge
submission does.

`pgolf_core.submission_export.build_script` bundles this module and everything it imports
(`pgolf_core.bundle`, traced) into one self-contained script, with the profile's params
baked in as `BAKED` = {"train": ..., "quantize": ..., "evaluate": ... (`config.to_dict`
of each section), "tokenize": {"vocab_size": ...}}; the script calls `main(BAKED)`. It runs
as `python train_gpt.py` or `torchrun --standalone --nproc_per_node=8 train_gpt.py`.

**Settings.** The public scripts' environment variables are read by one function,
`settings_from_env`, over the baked params (table `ENV_KEYS`; run-level ones in
`Paths`), so the script runs side by side with a public record's script on the same data
and settings. A variable with a value that does not parse or that the config refuses is
named in the error; a variable of the public scripts this script cannot honour
(`UNSUPPORTED`: every setting the five seed systems' commands use that is not mapped) is
refused with the reason rather than silently ignored. So is a name outside both tables
that starts like the public scripts' settings do (`SETTING_PREFIXES`: `TTT_`, `GPTQ_`,
`WARMDOWN_`, ...), since the records' scripts read more names than the seeds show; any
other name is not read: the environment holds much besides settings.

**The run** follows the pipeline's stages with the same functions in the same order
(train: seed, tokenizer, shards, model, `train` with GPTQ calibration in the same launch;
quantize: `quantize_model` on the float32 weights, `pack_to_fit` with the code bytes of
this very script; evaluate: `evaluate` on the model read back from the artifact file), so
on the same machine it reproduces the pipeline's val_bpb. Rank 0 quantizes and writes;
every rank evaluates. It ends with one line, `final mode:<mode> val_bpb:... val_loss:...
artifact_bytes:...` and writes a JSON summary beside the artifact.

`EVAL_ONLY=1` (with `ARTIFACT_PATH`) scores a given artifact and nothing else; with
`EVAL_FINAL_ONLY=1` too, only the baked final mode: what `verify` runs, alone, in an empty
folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from pgolf_core import artifact, calibration, checkpoint, config, data, dist, io, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.eval.run import evaluate, truncated
from pgolf_core.model import GPT
from pgolf_core.quant.fit import pack_to_fit
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.train import TrainResult, report_line, run_warnings, set_seed, train

ARTIFACT_NAME = "final_model.pgolf"  # the compressed model, in OUT_DIR unless ARTIFACT_PATH says
SUMMARY_NAME = "summary.json"  # the run's figures, beside the artifact
EVAL_SUMMARY_NAME = "eval_summary.json"  # EVAL_ONLY's figures (never overwrites a training run's)
FINAL_PREFIX = "final "  # the last line the script prints starts with this

# Public variable -> the params key it sets (the public scripts' names; TECHNIQUES.md and
# the records' logs). Types come from the config's fields.
ENV_KEYS = {
    "SEED": "train.seed",
    "ITERATIONS": "train.schedule.iterations",
    "MAX_WALLCLOCK_SECONDS": "train.schedule.max_wallclock_seconds",
    "GPTQ_RESERVE_SECONDS": "train.schedule.calib_reserve_seconds",
    "MIN_LR": "train.schedule.min_lr_frac",
    "TRAIN_BATCH_TOKENS": "train.batch_tokens",
    "TRAIN_SEQ_LEN": "train.seq_len",
    "GPTQ_CALIB_BATCHES": "train.calib_batches",
    "VAL_LOSS_EVERY": "train.runtime.val_every",
    "TRAIN_LOG_EVERY": "train.runtime.log_every",
    "NUM_LAYERS": "train.model.num_layers",
    "MODEL_DIM": "train.model.model_dim",
    "NUM_HEADS": "train.model.num_heads",
    "NUM_KV_HEADS": "train.model.num_kv_heads",
    "MLP_MULT": "train.model.mlp_mult",
    "ROPE_BASE": "train.model.rope_base",
    "ROPE_DIMS": "train.model.rope_dims",
    "LOGIT_SOFTCAP": "train.model.logit_softcap",
    "QK_GAIN_INIT": "train.model.qk_gain_init",
    "TIED_EMBED_INIT_STD": "train.model.embed_init_std",
    "XSA_LAST_N": "train.model.xsa_last_n",
    "NUM_LOOPS": "train.model.num_loops",
    "LOOP_START": "train.model.loop_start",
    "LOOP_END": "train.model.loop_end",
    "PARALLEL_START_LAYER": "train.model.parallel_start",
    # #1894: "ENABLE_LOOPING_AT=0.42 beat ... 0.35 and 0.40", the fraction of the run at
    # which the loop switches on (the 04-09 record's "loop 3-5 at 0.35").
    "ENABLE_LOOPING_AT": "train.schedule.loop_start_frac",
    "MATRIX_LR": "train.optimizer.matrix_lr",
    "SCALAR_LR": "train.optimizer.scalar_lr",
    "TIED_EMBED_LR": "train.optimizer.embed_lr",
    "MUON_MOMENTUM": "train.optimizer.muon_momentum",
    "MUON_MOMENTUM_WARMUP_START": "train.optimizer.muon_momentum_warmup_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "train.optimizer.muon_momentum_warmup_steps",
    "MUON_BACKEND_STEPS": "train.optimizer.ns_steps",
    "MUON_WD": "train.optimizer.weight_decay",
    "EMBED_WD": "train.optimizer.embed_weight_decay",
    "BETA1": "train.optimizer.adam_beta1",
    "BETA2": "train.optimizer.adam_beta2",
    "GRAD_CLIP_NORM": "train.optimizer.grad_clip",
    "EVAL_SEQ_LEN": "evaluate.seq_len",
    "EVAL_STRIDE": "evaluate.stride",
    "TTT_LR": "evaluate.ttt_lr",
    "TTT_EPOCHS": "evaluate.ttt_epochs",
    "TTT_FREEZE_BLOCKS": "evaluate.ttt_freeze_blocks",
    # The per-document chunk: #687 sets TTT_CHUNK_SIZE=128 for its document LoRA, the
    # phased records' "chunk 32/48" (TECHNIQUES §5.4); the 32,768-token chunk has no variable.
    "TTT_CHUNK_SIZE": "evaluate.lora_chunk_tokens",
    "TTT_WARM_START_A": "evaluate.lora_warm_start_a",
    "SPARSE_ATTN_GATE_SCALE": "train.model.attn_gate_scale",
    "GATED_ATTN_QUANT_GATE": "quantize.gate_int8",
}

# Public variables whose meaning this script does not have, by the reason: refused, never
# ignored. Every setting the five seed systems' commands use (../shared/seeds) is either
# here or in ENV_KEYS.
_UNSUPPORTED_BY_REASON = {
    "the public scripts' compile warm-up steps; here the compile warm-up is automatic and "
    "train.schedule.warmup_steps (an LR warm-up) is baked": ("WARMUP_STEPS",),
    "the warm-down is a fraction of the run here (train.schedule.warmdown_frac, baked)": ("WARMDOWN_ITERS",),
    "validation batches are evaluate.batch_seqs windows here (baked)": ("VAL_BATCH_SIZE",),
    "the embedding is always tied here": ("TIE_EMBEDDINGS",),
    "for an untied embedding; the tied embedding's rate is TIED_EMBED_LR": ("EMBED_LR",),
    "for an untied head; the head is the tied embedding here": ("HEAD_LR",),
    "test-time training is chosen by evaluate.modes and evaluate.final_mode (baked), its settings are the "
    "evaluate.ttt_* and lora_* keys; this setting has none of them": (
        "TTT_ENABLED", "TTT_MODE", "TTT_E2E_MODE", "TTT_E2E_LAST_FRAC", "TTT_OPTIMIZER", "TTT_STEPS",
        "TTT_MIN_DOC_LEN", "TTT_MAX_DOC_LEN", "TTT_EVAL_SEQ_LEN"),
    "test-time training before quantization is not offered: the artifact is what is scored": (
        "PREQUANT_TTT_ENABLED",),
    "the quantizer is quantize.method (baked)": ("GPTQ_ENABLED",),
    "kernels and compilation are train.runtime.* (baked; the fused kernels are bundled only when the baked "
    "params switch them on)": (
        "FUSED_MLP_ENABLED", "FUSED_MLP_FULL", "GROUP_SIZE_M", "NATIVE_SDPA", "TORCH_COMPILE_DISABLE"),
    "this script reads no n-gram tables (the artifact holds none)": (
        "NGRAM_VOCAB", "NGRAM_MAX_TOKENS", "NGRAM_HASH_BUCKETS", "NGRAM_DATA_DIR", "USE_NGRAM_BIAS",
        "USE_NGRAM_BACKOFF", "USE_NGR_LOG_FREQ_INV", "USE_CTX_PARTITIONED_TAB"),
    "document-masked attention is train.model.doc_mask (baked)": ("VARLEN_ENABLED",),
    "the parallel lanes' final hidden state is always their mean here (the records' "
    "PARALLEL_FINAL_LANE=mean)": ("PARALLEL_FINAL_LANE",),
    "the value residual is train.model.value_residual (baked)": ("VRL_ENABLED",),
    "a technique this script does not have": (
        "BACKOUT_ENABLED", "DISTILL_ENABLED", "USE_NORM_PCT_DROPOUT", "NORM_PCT_THRESH", "USE_CMP_QUANT_VALUE_DEDUP",
        "CMP_QUANT_DEDUP_STEP"),
    "not a setting here": ("ADAM_EPS", "SKIP_REDUNDANT_EVALS", "DRY_RUN"),
    "the data come from DATA_PATH; the script downloads nothing": (
        "MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_SKIP_HF_COPY"),
}
UNSUPPORTED = {name: why for why, names in _UNSUPPORTED_BY_REASON.items() for name in names}
# How the public scripts' settings begin (the seeds' names above and the records' logs):
# a variable so named that neither table holds is refused as well, since the records'
# scripts read names the seeds never show (a warm-down fraction, EMA or phase settings)
# and one of them set and silently ignored would change nothing while seeming to.
# Prefixes an environment uses for other things (TORCH_, MAX_, USE_, NUM_) are left out.
SETTING_PREFIXES = ("TTT_", "GPTQ_", "MUON_", "NGRAM_", "LORA_", "WARMDOWN_", "WARMUP_", "EMA_", "SWA_", "QAT_",
                    "MATRIX_", "EMBED_", "TIED_", "QK_", "ROPE_", "LOOP_", "EVAL_", "TRAIN_", "VAL_", "MLP_", "XSA_",
                    "PHASED_", "GLOBAL_TTT_", "SPARSE_ATTN_", "GATED_ATTN_", "ADAM_", "MUONEQ_")

# Run-level variables (not params): see `Paths`.
RUN_VARS = ("DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "VOCAB_SIZE", "OUT_DIR", "EVAL_ONLY", "ARTIFACT_PATH",
            "EVAL_FINAL_ONLY")


def settings_free(environ: typing.Mapping[str, str]) -> dict:
    """`environ` without PYTHONPATH and without any variable this script reads: the
    environment a run of the script gets before its own settings are added."""
    names = {*ENV_KEYS, *UNSUPPORTED, *RUN_VARS, "PYTHONPATH"}
    return {k: v for k, v in environ.items() if k not in names}


class SettingsError(ValueError):
    """A setting of the environment (named in the message) that cannot be used."""


@dataclass(frozen=True)
class Paths:
    """What the environment says about the run beyond hyperparameters: the data folder
    (`fineweb_train_*.bin`, `fineweb_val_*.bin`), the tokenizer (a SentencePiece .model
    file, or a folder holding `tokenizer.model`), where outputs go, the artifact, the run
    id, the tokenizer's expected vocabulary, and whether only to evaluate."""

    data: Path
    tokenizer: Path
    out_dir: Path
    artifact: Path
    run_id: str
    vocab_size: int
    eval_only: bool


# --- settings -------------------------------------------------------------------------


def _field_type(dotted: str):
    """The annotated type of a params key ("train.model.num_layers" -> int)."""
    section, *parts = dotted.split(".")
    cls = config.SECTIONS[section]
    for part in parts:
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return cls


def _parse(name: str, raw: str, kind):
    """`raw` (an environment string) as `kind`; SettingsError naming `name` when it is not."""
    text = raw.strip()
    if kind is str:
        return text
    if kind is bool and text.lower() in ("1", "true", "0", "false"):
        return text.lower() in ("1", "true")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return value
    what = {bool: "0 or 1", int: "an integer", float: "a finite number"}.get(kind)
    if what is None:
        raise SettingsError(f"{name}: a {kind} cannot be set from the environment")
    raise SettingsError(f"{name}={raw!r}: expected {what}")


def _set(tree: dict, dotted: str, value) -> None:
    section, *parents, leaf = dotted.split(".")
    node = tree.setdefault(section, {})
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _build(name: str, values: dict, culprits: dict[str, str]):
    """`config.build_section`, its refusal re-raised naming the variables whose keys it names."""
    try:
        return config.build_section(name, values)
    except ValueError as err:
        message = str(err)
        named = [var for var, key in culprits.items() if key in message] or \
            [var for var, key in culprits.items() if key.rsplit(".", 1)[-1] in message]
        where = ", ".join(f"{var} (sets {culprits[var]})" for var in named) if named else \
            "the baked params" + (f" with {', '.join(culprits)} from the environment" if culprits else "")
        raise SettingsError(f"{where}: {message}") from None


def settings_from_env(baked: dict, environ: typing.Mapping[str, str]):
    """(TrainConfig, QuantizeConfig, EvaluateConfig, Paths) from the baked params with the
    public scripts' environment variables (`ENV_KEYS`, `RUN_VARS`) applied. Every error
    is a SettingsError (a ValueError) that names the variable."""
    for name, why in UNSUPPORTED.items():
        if name in environ:
            raise SettingsError(f"{name} is a public script's setting this script does not honour: {why}")
    unknown = sorted(name for name in environ if name.startswith(SETTING_PREFIXES)
                     and name not in ENV_KEYS and name not in RUN_VARS)
    if unknown:
        raise SettingsError(f"{', '.join(unknown)}: named like a public script's setting, but this script does not "
                            "read it (its settings are the baked params; the variables it reads are ENV_KEYS in "
                            "pgolf_core/submission.py): unset it or change the params and export again")
    tree = json.loads(json.dumps({k: baked[k] for k in ("train", "quantize", "evaluate")}))
    culprits: dict[str, str] = {}
    for name, key in ENV_KEYS.items():
        if name in environ:
            _set(tree, key, _parse(name, environ[name], _field_type(key)))
            culprits[name] = key
    configs = [_build(s, tree[s], {v: k for v, k in culprits.items() if k.startswith(s + ".")})
               for s in ("train", "quantize", "evaluate")]
    train_cfg, quant_cfg, eval_cfg = configs
    if quant_cfg.uses_hessians and not train_cfg.calib_batches:
        where = "GPTQ_CALIB_BATCHES" if "GPTQ_CALIB_BATCHES" in culprits else "train.calib_batches (baked)"
        user = "quantize.method is 'gptq'" if quant_cfg.method == "gptq" else "quantize.sdclip_search is set"
        raise SettingsError(f"{where} is 0 but {user}, which needs the Hessians it collects")

    vocab = int(baked.get("tokenize", {}).get("vocab_size", 0))
    if "VOCAB_SIZE" in environ:
        vocab = _parse("VOCAB_SIZE", environ["VOCAB_SIZE"], int)
        if vocab <= 0:
            raise SettingsError(f"VOCAB_SIZE={environ['VOCAB_SIZE']!r}: must be positive")
        if train_cfg.model.vocab_size not in (0, vocab):
            train_cfg = dataclasses.replace(train_cfg, model=dataclasses.replace(train_cfg.model, vocab_size=vocab))
    eval_only = _parse("EVAL_ONLY", environ["EVAL_ONLY"], bool) if "EVAL_ONLY" in environ else False
    if "EVAL_FINAL_ONLY" in environ and _parse("EVAL_FINAL_ONLY", environ["EVAL_FINAL_ONLY"], bool):
        eval_cfg = dataclasses.replace(eval_cfg, modes=[eval_cfg.final_mode])  # verify's isolated run: val_bpb only
    out_dir = Path(environ.get("OUT_DIR", "."))
    default_data = f"./data/datasets/fineweb10B_sp{vocab}"  # the public downloader's layout
    default_tokenizer = f"./data/tokenizers/fineweb_{vocab}_bpe.model"
    for name in ("DATA_PATH", "TOKENIZER_PATH", "OUT_DIR", "ARTIFACT_PATH", "RUN_ID"):
        if name in environ and not environ[name].strip():
            raise SettingsError(f"{name} is set but empty")
    paths = Paths(data=Path(environ.get("DATA_PATH", default_data)),
                  tokenizer=Path(environ.get("TOKENIZER_PATH", default_tokenizer)),
                  out_dir=out_dir, artifact=Path(environ.get("ARTIFACT_PATH", out_dir / ARTIFACT_NAME)),
                  run_id=environ.get("RUN_ID") or uuid.uuid4().hex[:12], vocab_size=vocab, eval_only=eval_only)
    return train_cfg, quant_cfg, eval_cfg, paths


# --- inputs -------------------------------------------------------------------------------


def load_tokenizer(paths: Paths):
    """The SentencePiece model at TOKENIZER_PATH (a .model file, as the public scripts take,
    or a folder with `tokenizer.model`), checked against the expected vocabulary."""
    path = paths.tokenizer
    try:
        if path.is_dir():
            sp = tokenizer.load_tokenizer(path)
        else:
            if not path.is_file():
                raise FileNotFoundError("no such file or folder")
            sp = spm.SentencePieceProcessor()
            sp.load(str(path))
            if sp.bos_id() != config.BOS_ID:
                raise ValueError(f"BOS id {sp.bos_id()}, the shards need {config.BOS_ID}")
    except (OSError, RuntimeError, ValueError) as err:
        raise SettingsError(f"TOKENIZER_PATH={str(path)!r}: {err}") from None
    if paths.vocab_size and sp.vocab_size() != paths.vocab_size:
        raise SettingsError(f"VOCAB_SIZE is {paths.vocab_size} (the environment's or the baked tokenize.vocab_size) "
                            f"but TOKENIZER_PATH={str(path)!r} has {sp.vocab_size()} pieces")
    return sp


def load_data(paths: Paths, sp, with_train: bool):
    """(train stream or None, val tokens, val byte counts) from DATA_PATH."""
    try:
        stream = data.TokenStream(data.list_shards(paths.data, "train"), sp.vocab_size()) if with_train else None
        val_tokens = data.load_split(paths.data, "val", sp.vocab_size())
        val_bytes = val_byte_counts(sp, paths.data, val_tokens)
    except (OSError, ValueError) as err:
        raise SettingsError(f"DATA_PATH={str(paths.data)!r}: {err}") from None
    return stream, val_tokens, val_bytes


def build_model(cfg: config.TrainConfig, vocab_size: int, device: torch.device) -> GPT:
    """The training model, with the kernels the run's switches resolve to on `device`."""
    return GPT(cfg.model.with_vocab(vocab_size), resolve_kernels(device, cfg.runtime)).to(device)


def running_script_bytes(script_path=None) -> int:
    """Bytes of the running script: what the challenge charges as code (0 when unknown)."""
    if script_path is None and sys.argv and sys.argv[0]:
        script_path = sys.argv[0]
    try:
        return Path(script_path).stat().st_size if script_path else 0
    except OSError:
        return 0


# --- the run --------------------------------------------------------------------------------


def val_loss_of(eval_cfg: config.EvaluateConfig, val_tokens: np.ndarray, val_bytes: np.ndarray,
                val_bpb: float) -> float:
    """Mean NLL in nats per scored target, from a mode's val_bpb: every mode scores each
    target of the (optionally truncated) stream once, so nll = bpb * ln 2 * bytes."""
    tokens, counts = truncated(eval_cfg, val_tokens, val_bytes)
    return val_bpb * math.log(2) * float(counts[1:].sum()) / (len(tokens) - 1)


def score_artifact(eval_cfg: config.EvaluateConfig, path: Path, vocab_size: int, val_tokens, val_bytes,
                   device: torch.device) -> dict:
    """`evaluate` every configured mode on the model read back from the artifact file."""

    def load_model():
        model = artifact.load_model(path).to(device)
        if model.cfg.vocab_size != vocab_size:
            raise SettingsError(f"ARTIFACT_PATH={str(path)!r}: model vocab {model.cfg.vocab_size} != the "
                                f"tokenizer's {vocab_size}")
        return model

    metrics = evaluate(eval_cfg, load_model, val_tokens, val_bytes, device, progress=dist.is_main())
    metrics["val_loss"] = val_loss_of(eval_cfg, val_tokens, val_bytes, metrics["val_bpb"])
    return metrics


def _printer(cfg: config.TrainConfig):
    def log(step: int, values: dict) -> None:
        if dist.is_main():
            print(report_line(step, cfg.schedule.iterations, values), flush=True)
    return log


def train_and_quantize(train_cfg, quant_cfg, paths: Paths, device, code_bytes: int):
    """Train (calibrating in the same launch when quantizing uses the Hessians), quantize
    and pack; rank 0 writes the artifact. Returns (train and quantize figures, vocabulary,
    val tokens, val byte counts)."""
    set_seed(train_cfg.seed)
    sp = load_tokenizer(paths)
    stream, val_tokens, val_bytes = load_data(paths, sp, with_train=True)
    model = build_model(train_cfg, sp.vocab_size(), device)
    if dist.is_main():
        print(f"run {paths.run_id}: {sum(p.numel() for p in model.parameters()):,} parameters on {device} x "
              f"{dist.world_size()}, {stream.num_tokens:,} train tokens, {len(val_tokens):,} val tokens, "
              f"{train_cfg.schedule.iterations} steps of {train_cfg.batch_tokens:,} tokens", flush=True)
    collected = []

    def calibrate(trained: GPT) -> None:
        collected.append(calibration.collect_hessians(trained, stream, train_cfg.calib_batches,
                                                      train_cfg.micro_batch_seqs, train_cfg.seq_len, device,
                                                      dist.autocast_dtype(device)))

    result: TrainResult = train(train_cfg, model, stream, val_tokens, val_bytes, device, _printer(train_cfg),
                                None, calibrate=calibrate if quant_cfg.uses_hessians else None)
    figures = {"train": dataclasses.asdict(result)}
    if dist.is_main():
        for warning in run_warnings(train_cfg, result):
            print(f"WARNING: {warning}", flush=True)
        start = time.perf_counter()
        # The weights as the quantize stage reads them from the train stage's file: float32,
        # in the file's order of tensors, which the artifact's layout follows (so the bytes
        # are the pipeline's, not only the model).
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save_model(Path(tmp) / "model.safetensors", model)
            state, _ = checkpoint.read_model_file(Path(tmp) / "model.safetensors")
        hessians = {k: h.detach().float().cpu() for k, h in collected[0].hessians.items()} \
            if quant_cfg.uses_hessians else None
        cache: dict = {}  # groups the k search compressed, reused by the final pack
        qm, _ = quantize_model(state, quant_cfg, hessians, device, model_config=dataclasses.asdict(model.cfg),
                               code_bytes=code_bytes, pack_cache=cache)
        quantize_seconds = time.perf_counter() - start
        qm, blob, pack, fit = pack_to_fit(qm, dataclasses.asdict(model.cfg), quant_cfg.compressors,
                                          quant_cfg.layouts, quant_cfg.fit_bytes, code_bytes, quant_cfg.chunk_bytes,
                                          cache=cache)
        io.write_bytes_atomic(paths.artifact, blob)
        figures["quantize"] = {"method": qm.method, "model_bytes": len(blob), "quantize_seconds": quantize_seconds,
                               "pack_seconds": time.perf_counter() - start - quantize_seconds,
                               "bytes_per_group": pack["bytes_per_group"],
                               "compressor_per_group": pack["compressor_per_group"], "fit": fit}
        print(f"quantize: {qm.method}, {len(blob):,} bytes in {time.perf_counter() - start:.1f} s -> "
              f"{paths.artifact}", flush=True)
    del model
    dist.barrier()  # the artifact is on disk before any rank reads it
    return figures, sp.vocab_size(), val_tokens, val_bytes


def report(paths: Paths, configs: dict, figures: dict, metrics: dict, code_bytes: int, device) -> dict:
    """Print the final line and write the JSON summary (rank 0's job)."""
    model_bytes = paths.artifact.stat().st_size
    total = code_bytes + model_bytes
    summary = {
        "run_id": paths.run_id, "eval_only": paths.eval_only,
        "val_bpb": metrics["val_bpb"], "val_loss": metrics["val_loss"], "final_mode": metrics["final_mode"],
        "artifact_bytes": total, "code_bytes": code_bytes, "model_bytes": model_bytes,
        "fits_16mb": total <= config.CHALLENGE_ARTIFACT_BYTES,
        **figures, "eval": metrics,
        "artifact_path": str(paths.artifact), "world_size": dist.world_size(), "device": str(device),
        "torch_version": torch.__version__, "settings": {name: config.to_dict(c) for name, c in configs.items()},
    }
    timings = ""
    if "train" in figures:
        t = figures["train"]
        timings += f" steps:{t['steps']} train_seconds:{t['train_seconds']:.1f} calib_seconds:{t['calib_seconds']:.2f}"
    if "quantize" in figures:
        q = figures["quantize"]
        timings += f" quantize_seconds:{q['quantize_seconds'] + q['pack_seconds']:.1f}"
    print(f"{FINAL_PREFIX}mode:{metrics['final_mode']} val_bpb:{metrics['val_bpb']:.8f} "
          f"val_loss:{metrics['val_loss']:.8f} artifact_bytes:{total} code_bytes:{code_bytes} "
          f"model_bytes:{model_bytes}{timings} eval_seconds:{metrics['eval_seconds']:.1f}", flush=True)
    if not summary["fits_16mb"]:
        print(f"WARNING: the artifact is {total:,} bytes, over the challenge's {config.CHALLENGE_ARTIFACT_BYTES:,}",
              flush=True)
    io.write_json_atomic(paths.out_dir / (EVAL_SUMMARY_NAME if paths.eval_only else SUMMARY_NAME), summary)
    return summary


def run(baked: dict, environ: typing.Mapping[str, str], script_path=None) -> dict | None:
    """The whole launch; returns the summary on rank 0 (None elsewhere)."""
    train_cfg, quant_cfg, eval_cfg, paths = settings_from_env(baked, environ)
    code_bytes = running_script_bytes(script_path)
    if paths.eval_only and not paths.artifact.is_file():
        raise SettingsError(f"ARTIFACT_PATH={str(paths.artifact)!r}: no such file (EVAL_ONLY=1 scores a given "
                            "artifact)")
    device = dist.select_device("auto" if paths.eval_only else train_cfg.runtime.device)
    dist.init(device.type)
    if paths.eval_only:  # as the evaluate stage: tokenizer, val split, the artifact
        sp = load_tokenizer(paths)
        _, val_tokens, val_bytes = load_data(paths, sp, with_train=False)
        figures, vocab, configs = {}, sp.vocab_size(), {"evaluate": eval_cfg}
    else:
        figures, vocab, val_tokens, val_bytes = train_and_quantize(train_cfg, quant_cfg, paths, device, code_bytes)
        configs = {"train": train_cfg, "quantize": quant_cfg, "evaluate": eval_cfg}
    metrics = score_artifact(eval_cfg, paths.artifact, vocab, val_tokens, val_bytes, device)
    summary = report(paths, configs, figures, metrics, code_bytes, device) if dist.is_main() else None
    dist.shutdown()
    return summary


def main(baked: dict, script_path=None) -> None:
    """The script's entry: `run` with this process's environment; a settings error exits
    with its message (naming the variable) instead of a traceback."""
    try:
        run(baked, os.environ, script_path)
    except SettingsError as err:
        raise SystemExit(f"error: {err}") from None
