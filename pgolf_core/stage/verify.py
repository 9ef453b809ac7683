"""Stage `verify`: the artifact against the challenge's rules.

The artifact is the shipped script (`train_gpt.py`, stage `script`) plus the compressed
model: `code_bytes` is the script's size as shipped. The script is then run alone: copied
with the model into an empty folder and started with `python -I` where `pgolf_core`
cannot be imported (`bundle.run_isolated`), it scores the artifact in the baked final
mode (`EVAL_ONLY=1 EVAL_FINAL_ONLY=1`): `val_bpb_isolated`, which equals `evaluate`'s
`val_bpb` when the shipped code alone rebuilds the score.

Fails (exit 1, after writing metrics/verify.json) when the artifact is over the byte
budget, does not round-trip bit-exactly against the quantizer's reference, when the
script cannot score it alone, when a challenge run's training + calibration took over
the challenge's 600 s (another run's seconds are reported, not checked: they are not the
challenge's), or when the quantization damage (the round-trip model's val_bpb minus the
trained float model's, same windows and device) exceeds `verify.max_quant_damage` (when
set).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from pgolf_core import artifact, bundle, checkpoint, dist, io, submission, tokenizer
from pgolf_core.challenge import SECONDS as CHALLENGE_SECONDS
from pgolf_core.config import CHALLENGE_ARTIFACT_BYTES, VerifyConfig
from pgolf_core.eval.sliding import val_bpb
from pgolf_core.stage.result import StageResult
from pgolf_core.stage.validation import check_model_vocab, load_validation


@dataclasses.dataclass(frozen=True)
class VerifyPaths:
    artifact: Path = dataclasses.field(metadata={"help": "artifact folder (model.bin)"})
    reference: Path = dataclasses.field(metadata={"help": "quantizer's reference (.safetensors)"})
    model: Path = dataclasses.field(metadata={"help": "trained float model (.safetensors)"})
    shards: Path
    tokenizer: Path
    train_metrics: Path = dataclasses.field(metadata={"help": "the train stage's metrics.json"})
    script: Path = dataclasses.field(metadata={"help": "the run's train_gpt.py (stage script)"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: VerifyConfig, paths: VerifyPaths) -> StageResult:
    """The metrics, with the broken rules (empty when the artifact passes) in the result
    and in the provenance."""
    start = time.perf_counter()
    blob = artifact.read_artifact(paths.artifact / "model.bin")
    qm, _ = artifact.unpack_artifact(blob)
    mismatched = artifact.compare_exact(qm, artifact.read_reference(paths.reference))
    code_total = paths.script.stat().st_size  # the file as shipped, whatever its encoding
    train = io.read_json(paths.train_metrics, "train metrics")
    for key in ("calib_seconds", "challenge_run"):
        if key not in train:
            raise ValueError(f"{paths.train_metrics} has no {key}: written by an older train stage, rerun it")
    sp, val_tokens, val_bytes = load_validation(paths.tokenizer, paths.shards)
    model = artifact.load_model(paths.artifact / "model.bin")
    check_model_vocab(model.cfg, sp, paths.tokenizer)
    float_state, float_config = checkpoint.read_model_file(paths.model)
    if float_config != model.cfg:
        raise ValueError(f"{paths.model}'s model config differs from the artifact's: not the model it was quantized from")
    float_model = checkpoint.build_model(float_state, float_config)
    device = dist.select_device("auto")

    def score(m) -> float:  # the same windows, device and precision for both models
        bpb, _ = val_bpb(m.to(device), val_tokens, val_bytes, window=cfg.seq_len, stride=cfg.seq_len,
                         batch_seqs=cfg.batch_seqs, device=device, autocast_dtype=dist.autocast_dtype(device),
                         progress=True)
        return bpb

    float_bpb, roundtrip_bpb = score(float_model), score(model)
    isolated, isolated_failure = score_alone(paths)
    metrics = {
        "artifact_bytes": code_total + len(blob), "code_bytes": code_total, "model_bytes": len(blob),
        # the challenge's cap whatever verify.max_artifact_bytes says: a lowered cap is checked below
        "fits_16mb": code_total + len(blob) <= CHALLENGE_ARTIFACT_BYTES,
        "roundtrip_exact": not mismatched, "val_bpb_float": float_bpb, "val_bpb_roundtrip": roundtrip_bpb,
        "quant_damage": roundtrip_bpb - float_bpb,
        "val_bpb_isolated": isolated.get("val_bpb", float("nan")),
        "isolated_final_mode": isolated.get("final_mode", "none"), "isolated_seconds": isolated.get("seconds", 0.0),
        "train_plus_calib_seconds": train["train_seconds"] + train["calib_seconds"],
        "challenge_run": train["challenge_run"],
    }
    broken = [isolated_failure] if isolated_failure else []
    if metrics["artifact_bytes"] > cfg.max_artifact_bytes:
        broken.append(f"artifact is {metrics['artifact_bytes']:,} bytes > {cfg.max_artifact_bytes:,}"
                      + ("" if cfg.max_artifact_bytes == CHALLENGE_ARTIFACT_BYTES else
                         " (verify.max_artifact_bytes)"))
    if mismatched:
        broken.append(f"artifact differs from the quantizer's reference in {len(mismatched)} tensors: {mismatched[:5]}")
    if cfg.max_quant_damage and metrics["quant_damage"] > cfg.max_quant_damage:
        broken.append(f"quantization damage {metrics['quant_damage']:+.4f} val_bpb > verify.max_quant_damage "
                      f"{cfg.max_quant_damage}")
    if metrics["challenge_run"] and metrics["train_plus_calib_seconds"] > CHALLENGE_SECONDS:
        broken.append(f"a challenge run whose train + calibration took {metrics['train_plus_calib_seconds']:.1f} s "
                      f"> {CHALLENGE_SECONDS:g} s")
    inputs = {"artifact": io.sha256_tree(paths.artifact), "shards": io.sha256_tree(paths.shards)}
    summary = [f"verify: {metrics['artifact_bytes']:,} bytes ({metrics['code_bytes']:,} code + "
               f"{metrics['model_bytes']:,} model), round trip exact: {metrics['roundtrip_exact']}, "
               f"val_bpb float {metrics['val_bpb_float']:.4f} -> round trip {metrics['val_bpb_roundtrip']:.4f} "
               f"(damage {metrics['quant_damage']:+.4f}), {time.perf_counter() - start:.1f} s"]
    summary.append(f"verify: train + calibration {metrics['train_plus_calib_seconds']:.1f} s, "
                   + (f"a challenge run: checked against {CHALLENGE_SECONDS:g} s" if metrics["challenge_run"] else
                      f"not a challenge run: reported, not checked against the challenge's {CHALLENGE_SECONDS:g} s"))
    return StageResult(metrics, inputs, provenance={"broken_rules": broken},
                       broken_rules=broken, summary=summary)


def score_alone(paths: VerifyPaths) -> tuple[dict, str]:
    """({val_bpb, final_mode, seconds}, "") from the shipped script run alone on the
    artifact, or ({}, why it failed). The script and the model are copied into an empty
    folder; the process sees no repository and cannot import pgolf_core."""
    with tempfile.TemporaryDirectory(prefix="pgolf-verify-") as folder:
        folder = Path(folder)
        script = folder / "train_gpt.py"
        shutil.copyfile(paths.script, script)
        shutil.copyfile(paths.artifact / "model.bin", folder / submission.ARTIFACT_NAME)
        env = {**submission.settings_free(os.environ),
               "DATA_PATH": str(paths.shards.resolve()),
               "TOKENIZER_PATH": str((paths.tokenizer / tokenizer.MODEL_FILE).resolve()),
               "EVAL_ONLY": "1", "EVAL_FINAL_ONLY": "1", "OUT_DIR": str(folder),
               "ARTIFACT_PATH": str(folder / submission.ARTIFACT_NAME)}
        start = time.perf_counter()
        run = bundle.run_isolated(script, env=env, cwd=folder)
        seconds = time.perf_counter() - start
        summary_file = folder / submission.EVAL_SUMMARY_NAME
        if run.returncode != 0 or not summary_file.is_file():
            tail = (run.stderr or run.stdout or "").strip().splitlines()[-5:]
            return {}, f"the shipped script could not score the artifact alone (exit {run.returncode}): " + \
                " | ".join(tail)
        summary = io.read_json(summary_file, "the isolated run's summary")
    return {"val_bpb": summary["val_bpb"], "final_mode": summary["final_mode"], "seconds": seconds}, ""
