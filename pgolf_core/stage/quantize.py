"""Stage `quantize`: trained model (+ GPTQ's Hessians) -> compressed artifact + quantizer reference + metrics."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tqdm import tqdm

from pgolf_core.artifact import write_reference
from pgolf_core.calibration import load_hessians
from pgolf_core.checkpoint import read_model_file
from pgolf_core.compress import require_codecs
from pgolf_core.config import QuantizeConfig
from pgolf_core.dist import select_device
from pgolf_core.io import atomic_path, sha256_files
from pgolf_core.quant.fit import pack_to_fit
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.quant.rtn import is_quantized
from pgolf_core.stage.result import StageResult


@dataclasses.dataclass(frozen=True)
class QuantizePaths:
    model: Path = dataclasses.field(metadata={"help": "trained model file (.safetensors)"})
    hessians: Path = dataclasses.field(metadata={"help": "GPTQ's Hessians (.safetensors), read when method is gptq"})
    out: Path = dataclasses.field(metadata={"help": "output folder of the artifact (model.bin)"})
    reference: Path = dataclasses.field(metadata={"help": "quantizer's integers and scales (.safetensors)"})
    script: Path = dataclasses.field(metadata={"help": "the run's train_gpt.py (stage script): its bytes count "
                                                       "against quantize.fit_bytes"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: QuantizeConfig, paths: QuantizePaths) -> StageResult:
    """Quantize (searching k, to `quantize.sdclip_search_bytes` when set), pack (to `quantize.fit_bytes` when
    set) and write the artifact and the reference."""
    require_codecs(cfg.compressors)
    state, model_config = read_model_file(paths.model)
    start = time.perf_counter()
    found = load_hessians(paths.hessians) if cfg.uses_hessians else None  # none: quantize_model names the key
    matrices = sum(is_quantized(t, cfg.passthrough_max_numel) and name in (found or {}) for name, t in state.items()) \
        if cfg.method == "gptq" else 0
    # the shipped script's bytes: only the byte targets need them
    code = paths.script.stat().st_size if cfg.fit_bytes or cfg.sdclip_search_bytes else 0
    cache: dict = {}  # groups the k search compressed, reused by the final pack
    with tqdm(total=None if cfg.sdclip_search else matrices, desc=cfg.method, unit="matrix",
              disable=not matrices) as bar:  # the search quantizes once per candidate (and per confirming pack)
        qm, steps = quantize_model(state, cfg, found, select_device("auto"), progress=lambda name: bar.update(1),
                                   model_config=dataclasses.asdict(model_config), code_bytes=code, pack_cache=cache)
    quantize_seconds = time.perf_counter() - start
    with tqdm(desc="pack" if not cfg.fit_bytes else "fit_bytes probes", unit="probe") as bar:
        qm, blob, report, fit = pack_to_fit(qm, dataclasses.asdict(model_config), cfg.compressors, cfg.layouts,
                                            cfg.fit_bytes, code, cfg.chunk_bytes,
                                            progress=lambda n, size: bar.update(1), cache=cache)
    pack_seconds = time.perf_counter() - start - quantize_seconds
    with atomic_path(paths.out) as tmp:
        tmp.mkdir()
        (tmp / "model.bin").write_bytes(blob)
    write_reference(paths.reference, qm)
    kinds = [t.kind for t in qm.tensors.values()]
    r = {
        "model_bytes": report["model_bytes"],
        "method": qm.method,
        "quantize_seconds": quantize_seconds,  # choosing the integers, the k search's packs included (not in the training budget)
        "compress_seconds": pack_seconds,
        "bytes_per_group": report["bytes_per_group"],
        "compressor_per_group": report["compressor_per_group"],
        "layout_per_group": report["layout_per_group"],
        "seconds_per_group": report["seconds_per_group"],
        "lqer": steps["lqer"],
        **({"sdclip_k": steps["sdclip_k"]} if "sdclip_k" in steps else {}),
        **({"sdclip_search_error": _by_category_and_k(steps["sdclip_search"]["error"])}
           if "sdclip_search" in steps else {}),
        **({"sdclip_search_group_bytes": _by_category_and_k(steps["sdclip_search"]["bytes"]),
            "sdclip_search_predicted_bytes": steps["sdclip_search"]["predicted_model_bytes"],
            "sdclip_search_packs": steps["sdclip_search"]["packs"]}
           if "bytes" in steps.get("sdclip_search", {}) else {}),
        "fit": fit,
        "bits_per_group": dataclasses.asdict(cfg.bits),
        "num_quantized_tensors": kinds.count("int8"),
        "num_passthrough_tensors": kinds.count("fp16"),
    }
    summary = [f"quantize: {r['method']} {r['num_quantized_tensors']} integer + {r['num_passthrough_tensors']} fp16 "
               f"tensors in {r['quantize_seconds']:.2f} s, packed in {r['compress_seconds']:.2f} s "
               f"-> {paths.out / 'model.bin'} {r['model_bytes']:,} bytes"]
    for group, size in r["bytes_per_group"].items():
        chunks = report["chunks_per_group"][group]
        summary.append(f"  {group:12s} {size:>12,} bytes  {r['compressor_per_group'][group]:7s} "
                       f"{r['layout_per_group'][group]}" + (f" ({chunks} chunks)" if chunks > 1 else ""))
    if "sdclip_search" in steps:
        criterion = "least calibration output error" + (
            f" within {cfg.sdclip_search_bytes:,} bytes with code, {r['sdclip_search_packs']} packs"
            if cfg.sdclip_search_bytes else "")
        summary.append("  sdclip_search: k " + ", ".join(f"{c} {k:g}" for c, k in r["sdclip_k"].items()
                                                          if c in steps["sdclip_search"]["error"])
                       + f" ({criterion}, among " + ", ".join(f"{k:g}" for k in cfg.sdclip_search) + ")")
    if r["fit"]["zeroed"]:
        summary.append(f"  fit_bytes: zeroed {r['fit']['zeroed']:,} of {r['fit']['candidates']:,} +-1 integers in "
                       f"{r['fit']['probes']} probes -> {r['fit']['artifact_bytes']:,} bytes with code")
    return StageResult(r, {"model": sha256_files([paths.model])}, summary=summary)


def _by_category_and_k(table: dict[str, dict[float, float]]) -> dict[str, dict[str, float]]:
    """{category: {k: value}} with k as text ("11.5"), so DVC flattens it as `name.category.11.5`."""
    return {category: {f"{k:g}": value for k, value in by_k.items()} for category, by_k in table.items()}
