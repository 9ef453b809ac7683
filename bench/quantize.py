"""Quantization damage and bytes of a profile's model: RTN against GPTQ on the same grid.

Trains the profile's model once on the dev corpus (`../shared/data/build_dev_corpus.py`;
the first 250 documents are validation) at a small batch for at most one epoch, with the
EMA off so the saved weights are the trained ones, collects GPTQ's Hessians right after
training as the train stage does (`calib_batches` batches of the profile's micro-batch,
so `calib_seconds` is the time one rank of the profile's run would spend), saves model
and Hessians, then quantizes the same weights with RTN and with GPTQ using the profile's
SDClip scales and widths: the difference between the two is GPTQ's error propagation
alone. Each is packed as the quantize stage packs it and scored as verify scores it
(non-overlapping windows of the profile's verify.seq_len), with sliding windows too
unless --no-sliding. These are dev-corpus figures, not FineWeb's.

Then, from the same GPTQ integers, Quantization II's options one at a time: + LQER
(`--lqer-rank`, `--lqer-top-k`; record 4 and 3), + the int8 attention gate, both, each
scored (keys val_bpb_gptq_lqer, model_bytes_gptq_lqer, ..._gate, ..._lqer_gate, with the
bytes LQER costs and the damage it removes); GPTQ-lite (per-row percentile clips, no
Hessians) beside RTN and GPTQ (val_bpb_gptq_lite, model_bytes_gptq_lite); the opt-in
variant `search_bytes` lets GPTQ choose SDClip's k per category among `--search-k` by
calibration error within `--fit-bytes` (gptq_search_bytes, sdclip_k_gptq_search_bytes); variant `fit` packs GPTQ alone and GPTQ with
LQER and the int8 gate to the same byte target (`--fit-bytes`, artifact with the profile's
code; issue 20's 15,950,000 by default) by `fit_bytes`' pruning, and scores both
(gptq_fit, gptq_lqer_gate_fit, and `fit_lqer_gate_damage_gain`: positive when the options
remove more damage than the pruning that pays for them adds); and each layout of `--layouts` packed alone
(model_bytes_gptq_<layout>, val_bpb_gptq_<layout>: layouts are lossless, which the
round trip checks, so their val_bpb is GPTQ's, not re-scored). `--layouts ''` and
`--variants` (none given: none) keep a run cheap.

    python -m bench.quantize --profile profiles/record_1xh100.yaml --workdir data/dev_run --steps 70

Writes bench/results/quantize.json (GPU runs; `--out` elsewhere), rewritten after every
packed and scored variant with `"complete": false` until the last, so a device call cut by
its time limit keeps what it measured (a cut at b440bab left only the log).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.header import RESULTS, header
from bench.train_dev_run import prepare
from pgolf_core import calibration, checkpoint, config, data, dist, submission_export, tokenizer
from pgolf_core.artifact import compare_exact, load_model, pack_artifact, unpack_artifact
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval.sliding import val_bpb
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT
from pgolf_core.quant.fit import pack_to_fit
from pgolf_core.quant.gptq import quantize_gptq
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.quant.rtn import quantize_rtn
from pgolf_core.train import set_seed, train

VARIANTS = ("lqer", "gate", "lqer_gate", "fit", "search_bytes")
DEFAULT_VARIANTS = ("lqer", "gate", "lqer_gate", "fit")  # search_bytes: one GPTQ and one pack per candidate k
TARGET_ARTIFACT_BYTES = 15_950_000  # issue 19's target: artifact with code at most this many bytes
TRAIN_RUN = "train_run.json"  # the training run's figures beside its model and Hessians in --workdir


def train_once(cfg: config.TrainConfig, shards: Path, sp, device, calib_seqs: int, work: Path) -> dict:
    """Train, collect Hessians in the same run, save both under `work`; the run's figures."""
    set_seed(cfg.seed)
    kernels = resolve_kernels(device, cfg.runtime)
    model = GPT(cfg.model.with_vocab(sp.vocab_size()), kernels).to(device)
    stream = data.TokenStream(data.list_shards(shards, "train"), sp.vocab_size())
    val = data.load_split(shards, "val", sp.vocab_size())
    collected = []

    def calibrate(trained: GPT) -> None:
        collected.append(calibration.collect_hessians(trained, stream, cfg.calib_batches, calib_seqs, cfg.seq_len,
                                                      device, dist.autocast_dtype(device)))

    result = train(cfg, model, stream, val, val_byte_counts(sp, shards, val), device, calibrate=calibrate)
    checkpoint.save_model(work / "model.safetensors", model)
    calibration.save_hessians(work / "hessians.safetensors", collected[0])
    run = {"steps": result.steps, "train_tokens": stream.num_tokens, "train_seconds": result.train_seconds,
           "calib_seconds": result.calib_seconds, "calib_tokens": collected[0].tokens,
           "num_params": sum(p.numel() for p in model.parameters()), "device": str(device)}
    (work / TRAIN_RUN).write_text(json.dumps(run, indent=2) + "\n")  # what --reuse reports
    return run


def score(model, val, val_bytes, device, window: int, stride: int, batch_seqs: int) -> float:
    bpb, _ = val_bpb(model.to(device), val, val_bytes, window=window, stride=stride, batch_seqs=batch_seqs,
                     device=device, autocast_dtype=dist.autocast_dtype(device), progress=True)
    return bpb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_1xh100.yaml")
    parser.add_argument("--corpus", default="data/dev_corpus/docs.jsonl")
    parser.add_argument("--workdir", default=None, help="keeps tokenizer, shards, model and Hessians between runs")
    parser.add_argument("--batch-tokens", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=70, help="capped at one epoch of the corpus")
    parser.add_argument("--micro-batch-seqs", type=int, default=32)
    parser.add_argument("--reuse", action="store_true", help="quantize the model and Hessians already in --workdir "
                        "(their run's figures, calib_seconds included, come from its train_run.json)")
    parser.add_argument("--reserve-profile", default="profiles/record_8xh100.yaml",
                        help="the challenge profile whose train.schedule.calib_reserve_seconds calib_seconds is "
                             "judged against (the 1xH100 profile sets none: it has no cap)")
    parser.add_argument("--no-sliding", action="store_true", help="score non-overlapping windows only")
    parser.add_argument("--val-tokens", type=int, default=0, help="score only the first N val tokens (0 = all; CPU smoke runs)")
    parser.add_argument("--lqer-rank", type=int, default=4)
    parser.add_argument("--lqer-top-k", type=int, default=3)
    parser.add_argument("--layouts", default="row,col,row+shuffle,col+shuffle,row+nn+shuffle,col+nn+shuffle",
                        help="comma-separated layouts packed alone from the GPTQ integers ('' = none)")
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="Quantization II options scored on top of GPTQ (none listed: none)")
    parser.add_argument("--no-lite", action="store_true", help="skip GPTQ-lite (one more pack and score)")
    parser.add_argument("--search-k", type=float, nargs="+", default=[10.0, 11.5, 13.0, 14.0, 16.0, 18.0],
                        help="variant search_bytes: the candidate SDClip k, chosen per category by least "
                             "calibration output error within --fit-bytes")
    parser.add_argument("--fit-bytes", type=int, default=TARGET_ARTIFACT_BYTES,
                        help="variant fit: the byte target of the artifact with the profile's code")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a quantize key")
    parser.add_argument("--out", default=str(RESULTS / "quantize.json"))
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    tok_cfg = config.build_section("tokenize", overrides.get("tokenize", {}))
    profile_train = config.build_section("train", overrides.get("train", {}))
    quant_cfg = config.build_section("quantize", config.merge_nested(overrides.get("quantize", {}),
                                                                 config.parse_assignments(args.set)))
    verify_cfg = config.build_section("verify", overrides.get("verify", {}))
    eval_cfg = config.build_section("evaluate", overrides.get("evaluate", {}))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pgolf-quantize-"))
    shards, tok_dir = prepare(work, Path(args.corpus), tok_cfg.vocab_size)
    sp = tokenizer.load_tokenizer(tok_dir)
    epoch_steps = data.TokenStream(data.list_shards(shards, "train"), sp.vocab_size()).num_tokens // args.batch_tokens
    cfg = config.build_section("train", config.merge_nested(overrides.get("train", {}), {
        "batch_tokens": args.batch_tokens, "micro_batch_seqs": args.micro_batch_seqs, "optimizer": {"ema_decay": 0.0},
        "schedule": {"mode": "steps", "iterations": min(args.steps, epoch_steps), "max_wallclock_seconds": 0.0,
                     "calib_reserve_seconds": 0.0},
        "runtime": {"val_every": 0, "val_tokens": 0, "log_every": 10, "compile": False, "snapshot_every": 0}}))
    device = dist.select_device(cfg.runtime.device if torch.cuda.is_available() else "cpu")
    if args.reuse:
        run = json.loads((work / TRAIN_RUN).read_text()) if (work / TRAIN_RUN).is_file() else None
        if run is None:
            print(f"quantize bench: --reuse: no {work / TRAIN_RUN}: the run's figures (calib_seconds) are missing",
                  flush=True)
    else:
        run = train_once(cfg, shards, sp, device, profile_train.micro_batch_seqs, work)
    print(f"quantize bench: trained {run}", flush=True)

    state, mcfg = checkpoint.read_model_file(work / "model.safetensors")
    hessians = calibration.load_hessians(work / "hessians.safetensors")
    val = data.load_split(shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, shards, val)
    if args.val_tokens:
        val, val_bytes = val[: args.val_tokens], val_bytes[: args.val_tokens]
    windows = {"": (verify_cfg.seq_len, verify_cfg.seq_len)}
    if not args.no_sliding:
        windows["_sliding"] = (eval_cfg.seq_len, eval_cfg.stride)
    # the profile's shipped train_gpt.py, as the script stage builds it
    script_cfg = config.build_section("script", overrides.get("script", {}))
    code_bytes = submission_export.build_script({"tokenize": tok_cfg, "train": profile_train, "quantize": quant_cfg,
                                                 "evaluate": eval_cfg, "script": script_cfg}).bytes
    reserve = config.build_section("train", config.read_profile(args.reserve_profile).get("train", {})) \
        .schedule.calib_reserve_seconds
    record = {**header(device.type), "val_tokens": int(len(val)), **(run or {})}
    record.update({
        "corpus": args.corpus + " (dev corpus, not FineWeb)",
        "code_bytes": code_bytes,
        "calib_reserve_seconds_target": reserve, "calib_reserve_profile": args.reserve_profile,
        "calib_within_reserve": (run["calib_seconds"] <= reserve) if run else None,
        "params": {"profile": args.profile, "quantize": dataclasses.asdict(quant_cfg), "train_steps": cfg.schedule.iterations,
                   "batch_tokens": cfg.batch_tokens, "calib_batches": cfg.calib_batches,
                   "calib_seqs": profile_train.micro_batch_seqs, "seq_len": cfg.seq_len, "ema_decay": 0.0},
    })

    def write(complete: bool) -> None:
        """The record so far (GPU runs, or any run given --out); the derived figures once
        both of their terms are measured."""
        if "model_bytes_gptq" in record:
            record["artifact_bytes_gptq"] = record["model_bytes_gptq"] + code_bytes
            record["fits_target_gptq"] = record["artifact_bytes_gptq"] <= TARGET_ARTIFACT_BYTES
        if "damage_gptq" in record and "damage_rtn" in record:
            record["gptq_damage_over_rtn"] = record["damage_gptq"] / record["damage_rtn"] if record["damage_rtn"] else None
        record.pop("complete", None)  # last in the file, where a reader looks for it
        record["complete"] = complete
        if complete:
            print(json.dumps(record))
        if device.type == "cuda" or args.out != parser.get_default("out"):
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    float_model = checkpoint.build_model(state, mcfg)
    for suffix, (window, stride) in windows.items():
        record[f"val_bpb_float{suffix}"] = score(float_model, val, val_bytes, device, window, stride,
                                                 verify_cfg.batch_seqs)
    write(complete=False)  # the training run's figures and the float score, before any packing

    def measure(key: str, qm, seconds: float, compressors, fit_bytes: int = 0) -> None:
        """Pack `qm` with the stage's packer in the row layout only, whatever layouts the
        profile lists (those are packed one at a time below), to `fit_bytes` with the code
        when given; reload it from the bytes and score it as verify does."""
        record[f"{key}_seconds"] = seconds
        start = time.perf_counter()
        try:
            _, blob, report, fit = pack_to_fit(qm, dataclasses.asdict(mcfg), compressors, ["row"], fit_bytes, code_bytes,
                                               quant_cfg.chunk_bytes)
        except ValueError as err:  # a target out of reach: say so and keep every other figure of the run
            record[f"fit_error_{key}"] = str(err)
            print(f"quantize bench: {key}: {err}", flush=True)
            return
        record[f"pack_seconds_{key}"] = time.perf_counter() - start
        if fit_bytes:
            record[f"fit_{key}"] = fit
        record[f"model_bytes_{key}"] = report["model_bytes"]
        record[f"bytes_per_group_{key}"] = report["bytes_per_group"]
        path = work / f"model_{key}.bin"
        path.write_bytes(blob)
        model = load_model(path)
        for suffix, (window, stride) in windows.items():
            bpb = score(model, val, val_bytes, device, window, stride, verify_cfg.batch_seqs)
            record[f"val_bpb_{key}{suffix}"] = bpb
            record[f"damage_{key}{suffix}"] = bpb - record[f"val_bpb_float{suffix}"]
            print(f"quantize bench: {key}{suffix} val_bpb {bpb:.5f} (float {record[f'val_bpb_float{suffix}']:.5f}), "
                  f"{record[f'model_bytes_{key}']:,} bytes, {seconds:.1f} s", flush=True)
        write(complete=False)

    # RTN and GPTQ alone, whatever Quantization II options the profile switches on: the
    # variants below add them one at a time
    alone = dataclasses.replace(quant_cfg, lqer_rank=0, gate_int8=False, prune_fraction=0.0, fit_bytes=0)
    # GPTQ-lite takes its own per-row percentile clips instead of the profile's grid
    lite = dataclasses.replace(alone, method="gptq_lite", clip="percentile", sdclip_search=[], sdclip_search_bytes=0)
    quantizers = {"rtn": lambda: quantize_rtn(state, alone), "gptq_lite": lambda: quantize_rtn(state, lite),
                  "gptq": lambda: quantize_gptq(state, hessians, alone, device)}
    for method in ("rtn", *(() if args.no_lite else ("gptq_lite",)), "gptq"):
        start = time.perf_counter()
        qm = quantizers[method]()
        gptq_qm = qm  # the loop ends on gptq: the layouts below pack these integers
        measure(method, qm, time.perf_counter() - start, quant_cfg.compressors)
    lqer = {"lqer_rank": args.lqer_rank, "lqer_top_k": args.lqer_top_k}
    both = {**lqer, "gate_int8": True}
    options = {"lqer": [("gptq_lqer", lqer, 0)], "gate": [("gptq_gate", {"gate_int8": True}, 0)],
               "lqer_gate": [("gptq_lqer_gate", both, 0)],
               "fit": [("gptq_fit", {}, args.fit_bytes), ("gptq_lqer_gate_fit", both, args.fit_bytes)],
               "search_bytes": [("gptq_search_bytes", {"clip": "sdclip", "sdclip_search": args.search_k,
                                                       "sdclip_search_bytes": args.fit_bytes}, 0)]}
    variants = [variant for name in args.variants for variant in options[name]]
    for key, change, fit_bytes in variants:
        if change:
            vcfg = dataclasses.replace(alone, method="gptq", **change)
            start = time.perf_counter()
            try:
                qm, steps = quantize_model(state, vcfg, hessians, device, model_config=dataclasses.asdict(mcfg),
                                           code_bytes=code_bytes)
            except ValueError as err:  # a byte target out of reach: say so and keep every other figure
                record[f"fit_error_{key}"] = str(err)
                print(f"quantize bench: {key}: {err}", flush=True)
                continue
            seconds = time.perf_counter() - start
            if steps["lqer"]:
                record[f"lqer_{key}"] = steps["lqer"]
            if "sdclip_search" in steps:
                record[f"sdclip_k_{key}"] = steps["sdclip_k"]
        else:  # GPTQ alone, packed differently: its integers from above
            qm, seconds = gptq_qm, record["gptq_seconds"]
        measure(key, qm, seconds, quant_cfg.compressors, fit_bytes)
    if "lqer" in args.variants:
        record["lqer_bytes"] = record["model_bytes_gptq_lqer"] - record["model_bytes_gptq"]
        record["lqer_damage_removed"] = record["damage_gptq"] - record["damage_gptq_lqer"]
    if "fit" in args.variants:
        record["fit_bytes_target"] = args.fit_bytes
        if "damage_gptq_fit" in record and "damage_gptq_lqer_gate_fit" in record:
            record["fit_lqer_gate_damage_gain"] = record["damage_gptq_fit"] - record["damage_gptq_lqer_gate_fit"]
    layouts = [x for x in args.layouts.split(",") if x]
    if layouts:
        qm = gptq_qm
        for layout in layouts:
            config.check_layout_name("--layouts", layout)
            start = time.perf_counter()
            blob, report = pack_artifact(qm, dataclasses.asdict(mcfg), quant_cfg.compressors, [layout],
                                         chunk_bytes=quant_cfg.chunk_bytes)
            key = "gptq_" + layout.replace("+", "_")
            record[f"pack_seconds_{key}"] = time.perf_counter() - start
            if compare_exact(unpack_artifact(blob)[0], qm):
                raise RuntimeError(f"layout {layout!r} did not round-trip the GPTQ integers")
            record[f"model_bytes_{key}"] = report["model_bytes"]
            record[f"bytes_per_group_{key}"] = report["bytes_per_group"]  # which layout wins which group
            record[f"codec_per_group_{key}"] = report["compressor_per_group"]
            for suffix in windows:
                record[f"val_bpb_{key}{suffix}"] = record[f"val_bpb_gptq{suffix}"]  # lossless: same weights
            write(complete=False)
        record["best_layout"] = min(layouts, key=lambda x: record["model_bytes_gptq_" + x.replace("+", "_")])
    write(complete=True)


if __name__ == "__main__":
    main()
