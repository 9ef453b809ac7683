"""`challenge_run`: a run counts for the challenge only with every condition of the
challenge's launch; each condition that breaks it gives exactly one reason, naming it."""

import pytest

from pgolf_core import challenge
from params_helpers import train_config

H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name of the challenge's H100 SXM
FINEWEB = {"source": "published", "repo": "kevclark/parameter-golf", "challenge_data": True}
CHALLENGE = dict(world_size=8, device_name=H100, resumed_from_step=0, calibrated_in_launch=True,
                 val_documents=50_000, data_source=FINEWEB)


def schedule(**overrides):
    return train_config({"mode": "wallclock", "max_wallclock_seconds": 600.0, "calib_reserve_seconds": 8.0,
                         **overrides})


def test_the_challenges_launch_is_a_challenge_run():
    assert challenge.not_a_challenge_run(schedule(), **CHALLENGE) == []
    assert challenge.not_a_challenge_run(schedule(max_wallclock_seconds=590.0), **CHALLENGE) == []  # under the cap
    assert challenge.not_a_challenge_run(schedule(), **{**CHALLENGE, "device_name": "NVIDIA H100 PCIe"}) == []


@pytest.mark.parametrize("cfg, run, reason", [
    ({}, {"world_size": 1}, "1 process(es), not 8"),
    ({}, {"world_size": 16}, "16 process(es), not 8"),
    ({}, {"device_name": "cpu"}, "device 'cpu', not an H100"),
    ({}, {"device_name": "NVIDIA H200"}, "device 'NVIDIA H200', not an H100"),  # faster: its 600 s train more
    ({}, {"device_name": "NVIDIA A100-SXM4-80GB"}, "device 'NVIDIA A100-SXM4-80GB', not an H100"),
    ({"mode": "steps"}, {}, "train.schedule.mode 'steps', not a wall-clock schedule"),
    ({"max_wallclock_seconds": 900.0}, {}, "train.schedule.max_wallclock_seconds 900 (over the budget)"),
    ({}, {"resumed_from_step": 500}, "resumed from a snapshot at step 500"),
    ({"calib_batches": 0}, {"calibrated_in_launch": False}, "no GPTQ calibration in the training launch "
                                                            "(train.calib_batches is 0)"),
    ({}, {"calibrated_in_launch": False}, "no GPTQ calibration in the training launch"),
    ({}, {"val_documents": 250}, "a validation split of 250 documents, not the challenge's 50,000"),
    # 50,000 documents of another corpus are not the challenge's split
    ({}, {"data_source": {"source": "jsonl", "repo": "", "challenge_data": False}},
     "documents from 'jsonl', not the challenge's FineWeb"),
    ({}, {"data_source": {"source": "published", "repo": "someone/fork", "challenge_data": False}},
     "documents from 'published' (someone/fork), not the challenge's FineWeb"),
    ({}, {"data_source": None}, "shards without a record of their source (source.json): rerun tokenize"),
])
def test_each_broken_condition_is_one_reason_that_names_it(cfg, run, reason):
    (only,) = challenge.not_a_challenge_run(schedule(**cfg), **{**CHALLENGE, **run})
    assert only.startswith(reason)


def test_a_cpu_default_run_gives_every_reason_it_is_not_one():
    reasons = challenge.not_a_challenge_run(train_config({}), world_size=1, device_name="cpu", resumed_from_step=3,
                                            calibrated_in_launch=True, val_documents=250,
                                            data_source={"source": "embedded", "repo": "", "challenge_data": False})
    assert len(reasons) == 7  # processes, device, mode, cap, resume, split, corpus
    assert reasons[3] == "train.schedule.max_wallclock_seconds 0 (no cap), not a cap of at most 600 s"


def test_an_h100_runs_time_projects_to_8_processes_at_its_own_rate():
    """1,000 steps of 786,432 tokens at 100,000 tokens/s per process: 8 processes would take
    786,432,000 / 800,000 = 983.04 s, + 12.5 s of calibration."""
    seconds, model = challenge.projected_train_plus_calib_seconds(
        tokens=1_000 * 786_432, tokens_per_second_per_gpu=100_000.0, calib_seconds=12.5, device_name=H100)
    assert seconds == pytest.approx(983.04 + 12.5, rel=1e-12)
    assert "786,432,000 tokens at this run's 100,000 tokens/s per process x 8 processes" in model
    assert "no communication cost (a lower bound)" in model and "calibration 12.5 s as measured" in model


@pytest.mark.parametrize("device", ["cpu", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"])
def test_no_other_devices_rate_is_carried_to_the_h100(device):
    seconds, model = challenge.projected_train_plus_calib_seconds(
        tokens=1000, tokens_per_second_per_gpu=10.0, calib_seconds=1.0, device_name=device)
    assert seconds is None and model.startswith(f"none: device {device!r} is not an H100")


def test_a_run_without_a_timed_step_has_no_projection():
    seconds, model = challenge.projected_train_plus_calib_seconds(
        tokens=0, tokens_per_second_per_gpu=0.0, calib_seconds=1.0, device_name=H100)
    assert seconds is None and model == "none: the run measured no training rate (no step was timed)"
