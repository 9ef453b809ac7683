"""Whether a training run could count for the challenge, said plainly (DESIGN.md, the
train metrics' `challenge_run`).

A record run is `torchrun --standalone --nproc_per_node=8 train_gpt.py` on 8 H100s:
a wall-clock schedule capped at 600 s, one launch from scratch (no resume from a
snapshot), GPTQ's calibration inside that launch, scored on the fixed validation split
(the first 50,000 FineWeb documents). A run that differs in any of these is still
useful, but its seconds are not the challenge's: they are reported as they were
measured and read as a projection. The rules live here as data, one place, so the train
stage and `verify` agree on them, with the projection's model beside them.
"""

from __future__ import annotations

from pgolf_core.config import TrainConfig

WORLD_SIZE = 8  # processes, one per GPU
SECONDS = 600.0  # training (+ calibration) and, separately, evaluation
VAL_DOCUMENTS = 50_000  # the fixed validation split: the first 50,000 documents of the export
# The challenge's part is the H100 (SXM). Every H100 counts (a PCIe or NVL part is no faster
# at training); a faster part does not: 600 s on an H200 or GH200 trains more than the
# challenge's 600 s do, so its seconds say nothing about the 8xH100 launch.
DEVICE_CLASS = ("H100",)


def is_h100_class(device_name: str) -> bool:
    """Whether a CUDA device name (`torch.cuda.get_device_name`) is an H100."""
    return any(name in device_name for name in DEVICE_CLASS)


def not_a_challenge_run(cfg: TrainConfig, *, world_size: int, device_name: str, resumed_from_step: int,
                        calibrated_in_launch: bool, val_documents: int, data_source: dict | None) -> list[str]:
    """Every reason this run is not a challenge run (empty: it is one), one per broken
    condition. `device_name` is the CUDA device's name, or the device type when not CUDA;
    `val_documents` is the number of documents in the validation split the run was scored
    on; `data_source` the shards' source record (`data.read_source`; None when the shards
    predate it). A cap below 600 s is a challenge run (it uses less than the budget)."""
    reasons = []
    if world_size != WORLD_SIZE:
        reasons.append(f"{world_size} process(es), not {WORLD_SIZE}")
    if not is_h100_class(device_name):
        reasons.append(f"device {device_name!r}, not an H100")
    if cfg.schedule.mode != "wallclock":
        reasons.append(f"train.schedule.mode {cfg.schedule.mode!r}, not a wall-clock schedule")
    cap = cfg.schedule.max_wallclock_seconds
    if not 0 < cap <= SECONDS:
        reasons.append(f"train.schedule.max_wallclock_seconds {cap:g} ({'no cap' if cap <= 0 else 'over the budget'}), "
                       f"not a cap of at most {SECONDS:g} s")
    if resumed_from_step:
        reasons.append(f"resumed from a snapshot at step {resumed_from_step}")
    if not calibrated_in_launch:
        reasons.append("no GPTQ calibration in the training launch"
                       + (" (train.calib_batches is 0)" if cfg.calib_batches == 0 else ""))
    if val_documents != VAL_DOCUMENTS:
        reasons.append(f"a validation split of {val_documents:,} documents, not the challenge's {VAL_DOCUMENTS:,}")
    if data_source is None:
        reasons.append("shards without a record of their source (source.json): rerun tokenize")
    elif not data_source.get("challenge_data"):
        where = f" ({data_source['repo']})" if data_source.get("repo") else ""
        reasons.append(f"documents from {data_source.get('source')!r}{where}, not the challenge's FineWeb")
    return reasons


def projected_train_plus_calib_seconds(*, tokens: int, tokens_per_second_per_gpu: float, calib_seconds: float,
                                       device_name: str) -> tuple[float | None, str]:
    """(seconds, model): what this run's training and calibration would take on the
    challenge's 8 H100s, and how that figure was made. The model: the run's `tokens` at
    its measured per-process rate times 8 processes, with no cost of communication (so a
    lower bound for a run of fewer processes), plus its calibration as measured (each
    rank calibrates on its own batches, so 8 ranks take as long as one). Only an H100's
    rate carries over; on any other device the figure is None and the model says why."""
    if not is_h100_class(device_name):
        return None, (f"none: device {device_name!r} is not an H100, so its rate says nothing of the challenge's "
                      "8xH100 seconds")
    if tokens_per_second_per_gpu <= 0:
        return None, "none: the run measured no training rate (no step was timed)"
    seconds = tokens / (WORLD_SIZE * tokens_per_second_per_gpu) + calib_seconds
    return seconds, (f"{tokens:,} tokens at this run's {tokens_per_second_per_gpu:,.0f} tokens/s per process x "
                     f"{WORLD_SIZE} processes, no communication cost (a lower bound), + calibration "
                     f"{calib_seconds:.1f} s as measured")
