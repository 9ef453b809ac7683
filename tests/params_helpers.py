"""The tests' tables of train settings are flat (`num_layers=1, matrix_lr=0.05`); the
`train` section nests them (`model.num_layers`, `optimizer.matrix_lr`). `nested` puts each
key where the section's subsection dataclasses say it lives."""

import dataclasses

from pgolf_core import config

SUBSECTIONS = {"model": config.ModelConfig, "optimizer": config.OptimizerConfig,
               "schedule": config.ScheduleConfig, "runtime": config.RuntimeConfig}
HOMES = {f.name: sub for sub, cls in SUBSECTIONS.items() for f in dataclasses.fields(cls)}


def nested(flat: dict) -> dict:
    """{"num_layers": 1, "seq_len": 32} -> {"model": {"num_layers": 1}, "seq_len": 32}."""
    out: dict = {}
    for key, value in flat.items():
        if key in HOMES:
            out.setdefault(HOMES[key], {})[key] = value
        else:
            out[key] = value
    return out


def train_config(flat: dict) -> config.TrainConfig:
    return config.build_section("train", nested(flat))


def leaf_keys(mapping: dict, prefix: str) -> list[str]:
    """The dotted leaf keys of a params mapping (`train.optimizer.matrix_lr`), as
    `config.section_keys` lists them."""
    keys = []
    for key, value in mapping.items():
        keys += leaf_keys(value, f"{prefix}.{key}") if isinstance(value, dict) else [f"{prefix}.{key}"]
    return keys
