"""Whether a training run could count for the challenge, said plainly (DESIGN.md, the
train metrics' `challenge_run`).

A record run is `torchrun --standalone --nproc_per_node=8 train_gpt.py` on 8 H100s:
a wall-clock schedule capped at 600 s, one launch from scratch (no resume from a
snapshot), GPTQ's calibration inside that launch, scored on the fixed validation split
(the first 50,000 FineWeb documents). A run that differs in any of these is still
useful, but its seconds are not the challenge's: they are reported as they were
measured and read as a projection. The rules live here as data, one place, so the train
stage, `verify` and the exporter agree on them.
"""

from __future__ import annotations

from pgolf_core.config import TrainConfig

WORLD_SIZE = 8  # processes, one per GPU
SECONDS = 600.0  # training (+ calibration) and, separately, evaluation
VAL_DOCUMENTS = 50_000  # the fixed validation split: the first 50,000 documents of the export
DEVICE_CLASS = ("H100", "H200", "GH200")  # H100-class: sm_90 parts at least as capable as the challenge's


def is_h100_class(device_name: str) -> bool:
    """Whether a CUDA device name (`torch.cuda.get_device_name`) is an H100-class part."""
    return any(name in device_name for name in DEVICE_CLASS)


def not_a_challenge_run(cfg: TrainConfig, *, world_size: int, device_name: str, resumed_from_step: int,
                        calibrated_in_launch: bool, val_documents: int) -> list[str]:
    """Every reason this run is not a challenge run (empty: it is one). `device_name` is
    the CUDA device's name, or the device type when not CUDA; `val_documents` is the
    number of documents in the validation split the run was scored on."""
    reasons = []
    if world_size != WORLD_SIZE:
        reasons.append(f"{world_size} process(es), not {WORLD_SIZE}")
    if not is_h100_class(device_name):
        reasons.append(f"device {device_name!r} is not H100-class")
    if cfg.schedule.mode != "wallclock" or cfg.schedule.max_wallclock_seconds != SECONDS:
        reasons.append(f"schedule {cfg.schedule.mode!r} with a {cfg.schedule.max_wallclock_seconds:g} s cap, "
                       f"not a wall-clock schedule capped at {SECONDS:g} s")
    if resumed_from_step:
        reasons.append(f"resumed from a snapshot at step {resumed_from_step}")
    if not calibrated_in_launch:
        reasons.append("no calibration in the training launch (train.calib_batches is 0)")
    if val_documents != VAL_DOCUMENTS:
        reasons.append(f"a validation split of {val_documents:,} documents, not the challenge's {VAL_DOCUMENTS:,}")
    return reasons
