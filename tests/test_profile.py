from pathlib import Path

import pytest
import yaml

from pgolf_core import config
from pgolf_core.model import GPT, layer_sequence
from params_helpers import leaf_keys

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_writes_a_complete_valid_params_file(profile, tmp_path):
    configs = config.apply_profile(profile, tmp_path / "params.yaml")
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for section in config.SECTIONS:
        assert sorted(leaf_keys(written[section], section)) == sorted(config.section_keys(section))
        assert config.load_section(tmp_path / "params.yaml", section) == configs[section]


def test_the_committed_params_are_the_cpu_profile(tmp_path):
    config.apply_profile(ROOT / "profiles" / "cpu.yaml", tmp_path / "params.yaml")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_record_profile_builds_the_records_model():
    configs = config.apply_profile(ROOT / "profiles" / "record_1xh100.yaml", "/dev/null")
    train = configs["train"]
    assert (train.schedule.mode, train.schedule.iterations, train.batch_tokens) == ("steps", 4950, 786432)  # base + override
    model = GPT(train.model.with_vocab(configs["tokenize"].vocab_size))
    assert sum(p.numel() for p in model.parameters()) == 35_945_671  # TECHNIQUES.md §2.1, the 04-27 stack


def test_pr1477_profile_builds_the_reference_systems_model():
    """The reference of issue #4's throughput targets (TECHNIQUES.md §2.1, §2.5, §2.6)."""
    configs = config.apply_profile(ROOT / "profiles" / "pr1477_8xh100.yaml", "/dev/null")
    train = configs["train"]
    model = GPT(train.model.with_vocab(configs["tokenize"].vocab_size))
    assert sum(p.numel() for p in model.parameters()) == 35_943_512 + 1  # the 04-05 stack + lane_merge
    assert layer_sequence(model.cfg, True) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert (train.schedule.loop_start_frac, train.schedule.mode, train.model.parallel_mode, train.model.parallel_start) == \
        (0.5, "wallclock", "merge", 7)
    # what the 04-27 base has and 04-08 had not: LQER, each rank clipping its own gradient
    assert configs["quantize"].lqer_rank == 0 and not train.optimizer.clip_before_all_reduce
    record = config.apply_profile(ROOT / "profiles" / "record_8xh100.yaml", "/dev/null")
    assert record["quantize"].lqer_rank == 4 and record["train"].optimizer.clip_before_all_reduce


def test_profile_typos_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {model: {num_layer: 3}}\n")
    with pytest.raises(ValueError, match="train.model.num_layer.*'num_layers'"):
        config.apply_profile(bad, tmp_path / "params.yaml")
    bad.write_text("train: {num_layers: 3}\n")  # a profile written before the train section nested
    with pytest.raises(ValueError, match="train.num_layers moved to train.model.num_layers"):
        config.apply_profile(bad, tmp_path / "params.yaml")
    bad.write_text("trainn: {}\n")
    with pytest.raises(ValueError, match="unknown section 'trainn'"):
        config.apply_profile(bad, tmp_path / "params.yaml")
