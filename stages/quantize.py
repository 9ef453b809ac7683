"""Stage `quantize`: trained model -> compressed artifact + quantizer reference + metrics."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from pgolf_core.artifact import pack_artifact, write_reference
from pgolf_core.checkpoint import read_model_file
from pgolf_core.config import load_section
from pgolf_core.io import atomic_path, sha256_files, write_stage_report
from pgolf_core.quant.rtn import quantize_rtn


def quantize(params: Path, model: Path, out: Path, reference: Path, metrics: Path) -> dict:
    cfg = load_section(params, "quantize")
    state, model_config = read_model_file(model)
    start = time.perf_counter()
    qm = quantize_rtn(state, cfg)
    blob, report = pack_artifact(qm, dataclasses.asdict(model_config), cfg.compressors)
    quantize_seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "model.bin").write_bytes(blob)
    write_reference(reference, qm)
    kinds = [t.kind for t in qm.tensors.values()]
    result = {
        "model_bytes": report["model_bytes"],
        "calib_seconds": 0.0,  # RTN reads no calibration data
        "quantize_seconds": quantize_seconds,
        "bytes_per_group": report["bytes_per_group"],
        "compressor_per_group": report["compressor_per_group"],
        "num_quantized_tensors": kinds.count("int8"),
        "num_passthrough_tensors": kinds.count("fp16"),
    }
    write_stage_report(metrics, result, {"model": sha256_files([model])})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    a = ap.parse_args()
    r = quantize(a.params, a.model, a.out, a.reference, a.metrics)
    print(f"quantize: rtn {r['num_quantized_tensors']} int8 + {r['num_passthrough_tensors']} fp16 tensors "
          f"-> {a.out / 'model.bin'} {r['model_bytes']:,} bytes in {r['quantize_seconds']:.2f}s")
    for group, size in r["bytes_per_group"].items():
        print(f"  {group:12s} {size:>12,} bytes  {r['compressor_per_group'][group]}")


if __name__ == "__main__":
    main()
