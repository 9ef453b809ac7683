"""A pgolf run as a challenge submission folder (issue 22).

`build_script(params)` generates the run's `train_gpt.py`: `pgolf_core.submission` and
every pgolf module it imports, bundled by `pgolf_core.bundle` (traced, minified,
self-extracting when smaller), with the profile's train, quantize and evaluate sections
baked in. `export_run(...)` writes a folder laid out like the public records
(`records/track_10min_16mb/<date>_<name>/`): `train_gpt.py`, `README.md` (what the run
does, its results, how to reproduce it), `submission.json` (the public records' fields,
author fields left empty for the user), `requirements.txt` (what the script imports
beyond torch and numpy, read from the bundled modules' imports), the train log when given,
and the tokenizer model when the run learnt its own (any source but the published shards).

It refuses, with every reason, a run that breaks a challenge rule (`broken_rules`): an
artifact (script as shipped + model) over 16,000,000 bytes (or a lower
`verify.max_artifact_bytes`); a challenge run (`challenge.not_a_challenge_run`) whose
training + calibration took over 600 s, or a run whose own budget check failed (any
other run is exported with its seconds reported as measurements, its README saying
plainly why it is no challenge run); a val_bpb whose mode is not one of pgolf's score-first evaluation
modes (`config.EVAL_MODES`) or not the mode the params fixed before evaluating; a final
mode projected over 600 s of evaluation on 8xH100; validation documents found in the
training shards (`validation_overlap`). Nothing is written when it refuses.

    python -m pgolf_core.submission_export --params params.yaml --artifact data/artifact \\
        --script data/script/train_gpt.py --train-metrics metrics/train/metrics.json \\
        --eval-metrics metrics/eval.json --verify-metrics metrics/verify.json \\
        --shards data/shards --tokenizer data/tokenizer --out records/track_10min_16mb/<date>_<name>
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from pgolf_core import artifact, bundle, challenge, config, data, io, submission, tokenizer
from pgolf_core.bpb import val_byte_counts

ENTRY_MODULE = "pgolf_core.submission"
KERNEL_MODULES = {"fused_mlp": "pgolf_core.fused_mlp", "fused_ce": "pgolf_core.fused_ce"}  # train.runtime switch -> module
SCRIPT_NAME = "train_gpt.py"
TRACK = "10min_16mb"
BAKED_SECTIONS = ("train", "quantize", "evaluate")
# Exact duplicates between a web corpus's validation and training documents exist (short
# boilerplate pages): a few are the data's, not the run's. A run that trained on the
# validation split has every validation document in its training data.
VAL_OVERLAP_TOLERANCE = 0.01  # fraction of validation tokens in documents also found in training
ALWAYS_PRESENT = ("torch", "numpy")  # the challenge's environment; never listed in requirements.txt


class ExportRefused(ValueError):
    """The run breaks the challenge's rules; `reasons` lists each broken rule."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("refused to export: the run breaks the challenge's rules:\n  " + "\n  ".join(self.reasons))


# --- the script -------------------------------------------------------------------------


def load_configs(params_path: str | Path) -> dict:
    """Every section of a params file as its typed config (defaults for absent sections)."""
    raw = config.load_params(params_path)
    return {name: config.build_section(name, raw.get(name) or {}) for name in config.SECTIONS}


def baked_params(params: dict) -> dict:
    """What `train_gpt.py` bakes in: the train, quantize and evaluate sections as plain
    values, and the tokenizer's vocabulary (`submission.settings_from_env` reads them)."""
    baked = {name: config.to_dict(params[name]) for name in BAKED_SECTIONS}
    baked["tokenize"] = {"vocab_size": params["tokenize"].vocab_size}
    return baked


def script_modules(train: config.TrainConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(entry modules, modules left out) of the run's script: training's fused kernels
    are bundled only when the run switches them on (`dispatch.resolve_kernels` imports
    them only then)."""
    switched = {module: getattr(train.runtime, switch) for switch, module in KERNEL_MODULES.items()}
    return (ENTRY_MODULE, *(m for m, on in switched.items() if on)), tuple(m for m, on in switched.items() if not on)


def build_script(params: dict) -> bundle.Shipped:
    """The run's `train_gpt.py` as shipped (see `bundle.shipped_script`), from the typed
    `train`, `quantize`, `evaluate` (baked in) and `script` (its payload) sections."""
    entries, left_out = script_modules(params["train"])
    return bundle.shipped_script(entries, ENTRY_MODULE, None, baked_params(params), left_out,
                                 params["script"].payload)


def _module_file(name: str) -> Path:
    base = bundle.SOURCE_ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")


def script_requirements(modules) -> tuple[list[str], list[str]]:
    """(requirements.txt lines `distribution==version` of what the bundled `modules`
    (`bundle.Shipped.modules`) import when loaded, beyond the standard library, pgolf and
    torch/numpy; the distributions imported only on optional paths). Read from those
    modules' sources, never a list."""
    required, optional = set(), set()
    for name in modules:
        req, opt = bundle.load_imports(ast.parse(_module_file(name).read_text(encoding="utf-8")))
        required |= req
        optional |= opt
    skip = set(sys.stdlib_module_names) | {"__future__", bundle.ROOT_PACKAGE, *ALWAYS_PRESENT}
    distributions = importlib.metadata.packages_distributions()

    def lines(modules) -> list[str]:
        out = set()
        for module in modules - skip:
            for dist in distributions.get(module, [module]):
                try:
                    out.add(f"{dist}=={importlib.metadata.version(dist)}")
                except importlib.metadata.PackageNotFoundError:
                    out.add(dist)
        return sorted(out, key=str.lower)

    required_lines = lines(required)
    return required_lines, [line for line in lines(optional - required) if line not in required_lines]


# --- the rules ------------------------------------------------------------------------------


def _fingerprints(tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a 64-bit fingerprint, the length) of each document of `tokens` (int64), documents
    starting at `starts` (the BOS positions, ascending, starts[0] == 0)."""
    lengths = np.diff(np.append(starts, len(tokens)))
    pos = np.arange(len(tokens), dtype=np.int64)
    s1 = np.add.reduceat(tokens, starts)
    s2 = np.add.reduceat(tokens * (pos - np.repeat(starts, lengths)), starts)
    s3 = np.add.reduceat(tokens * tokens, starts)
    with np.errstate(over="ignore"):
        parts = [x.astype(np.uint64) for x in (lengths, s1, s2, s3)]
        h = np.zeros(len(starts), dtype=np.uint64)
        for part, k in zip(parts, (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)):
            h = (h ^ (part * np.uint64(k))) * np.uint64(0x100000001B3)
    return h, lengths


def _documents(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.flatnonzero(tokens == config.BOS_ID)
    if not len(starts):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return _fingerprints(tokens[starts[0]:].astype(np.int64), starts - starts[0])


def validation_overlap(shards: str | Path, chunk_tokens: int = 1 << 22) -> dict:
    """How much of the validation split appears, document for document, in the training
    shards: {val_documents, val_tokens, overlap_documents, overlap_tokens}. Documents are
    BOS-delimited and compared by fingerprint; the train shards are read in chunks that end
    at a BOS, so memory stays bounded whatever their size."""
    val = data.load_split(shards, "val")
    val_h, val_len = _documents(val)
    found = np.zeros(len(val_h), dtype=bool)
    carry = np.zeros(0, dtype=np.uint16)
    for path in data.list_shards(shards, "train"):
        shard = data.read_shard(path, mmap=True)
        for begin in range(0, len(shard), chunk_tokens):
            buffer = np.concatenate([carry, shard[begin:begin + chunk_tokens]])
            bos = np.flatnonzero(buffer == config.BOS_ID)
            if len(bos) < 2:  # no whole document yet
                carry = buffer
                continue
            whole, carry = buffer[:bos[-1]], buffer[bos[-1]:]
            found |= np.isin(val_h, _documents(whole)[0])
    if len(carry):
        found |= np.isin(val_h, _documents(carry)[0])
    return {"val_documents": int(len(val_h)), "val_tokens": int(val_len.sum()),
            "overlap_documents": int(found.sum()), "overlap_tokens": int(val_len[found].sum())}


# Modules that read n-gram tables. The artifact has no place for tables, so a shipped script
# that bundles one could only read them from outside the 16,000,000 bytes.
NGRAM_MODULES = ("pgolf_core.ngrams", "pgolf_core.ngram_count")
# How far verify's isolated run of the shipped script may score from evaluate (bpb). On the
# CPU the two agree to the last digit (tested); on a GPU the TTT loops' atomics and
# compiled kernels may move the sixth decimal. A difference of code between what ran and
# what ships moves the score by far more (the 04-23 record's lost gate: 1.908).
ISOLATED_TOLERANCE = 1e-3


def broken_rules(params: dict, code_bytes: int, model_bytes: int, train_metrics: dict, eval_metrics: dict,
                 overlap: dict, bundled_modules: tuple[str, ...], verify_metrics: dict) -> list[str]:
    """Every challenge rule the run breaks (empty when none). `eval_metrics` holds the
    evaluate stage's figures and labels (`final_mode`); `bundled_modules` the shipped
    script's modules (traced, `bundle.Shipped.modules`); `verify_metrics` verify's figures
    and labels: the shipped script's own score of the artifact (`val_bpb_isolated`,
    `isolated_final_mode`) must be evaluate's. Never optional: without it nothing shows
    that the code that counts produced the score."""
    broken = []
    isolated, mode = verify_metrics.get("val_bpb_isolated"), verify_metrics.get("isolated_final_mode")
    final, val = eval_metrics.get("final_mode"), eval_metrics.get("val_bpb")
    if mode != final or isolated is None or val is None or not abs(isolated - val) <= ISOLATED_TOLERANCE:
        broken.append(f"the shipped script alone scored the artifact {isolated} in mode {mode!r}, evaluate "
                      f"{val} in mode {final!r}: the code that counts is not the code that produced the result")
    tables = [name for name in bundled_modules if name in NGRAM_MODULES]
    if tables:
        broken.append(f"the shipped script bundles {', '.join(tables)}: it could read n-gram tables at evaluation, "
                      "and tables read then must be inside the artifact and counted in its bytes (the artifact "
                      "format holds none)")
    limit = params["verify"].max_artifact_bytes
    if code_bytes + model_bytes > limit:
        broken.append(f"artifact is {code_bytes + model_bytes:,} bytes ({code_bytes:,} script + {model_bytes:,} model) "
                      f"> {limit:,}" + (" (verify.max_artifact_bytes)" if limit < config.CHALLENGE_ARTIFACT_BYTES else ""))
    if any(key not in train_metrics for key in ("train_seconds", "calib_seconds", "challenge_run")):
        broken.append("the train metrics have no train_seconds, calib_seconds or challenge_run: train + calibration "
                      "cannot be shown to fit the budget (rerun the train stage)")
    else:
        spent = train_metrics["train_seconds"] + train_metrics["calib_seconds"]
        if train_metrics["challenge_run"] and spent > challenge.SECONDS:  # another run's seconds are not the challenge's
            broken.append(f"a challenge run whose train + calibration took {spent:.1f} s > {challenge.SECONDS:.0f} s")
        if train_metrics.get("within_budget") is False:
            broken.append(f"train + calibration ({spent:.1f} s) broke the run's own wall-clock cap "
                          f"(within_budget false): calibration overran train.schedule.calib_reserve_seconds")
    final = eval_metrics.get("final_mode")
    if final is None:
        broken.append("the eval metrics do not say which mode val_bpb is (no final_mode)")
    elif final not in config.EVAL_MODES:
        broken.append(f"val_bpb is from evaluation mode {final!r}, not one of the score-first modes "
                      f"{', '.join(config.EVAL_MODES)}")
    elif final != params["evaluate"].final_mode:
        broken.append(f"val_bpb is from mode {final!r} but the params fixed evaluate.final_mode="
                      f"{params['evaluate'].final_mode!r} before evaluating: choosing afterwards is selection on "
                      "the validation set")
    elif eval_metrics.get("val_bpb") != eval_metrics.get(f"val_bpb_{final}"):
        broken.append(f"val_bpb {eval_metrics.get('val_bpb')} is not val_bpb_{final} "
                      f"{eval_metrics.get(f'val_bpb_{final}')}")
    projected = eval_metrics.get("projected_8xh100_seconds")
    if projected is None:
        broken.append("the eval metrics have no projected_8xh100_seconds: the evaluation budget cannot be shown")
    elif projected > challenge.SECONDS:
        broken.append(f"evaluation of the final mode projects to {projected:.0f} s on 8xH100 > "
                      f"{challenge.SECONDS:.0f} s")
    if overlap["overlap_tokens"] > VAL_OVERLAP_TOLERANCE * overlap["val_tokens"]:
        broken.append(f"the training shards hold {overlap['overlap_documents']:,} of the {overlap['val_documents']:,} "
                      f"validation documents ({overlap['overlap_tokens']:,} of {overlap['val_tokens']:,} tokens): "
                      "the validation split was trained on")
    return broken


# --- the folder ---------------------------------------------------------------------------------


def _changed(cfg, default, prefix: str) -> list[str]:
    """`key=value` for every setting of `cfg` that differs from `default` (nested)."""
    out = []
    for f in dataclasses.fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += _changed(value, base, f"{prefix}{f.name}.")
        elif value != base:
            out.append(f"{prefix}{f.name}={list(value) if isinstance(value, tuple) else value}")
    return out


def describe(params: dict) -> str:
    """Markdown: what the run does, from its params (every setting that differs from
    pgolf's defaults is listed, so nothing the run does is left unsaid)."""
    t, q, e = params["train"], params["quantize"], params["evaluate"]
    m, s, o = t.model, t.schedule, t.optimizer
    if s.mode == "wallclock":
        schedule = (f"wall clock: {s.max_wallclock_seconds:.0f} s cap ({s.calib_reserve_seconds:.0f} s kept for "
                    f"calibration), at most {s.iterations:,} steps")
    else:
        schedule = f"{s.iterations:,} steps" + (f", capped at {s.max_wallclock_seconds:.0f} s"
                                                if s.max_wallclock_seconds else "")
    loops = (f", layers {m.loop_start}-{m.loop_end} looped {m.num_loops} more times from "
             f"{s.loop_start_frac:.0%} of training" if m.num_loops else "")
    calibration = (f" on Hessians of {t.calib_batches} calibration batches per process, collected right after "
                   "training in the same launch" if q.method == "gptq" else "")
    stride = f", stride {e.stride}" if "sliding" in e.modes else ""
    changed = [c for name in BAKED_SECTIONS for c in _changed(params[name], config.SECTIONS[name](), f"{name}.")]
    return "\n".join([
        f"- Model: {m.num_layers} layer{'s' * (m.num_layers > 1)} x {m.model_dim}, {m.num_heads} heads "
        f"({m.num_kv_heads} KV), MLP x{m.mlp_mult} ({m.mlp_activation}), tied embedding, vocabulary "
        f"{params['tokenize'].vocab_size}{loops}.",
        f"- Training: Muon (matrices, lr {o.matrix_lr}) and Adam (embedding lr {o.embed_lr}, vectors lr "
        f"{o.scalar_lr}), EMA {o.ema_decay}; {t.batch_tokens:,} tokens per step in sequences of {t.seq_len}; "
        f"{schedule}, warm-down over the last {s.warmdown_frac:.0%}.",
        f"- Quantization: {q.method.upper()}{calibration}, {q.clip} clip, bits {config.to_dict(q.bits)}; each "
        f"tensor group packed with the smallest of {', '.join(q.compressors)}.",
        f"- Evaluation (score-first: every validation token is scored before anything learns from it): modes "
        f"{', '.join(e.modes)}; val_bpb is `{e.final_mode}`, fixed before evaluating; windows of {e.seq_len}{stride}.",
        "- Settings that differ from pgolf's defaults: " + (", ".join(f"`{c}`" for c in changed) or "none") + ".",
    ])


def run_metrics(train_metrics: Path, eval_metrics: Path) -> tuple[dict, dict, dict]:
    """(train figures + labels, eval figures + labels, the train provenance) of a run, as
    `export_run` takes them."""
    train_prov = _provenance_of(train_metrics)
    return ({**io.read_json(train_metrics, "train metrics"), **train_prov.get("labels", {})},
            stage_metrics(eval_metrics, "eval metrics"), train_prov)


def stage_metrics(path: Path, what: str) -> dict:
    """A stage's figures with its provenance's labels (strings live there)."""
    return {**io.read_json(path, what), **_provenance_of(path).get("labels", {})}


def _provenance_of(metrics_path: Path) -> dict:
    """The provenance beside a metrics file (or beside DVCLive's folder for its metrics.json)."""
    target = metrics_path.parent if metrics_path.name == "metrics.json" else metrics_path
    path = io.provenance_path(target)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _readme(name: str, params: dict, results: dict, requirements: list[str], files: list[str],
            learnt_tokenizer: bool, shipped: bundle.Shipped, programs: list[str]) -> str:
    r = results
    overlap = r["validation_overlap"]
    vocab = params["tokenize"].vocab_size
    tok_path = "./tokenizer.model" if learnt_tokenizer else f"./data/tokenizers/fineweb_{vocab}_bpe.model"
    data_path = "./data/shards" if learnt_tokenizer else f"./data/datasets/fineweb10B_sp{vocab}"
    challenge = r["challenge_run"]
    reasons = "; ".join(r["not_a_challenge_run"])
    challenge_text = ("yes" if challenge else f"no ({reasons or 'see the train metrics'}): the time figures are "
                      "measurements on this machine, not the challenge's 8xH100 launch (projections: training and "
                      "evaluation rows)") \
        if challenge is not None else "not recorded by this run's train metrics"
    projected = r["projected_train_seconds"]
    model = r["train_projection_model"] or "not recorded by this run's train metrics"
    train_projection = (f"{projected:.1f} s projected on 8xH100 ({model})" if projected is not None else
                        f"no 8xH100 projection ({model})")
    return f"""# {name}

{r['blurb']}

`train_gpt.py` is one self-contained script generated by pgolf (commit {r['git_commit'] or 'unknown'}) from its
own modules ({shipped.form}, {shipped.bytes:,} bytes; {shipped.sizes['plain']:,} readable). In one launch it
trains{' and collects calibration for GPTQ' if params['quantize'].method == 'gptq' else ''}, quantizes, compresses,
writes the artifact `final_model.pgolf`, reads it back and scores it; it imports no pgolf code at run time.

## What the run does

{describe(params)}

## Results

| | |
|---|---|
| val_bpb (`{r['final_mode']}`) | {r['val_bpb']:.8f} |
| val_loss (nats per token) | {r['val_loss']:.8f} |
| artifact bytes | {r['bytes_total']:,} = {r['bytes_code']:,} script + {r['bytes_model']:,} model |
| training | {r['steps']} steps, {r['train_seconds']:.1f} s + calibration {r['calib_seconds']:.1f} s measured; {train_projection} |
| evaluation (`{r['final_mode']}`) | {r['eval_seconds']:.1f} s measured, {r['projected_eval_seconds']:.1f} s projected on 8xH100 (this device's per-GPU rate taken as an H100's) |
| validation documents also in the training shards | {overlap['overlap_documents']:,} of {overlap['val_documents']:,} ({overlap['overlap_tokens']:,} of {overlap['val_tokens']:,} tokens; refused above {VAL_OVERLAP_TOLERANCE:.0%} of the tokens) |
| processes, device | {r['world_size']} x {r['hardware']} |
| seed | {r['seed']} |
| challenge run | {challenge_text} |

The figures are those of the pgolf pipeline run (its `train`, `quantize` and `evaluate` stages) made with the
same code and settings this script bakes in; the artifact bytes count this script as shipped.

## Reproduce

    pip install -r requirements.txt
    DATA_PATH={data_path} TOKENIZER_PATH={tok_path} SEED={r['seed']} \\
      torchrun --standalone --nproc_per_node={max(r['world_size'], 1)} train_gpt.py 2>&1 | tee train.log

The last line reads `final mode:{r['final_mode']} val_bpb:... val_loss:... artifact_bytes:...`; a JSON summary is
written beside the artifact. The public scripts' environment variables set the run (`ITERATIONS`,
`MAX_WALLCLOCK_SECONDS`, `TRAIN_BATCH_TOKENS`, `TRAIN_SEQ_LEN`, `VAL_LOSS_EVERY`, `NUM_LAYERS`, `MODEL_DIM`, ...).
Score a given artifact only:

    EVAL_ONLY=1 ARTIFACT_PATH=final_model.pgolf DATA_PATH={data_path} TOKENIZER_PATH={tok_path} python train_gpt.py
{"" if not learnt_tokenizer else f'''
The run learnt its own tokenizer (`tokenizer.model`, vocabulary {vocab}): `DATA_PATH` is the folder of shards
pgolf's `tokenize` stage writes with it (`tokenize.source: {params['tokenize'].source}`).
'''}
## Files

{chr(10).join(f"- `{f}`" for f in files)}

Requirements beyond torch and numpy (from the script's imports): {', '.join(requirements) or 'none'}.
{"" if not programs else f"System programs it runs (not from pip): {', '.join(programs)}." + chr(10)}"""


def export_run(params: dict, artifact_dir: str | Path, train_metrics: dict, eval_metrics: dict,
               shards: str | Path, tokenizer_dir: str | Path, out: str | Path, *, shipped: str | Path,
               verify_metrics: dict, train_log: str | Path | None = None, name: str | None = None,
               script: bundle.Shipped | None = None, hardware: str | None = None,
               torch_version: str | None = None, git_commit: str | None = None,
               now: datetime.datetime | None = None) -> dict:
    """Write the submission folder `out` for a run; returns what went into
    submission.json. `params`: every section's typed config (`load_configs`);
    `artifact_dir`: the quantize stage's folder (`model.bin`); `train_metrics`,
    `eval_metrics` and `verify_metrics`: the stages' figures with their provenance labels
    (`final_mode`, `isolated_final_mode`); `shards` and `tokenizer_dir`: the tokenize
    stage's folders; `shipped`: the script the run shipped (the script stage's, the one
    verify ran), which must be the one these params generate: the folder gets that script.
    Raises ExportRefused (nothing written) when the run breaks a rule."""
    artifact_dir, out, shards = Path(artifact_dir), Path(out), Path(shards)
    script = script or build_script(params)
    blob = artifact.read_artifact(artifact_dir / "model.bin")
    sp = tokenizer.load_tokenizer(tokenizer_dir)
    header_config = artifact.read_header(blob)["model_config"]
    problems = []
    if header_config != config.to_dict(params["train"].model.with_vocab(sp.vocab_size())):
        problems.append("the artifact's model config is not train.model of these params (with the tokenizer's "
                        "vocabulary): it was made by other settings")
    if Path(shipped).read_bytes() != script.data:
        problems.append(f"{shipped} differs from the script these params and this checkout generate: the run "
                        "shipped other code (regenerate it with the script stage and rerun verify)")
    overlap = validation_overlap(shards)
    problems += broken_rules(params, script.bytes, len(blob), train_metrics, eval_metrics, overlap, script.modules,
                             verify_metrics)
    if problems:
        raise ExportRefused(problems)

    eval_cfg = params["evaluate"]
    val_tokens = data.load_split(shards, "val", sp.vocab_size())
    val_loss = submission.val_loss_of(eval_cfg, val_tokens, val_byte_counts(sp, shards, val_tokens),
                                      eval_metrics["val_bpb"])
    final = eval_metrics["final_mode"]
    seed = int(train_metrics.get("seed", params["train"].seed))
    total = script.bytes + len(blob)
    spent = train_metrics["train_seconds"] + train_metrics["calib_seconds"]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = name or out.name.split("_", 1)[-1]
    world = int(train_metrics.get("world_size", 1))
    hardware = hardware or "unknown device"
    blurb = (f"pgolf {params['train'].model.num_layers}x{params['train'].model.model_dim} model, "
             f"{params['quantize'].method.upper()} quantization, val_bpb from score-first `{final}` evaluation; "
             f"one self-contained generated train_gpt.py.")
    submission_json = {
        "author": "", "github_id": "", "name": name, "blurb": blurb,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "track": TRACK,
        "val_loss": val_loss, "val_bpb": eval_metrics["val_bpb"],
        "bytes_total": total, "bytes_code": script.bytes, "bytes_model": len(blob),
        "seeds": [seed], "seed_results": {str(seed): {"val_bpb": eval_metrics["val_bpb"], "val_loss": val_loss,
                                                      "artifact_bytes": total}},
        "hardware": f"{world}x {hardware}", "pytorch_version": torch_version or "",
        "compliance": {
            "artifact_under_16mb": total <= config.CHALLENGE_ARTIFACT_BYTES,
            "train_under_600s": spent <= challenge.SECONDS,
            "eval_under_600s": eval_metrics["projected_8xh100_seconds"] <= challenge.SECONDS,
            "score_first_eval": True, "validation_not_trained_on": True,
            "challenge_run": train_metrics.get("challenge_run"),
        },
    }
    requirements, optional = script_requirements(script.modules)
    # the artifact's groups may be lrzip's, which the script runs as a program (`compress`)
    programs = ["lrzip"] if "lrzip" in params["quantize"].compressors else []
    learnt_tokenizer = params["tokenize"].source != "published"
    files = [SCRIPT_NAME, "README.md", "submission.json", "requirements.txt"]
    if train_log:
        files.append("train.log")
    if learnt_tokenizer:
        files.append("tokenizer.model")
    results = {"blurb": blurb, "final_mode": final, "val_bpb": eval_metrics["val_bpb"], "val_loss": val_loss,
               "bytes_total": total, "bytes_code": script.bytes, "bytes_model": len(blob),
               "steps": train_metrics.get("steps", 0), "train_seconds": train_metrics["train_seconds"],
               "calib_seconds": train_metrics["calib_seconds"],
               "projected_train_seconds": train_metrics.get("projected_8xh100_train_plus_calib_seconds"),
               "train_projection_model": train_metrics.get("projection_model_8xh100", ""),
               "eval_seconds": eval_metrics.get(f"eval_seconds_{final}", float("nan")),
               "projected_eval_seconds": eval_metrics["projected_8xh100_seconds"], "world_size": world,
               "hardware": hardware, "seed": seed, "challenge_run": train_metrics.get("challenge_run"),
               "not_a_challenge_run": list(train_metrics.get("not_a_challenge_run", [])),
               "validation_overlap": overlap, "git_commit": git_commit}
    requirements_text = "".join(f"{line}\n" for line in requirements)
    if optional:
        requirements_text += "# imported only inside functions, on paths a run may not take: " + ", ".join(optional) + "\n"
    if programs:
        requirements_text += "# system programs, not from pip (quantize.compressors): " + ", ".join(programs) + "\n"
    with io.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / SCRIPT_NAME).write_bytes(script.data)
        (tmp / "submission.json").write_text(json.dumps(submission_json, indent=2) + "\n", encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements_text, encoding="utf-8")
        (tmp / "README.md").write_text(_readme(name, params, results, requirements, files, learnt_tokenizer, script, programs),
                                       encoding="utf-8")
        if train_log:
            shutil.copyfile(train_log, tmp / "train.log")
        if learnt_tokenizer:
            shutil.copyfile(Path(tokenizer_dir) / tokenizer.MODEL_FILE, tmp / "tokenizer.model")
    return submission_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--artifact", type=Path, required=True, help="the quantize stage's folder (model.bin)")
    parser.add_argument("--train-metrics", type=Path, required=True, help="metrics/train/metrics.json")
    parser.add_argument("--eval-metrics", type=Path, required=True, help="metrics/eval.json")
    parser.add_argument("--shards", type=Path, required=True, help="train and val shards (checked for overlap)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.model")
    parser.add_argument("--out", type=Path, required=True, help="records/track_10min_16mb/<date>_<name>")
    parser.add_argument("--script", type=Path, required=True,
                        help="data/script/train_gpt.py: the script the run shipped and verify ran")
    parser.add_argument("--verify-metrics", type=Path, required=True,
                        help="metrics/verify.json: the shipped script's own score must be evaluate's")
    parser.add_argument("--train-log", type=Path, default=None)
    parser.add_argument("--name", default=None, help="submission name (default: from --out)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"export: {args.out} exists and is not empty; choose a new folder")
    train_metrics, eval_metrics, train_prov = run_metrics(args.train_metrics, args.eval_metrics)
    verify_metrics = stage_metrics(args.verify_metrics, "verify metrics")
    try:
        result = export_run(load_configs(args.params), args.artifact, train_metrics,
                            eval_metrics, args.shards, args.tokenizer, args.out, train_log=args.train_log,
                            shipped=args.script, verify_metrics=verify_metrics,
                            name=args.name, hardware=train_prov.get("device"),
                            torch_version=train_prov.get("torch_version"), git_commit=io.git_state()["git_commit"])
    except (ExportRefused, ValueError, FileNotFoundError) as err:
        sys.exit(f"export FAILED: {err}")
    print(f"export: {args.out}: val_bpb {result['val_bpb']:.6f}, {result['bytes_total']:,} bytes "
          f"({result['bytes_code']:,} script + {result['bytes_model']:,} model)")


if __name__ == "__main__":
    main()
