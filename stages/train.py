"""Stage `train`: shards + tokenizer -> model weights (EMA), GPTQ's Hessians (collected
right after training in the same launch, `train.calib_batches` batches per process) and
DVCLive metrics.

Runs as one process or under `torchrun --nproc_per_node=N -m stages.train ...`.
"""

import argparse
import dataclasses
import time
from pathlib import Path

from dvclive import Live

from pgolf_core import calibration, checkpoint, config, data, dist, io, resume, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT
from pgolf_core.train import run_warnings, set_seed, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="model file (.safetensors)")
    parser.add_argument("--hessians", type=Path, required=True,
                        help="GPTQ Hessians (.safetensors); written empty of tensors when train.calib_batches is 0")
    parser.add_argument("--metrics", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="folder for resumable snapshots (train.runtime.snapshot_every); not a DVC output")
    args = parser.parse_args()
    cfg = config.load_section(args.params, "train")
    device = dist.select_device(cfg.runtime.device)
    dist.init(device.type)
    set_seed(cfg.seed)
    sp = tokenizer.load_tokenizer(args.tokenizer)
    train_files = data.list_shards(args.shards, "train")
    stream = data.TokenStream(train_files, sp.vocab_size())
    val_tokens = data.load_split(args.shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, args.shards, val_tokens)
    kernels = resolve_kernels(device, cfg.runtime)
    model = GPT(cfg.model.with_vocab(sp.vocab_size()), kernels).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    live = Live(str(args.metrics), dvcyaml=False, save_dvc_exp=False, report=None) if dist.is_main() else None
    if live:
        mix_order = "" if cfg.runtime.compile_mix_order_reduction else ", no mix-order reductions"
        compiled = cfg.runtime.compile
        print(f"train: {num_params:,} parameters on {device} x {dist.world_size()}, "
              f"{stream.num_tokens:,} train tokens, {cfg.schedule.iterations} steps of {cfg.batch_tokens:,} tokens; "
              f"attention {kernels.attention_path(device, cfg.model.doc_mask, cfg.runtime.compile)}, "
              f"MLP {'fused' if kernels.mlp_active(device) else 'plain'}, "
              f"loss {'Triton' if kernels.loss_active(device, cfg.model.logit_softcap) else 'compiled' if compiled else 'eager'}, "
              f"{f'compiled ({cfg.runtime.compile_mode}{mix_order})' if cfg.runtime.compile else 'eager'}")

    def log(step: int, values: dict) -> None:
        if live:
            live.step = step
            for name, value in values.items():
                live.log_metric(name, value)
            live.make_summary()

    def input_hashes() -> dict:  # 16 GB of shards at full scale: hashed once, and only where needed
        return {"shards": io.sha256_tree(args.shards), "tokenizer": io.sha256_tree(args.tokenizer)}

    start, inputs, snapshots = time.perf_counter(), None, None
    if args.snapshots and cfg.runtime.snapshot_every:  # every rank needs the run's fingerprint
        inputs = input_hashes()
        snapshots = resume.Snapshots(args.snapshots, resume.fingerprint(cfg, inputs, dist.world_size()))
    collected = []

    def calibrate(trained: GPT) -> None:
        collected.append(calibration.collect_hessians(trained, stream, cfg.calib_batches, cfg.micro_batch_seqs,
                                                      cfg.seq_len, device, dist.autocast_dtype(device)))

    result = train(cfg, model, stream, val_tokens, val_bytes, device, log, snapshots,
                   calibrate=calibrate if cfg.calib_batches else None)
    if live:
        checkpoint.save_model(args.out, model)
        calib = collected[0] if collected else calibration.Calibration({}, {}, {}, {}, 0, 0.0)
        calibration.save_hessians(args.hessians, calib, {"device": str(device), "world_size": str(dist.world_size())})
        if collected:
            print(f"train: Hessians of {len(calib.hessians)} weights from {calib.tokens:,} train tokens per process "
                  f"in {result.calib_seconds:.2f} s -> {args.hessians}")
        if snapshots:
            snapshots.remove()  # the run is complete: nothing left to resume
        summary, labels = io.split_figures({**dataclasses.asdict(result), "num_params": num_params})
        io.write_provenance(args.metrics, inputs or input_hashes(), labels=labels)
        live.summary = summary  # metrics.json = the final summary, not the last step's values
        live.make_summary()
        live.end()
        print(f"train: {result.steps} steps in {result.train_seconds:.1f} s "
              f"({result.tokens_per_second:,.0f} tok/s, {result.tokens_per_second_per_gpu:,.0f} per process), "
              f"+ calibration {result.calib_seconds:.2f} s, val_bpb_prequant {result.val_bpb_prequant:.4f}, "
              f"stage {time.perf_counter() - start:.1f} s")
        for warning in run_warnings(cfg, result):
            print(f"train: WARNING: {warning}")
    dist.shutdown()


if __name__ == "__main__":
    main()
