"""Stage `verify`: the artifact against the challenge's rules.

Fails (exit 1, after writing metrics/verify.json) when the artifact is over the byte
budget, does not round-trip bit-exactly against the quantizer's reference, or when
training + calibration broke the time budget.
"""

import argparse
import sys
import time
from pathlib import Path

from pgolf_core import artifact, codesize, config, data, dist, io, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval.sliding import val_bpb


def verify(cfg: config.VerifyConfig, args) -> tuple[dict, list[str]]:
    """Metrics and the list of broken rules (empty when the artifact passes)."""
    blob = artifact.read_artifact(args.artifact / "model.bin")
    qm, _ = artifact.unpack_artifact(blob)
    mismatched = artifact.compare_exact(qm, artifact.read_reference(args.reference))
    code_total, code_files = codesize.code_bytes()
    train_seconds = io.read_json(args.train_metrics, "train metrics")["train_seconds"]
    calib_seconds = io.read_json(args.quant_metrics, "quantize metrics")["calib_seconds"]
    sp = tokenizer.load_tokenizer(args.tokenizer)
    model = artifact.load_model(args.artifact / "model.bin")
    if model.cfg.vocab_size != sp.vocab_size():
        raise ValueError(f"model vocab {model.cfg.vocab_size} != tokenizer vocab {sp.vocab_size()} ({args.tokenizer})")
    device = dist.select_device("auto")
    val_tokens = data.load_split(args.shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, args.shards, val_tokens)
    roundtrip_bpb, _ = val_bpb(model.to(device), val_tokens, val_bytes, window=cfg.seq_len,
                               stride=cfg.seq_len, batch_seqs=cfg.batch_seqs, device=device,
                               autocast_dtype=dist.autocast_dtype(device), progress=True)
    metrics = {
        "artifact_bytes": code_total + len(blob), "code_bytes": code_total, "model_bytes": len(blob),
        "fits_16mb": code_total + len(blob) <= cfg.max_artifact_bytes,
        "roundtrip_exact": not mismatched, "val_bpb_roundtrip": roundtrip_bpb,
        "train_plus_calib_seconds": train_seconds + calib_seconds,
        "code_files": {str(Path(p).relative_to(Path.cwd())) if Path(p).is_relative_to(Path.cwd()) else p: n
                       for p, n in code_files.items()},
    }
    broken = []
    if not metrics["fits_16mb"]:
        broken.append(f"artifact is {metrics['artifact_bytes']:,} bytes > {cfg.max_artifact_bytes:,}")
    if mismatched:
        broken.append(f"artifact differs from the quantizer's reference in {len(mismatched)} tensors: {mismatched[:5]}")
    if metrics["train_plus_calib_seconds"] > cfg.time_budget_seconds:
        broken.append(f"train + calibration took {metrics['train_plus_calib_seconds']:.1f} s "
                      f"> {cfg.time_budget_seconds} s")
    return metrics, broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("params", "artifact", "reference", "shards", "tokenizer", "train-metrics", "quant-metrics", "metrics"):
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
          f"val_bpb_roundtrip {metrics['val_bpb_roundtrip']:.4f}, {time.perf_counter() - start:.1f} s")
    if broken:
        sys.exit("verify FAILED:\n  " + "\n  ".join(broken))


if __name__ == "__main__":
    main()
