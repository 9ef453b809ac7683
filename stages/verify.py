"""Stage `verify`: the artifact against the challenge's rules.

Fails (exit 1, after writing metrics/verify.json) when the artifact is over the byte
budget, does not round-trip bit-exactly against the quantizer's reference, when
training + calibration broke the time budget, or when the quantization damage (the
round-trip model's val_bpb minus the trained float model's, same windows and device)
exceeds `verify.max_quant_damage` (when set).
"""

import argparse
import sys
import time
from pathlib import Path

from pgolf_core import artifact, checkpoint, codesize, config, data, dist, io, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval.sliding import val_bpb


def verify(cfg: config.VerifyConfig, args) -> tuple[dict, list[str]]:
    """Metrics and the list of broken rules (empty when the artifact passes)."""
    blob = artifact.read_artifact(args.artifact / "model.bin")
    qm, _ = artifact.unpack_artifact(blob)
    mismatched = artifact.compare_exact(qm, artifact.read_reference(args.reference))
    code_total, code_files = codesize.code_bytes()
    train = io.read_json(args.train_metrics, "train metrics")
    if "calib_seconds" not in train:
        raise ValueError(f"{args.train_metrics} has no calib_seconds: written by an older train stage, rerun it")
    sp = tokenizer.load_tokenizer(args.tokenizer)
    model = artifact.load_model(args.artifact / "model.bin")
    if model.cfg.vocab_size != sp.vocab_size():
        raise ValueError(f"model vocab {model.cfg.vocab_size} != tokenizer vocab {sp.vocab_size()} ({args.tokenizer})")
    float_state, float_config = checkpoint.read_model_file(args.model)
    if float_config != model.cfg:
        raise ValueError(f"{args.model}'s model config differs from the artifact's: not the model it was quantized from")
    float_model = checkpoint.build_model(float_state, float_config)
    device = dist.select_device("auto")
    val_tokens = data.load_split(args.shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, args.shards, val_tokens)

    def score(m) -> float:  # the same windows, device and precision for both models
        bpb, _ = val_bpb(m.to(device), val_tokens, val_bytes, window=cfg.seq_len, stride=cfg.seq_len,
                         batch_seqs=cfg.batch_seqs, device=device, autocast_dtype=dist.autocast_dtype(device),
                         progress=True)
        return bpb

    float_bpb, roundtrip_bpb = score(float_model), score(model)
    metrics = {
        "artifact_bytes": code_total + len(blob), "code_bytes": code_total, "model_bytes": len(blob),
        "fits_16mb": code_total + len(blob) <= cfg.max_artifact_bytes,
        "roundtrip_exact": not mismatched, "val_bpb_float": float_bpb, "val_bpb_roundtrip": roundtrip_bpb,
        "quant_damage": roundtrip_bpb - float_bpb,
        "train_plus_calib_seconds": train["train_seconds"] + train["calib_seconds"],
        "code_files": {str(Path(p).relative_to(Path.cwd())) if Path(p).is_relative_to(Path.cwd()) else p: n
                       for p, n in code_files.items()},
    }
    broken = []
    if not metrics["fits_16mb"]:
        broken.append(f"artifact is {metrics['artifact_bytes']:,} bytes > {cfg.max_artifact_bytes:,}")
    if mismatched:
        broken.append(f"artifact differs from the quantizer's reference in {len(mismatched)} tensors: {mismatched[:5]}")
    if cfg.max_quant_damage and metrics["quant_damage"] > cfg.max_quant_damage:
        broken.append(f"quantization damage {metrics['quant_damage']:+.4f} val_bpb > verify.max_quant_damage "
                      f"{cfg.max_quant_damage}")
    if metrics["train_plus_calib_seconds"] > cfg.time_budget_seconds:
        broken.append(f"train + calibration took {metrics['train_plus_calib_seconds']:.1f} s "
                      f"> {cfg.time_budget_seconds} s")
    return metrics, broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("params", "artifact", "reference", "model", "shards", "tokenizer", "train-metrics", "metrics"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = config.load_section(args.params, "verify")
    try:
        metrics, broken = verify(cfg, args)
    except ValueError as e:  # unreadable, tampered or mismatched inputs: no metrics to write
        sys.exit(f"verify FAILED: {e}")
    inputs = {"artifact": io.sha256_tree(args.artifact), "shards": io.sha256_tree(args.shards)}
    code_files = metrics.pop("code_files")  # what code_bytes counted: provenance, not figures to compare
    io.write_stage_report(args.metrics, metrics, inputs, broken_rules=broken, code_files=code_files)
    print(f"verify: {metrics['artifact_bytes']:,} bytes ({metrics['code_bytes']:,} code + "
          f"{metrics['model_bytes']:,} model), round trip exact: {metrics['roundtrip_exact']}, "
          f"val_bpb float {metrics['val_bpb_float']:.4f} -> round trip {metrics['val_bpb_roundtrip']:.4f} "
          f"(damage {metrics['quant_damage']:+.4f}), {time.perf_counter() - start:.1f} s")
    if broken:
        sys.exit("verify FAILED:\n  " + "\n  ".join(broken))


if __name__ == "__main__":
    main()
