"""Stage `train`: shards + tokenizer -> model weights (EMA), GPTQ's Hessians (collected
right after training in the same launch, `train.calib_batches` batches per process) and
DVCLive metrics, with `challenge_run`: whether the run could count for the challenge
(`pgolf_core.challenge`; the reasons it could not go to the provenance's labels).

Runs as one process or under `torchrun --nproc_per_node=N -m stages.train ...`: every
process trains, rank 0 alone writes (the model, the Hessians, the DVCLive folder, which
takes the per-step curves as it trains and the summary at the end, and the provenance).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from dvclive import Live

from pgolf_core import calibration, challenge, checkpoint, data, dist, io, resume
from pgolf_core.config import BOS_ID, TrainConfig
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT
from pgolf_core.stage.result import StageResult
from pgolf_core.stage.validation import load_validation
from pgolf_core.train import report_line, run_warnings, set_seed, train


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    shards: Path
    tokenizer: Path
    out: Path = dataclasses.field(metadata={"help": "model file (.safetensors)"})
    hessians: Path = dataclasses.field(metadata={
        "help": "GPTQ Hessians (.safetensors); written empty of tensors when train.calib_batches is 0"})
    metrics: Path = dataclasses.field(metadata={"help": "DVCLive folder"})
    # --train-log, not --log: torchrun's own parser takes a prefix of its --log-dir even after the module name
    train_log: Path = dataclasses.field(metadata={
        "help": "the run's log as the records ship theirs: the set-up, a line per report (step, loss, "
                "val_bpb) and the summary; it goes into the submission folder"})
    snapshots: Path | None = dataclasses.field(default=None, metadata={
        "help": "folder for resumable snapshots (train.runtime.snapshot_every); not a DVC output"})


class RunLogFile:
    """The run's text log on rank 0 (`TrainPaths.train_log`), written as the run goes, so a
    long run's progress can be read from it; a resumed run's log starts at the resume."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")

    def line(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run(cfg: TrainConfig, paths: TrainPaths) -> StageResult:
    """Train, calibrate, and on rank 0 write the model, the Hessians and the DVCLive
    folder with its provenance (the CLI has nothing left to write)."""
    device = dist.select_device(cfg.runtime.device)
    dist.init(device.type)
    set_seed(cfg.seed)
    sp, val_tokens, val_bytes = load_validation(paths.tokenizer, paths.shards)
    train_files = data.list_shards(paths.shards, "train")
    stream = data.TokenStream(train_files, sp.vocab_size())
    kernels = resolve_kernels(device, cfg.runtime)
    model = GPT(cfg.model.with_vocab(sp.vocab_size()), kernels).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    live = Live(str(paths.metrics), dvcyaml=False, save_dvc_exp=False, report=None) if dist.is_main() else None
    run_log = RunLogFile(paths.train_log) if live else None
    if live:
        compiled = cfg.runtime.compile
        mix_order = "" if cfg.runtime.compile_mix_order_reduction else ", no mix-order reductions"
        loss = "Triton" if kernels.loss_active(device, cfg.model.logit_softcap) else "compiled" if compiled else "eager"
        print(f"train: {num_params:,} parameters on {device} x {dist.world_size()}, "
              f"{stream.num_tokens:,} train tokens, {cfg.schedule.iterations} steps of {cfg.batch_tokens:,} tokens; "
              f"attention {kernels.attention_path(device, cfg.model.doc_mask, compiled)}, "
              f"MLP {'fused' if kernels.mlp_active(device) else 'plain'}, loss {loss}, "
              f"{f'compiled ({cfg.runtime.compile_mode}{mix_order})' if compiled else 'eager'}")
        run_log.line(f"train: {num_params:,} parameters on {device} x {dist.world_size()}, seed {cfg.seed}, "
                     f"{stream.num_tokens:,} train tokens, {cfg.schedule.iterations} steps of {cfg.batch_tokens:,} "
                     f"tokens, schedule {cfg.schedule.mode}, cap {cfg.schedule.max_wallclock_seconds:g} s")

    def log(step: int, values: dict) -> None:
        if live:
            run_log.line(report_line(step, cfg.schedule.iterations, values))
            live.step = step
            for name, value in values.items():
                live.log_metric(name, value)
            live.make_summary()

    def input_hashes() -> dict:  # 16 GB of shards at full scale: hashed once, and only where needed
        return {"shards": io.sha256_tree(paths.shards), "tokenizer": io.sha256_tree(paths.tokenizer)}

    start, inputs, snapshots = time.perf_counter(), None, None
    if paths.snapshots and cfg.runtime.snapshot_every:  # every rank needs the run's fingerprint
        inputs = input_hashes()
        snapshots = resume.Snapshots(paths.snapshots, resume.fingerprint(cfg, inputs, dist.world_size()))
    collected = []

    def calibrate(trained: GPT) -> None:
        collected.append(calibration.collect_hessians(trained, stream, cfg.calib_batches, cfg.micro_batch_seqs,
                                                      cfg.seq_len, device, dist.autocast_dtype(device)))

    result = train(cfg, model, stream, val_tokens, val_bytes, device, log, snapshots,
                   calibrate=calibrate if cfg.calib_batches else None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    not_challenge = challenge.not_a_challenge_run(
        cfg, world_size=dist.world_size(), resumed_from_step=result.resumed_from_step, device_name=device_name,
        calibrated_in_launch=cfg.calib_batches > 0 and bool(collected),
        val_documents=int((val_tokens == BOS_ID).sum()), data_source=data.read_source(paths.shards))
    projected, projection_model = challenge.projected_train_plus_calib_seconds(
        tokens=result.steps * cfg.batch_tokens, tokens_per_second_per_gpu=result.tokens_per_second_per_gpu,
        calib_seconds=result.calib_seconds, device_name=device_name)
    # challenge_run is a figure of metrics.json; its reasons (a list) and the projection's
    # model (a string) go to the provenance's labels
    metrics = {**dataclasses.asdict(result), "num_params": num_params, "challenge_run": not not_challenge,
               "not_a_challenge_run": not_challenge, "projection_model_8xh100": projection_model,
               **({"projected_8xh100_train_plus_calib_seconds": projected} if projected is not None else {})}
    summary = []
    if live:
        checkpoint.save_model(paths.out, model)
        calib = collected[0] if collected else calibration.Calibration({}, {}, {}, {}, 0, 0.0)
        calibration.save_hessians(paths.hessians, calib, {"device": str(device), "world_size": str(dist.world_size())})
        if collected:
            print(f"train: Hessians of {len(calib.hessians)} weights from {calib.tokens:,} train tokens per process "
                  f"in {result.calib_seconds:.2f} s -> {paths.hessians}")
        if snapshots:
            snapshots.remove()  # the run is complete: nothing left to resume
        figures, labels = io.split_figures(metrics)
        inputs = inputs or input_hashes()
        io.write_provenance(paths.metrics, inputs, labels=labels)
        live.summary = figures  # metrics.json = the final summary, not the last step's values
        live.make_summary()
        live.end()
        summary.append(f"train: {result.steps} steps in {result.train_seconds:.1f} s "
                       f"({result.tokens_per_second:,.0f} tok/s, {result.tokens_per_second_per_gpu:,.0f} per process), "
                       f"+ calibration {result.calib_seconds:.2f} s, val_bpb_prequant {result.val_bpb_prequant:.4f}, "
                       f"stage {time.perf_counter() - start:.1f} s")
        summary.append("train: a challenge run" if not not_challenge else
                       f"train: not a challenge run ({'; '.join(not_challenge)}): its seconds are measurements on "
                       "this machine")
        projection = projection_model if projected is None else \
            f"{projected:.1f} s of training + calibration ({projection_model})"
        summary.append(f"train: projected on 8xH100: {projection}")
        for warning in run_warnings(cfg, result):
            summary.append(f"train: WARNING: {warning}")
        for line in summary:
            run_log.line(line)
        run_log.close()
    dist.shutdown()
    return StageResult(metrics, inputs or {}, summary=summary, write_report=False)
