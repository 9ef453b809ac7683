import pytest
import yaml

from pgolf_core import config


def write(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    path = write(tmp_path, {"train": {"matrx_lr": 0.1}})
    with pytest.raises(ValueError, match=r"unknown params key train\.matrx_lr \(did you mean 'matrix_lr'\?\)"):
        config.load_section(path, "train")


def test_unknown_section_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'trian'.*'train'"):
        config.load_section(write(tmp_path, {"trian": {}}), "train")
    with pytest.raises(ValueError, match="train.iterations: expected an integer, found 'ten'"):
        config.load_section(write(tmp_path, {"train": {"iterations": "ten"}}), "train")
    with pytest.raises(ValueError, match="expected true/false"):
        config.load_section(write(tmp_path, {"train": {"compile": "yes"}}), "train")


def test_values_are_validated(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        config.build_section("train", {"num_heads": 4, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="final_mode='ttt'"):
        config.build_section("evaluate", {"final_mode": "ttt"})
    with pytest.raises(ValueError, match="compressors"):
        config.build_section("quantize", {"compressors": ["gzip"]})
    with pytest.raises(ValueError, match="compile_mode='max-autotune'.*max-autotune-no-cudagraphs"):
        config.build_section("train", {"compile_mode": "max-autotune"})  # CUDA graphs: not offered
    with pytest.raises(FileNotFoundError, match="params file not found"):
        config.load_section(tmp_path / "missing.yaml", "train")


def test_ints_widen_to_floats_and_absent_keys_default(tmp_path):
    cfg = config.load_section(write(tmp_path, {"train": {"matrix_lr": 1}}), "train")
    assert cfg.matrix_lr == 1.0 and isinstance(cfg.matrix_lr, float)
    assert cfg.iterations == config.TrainConfig().iterations


def test_assignments_read_as_yaml_and_keys_are_checked_by_the_section():
    values = config.parse_assignments(["compile_tune_kernels=true", "matrix_lr=0.03", "compile_mode=default"])
    assert values == {"compile_tune_kernels": True, "matrix_lr": 0.03, "compile_mode": "default"}
    assert config.build_section("train", values).matrix_lr == 0.03
    with pytest.raises(ValueError, match="'matrix_lr' is not KEY=VALUE"):
        config.parse_assignments(["matrix_lr"])
    with pytest.raises(ValueError, match="did you mean 'matrix_lr'"):
        config.build_section("train", config.parse_assignments(["matrx_lr=0.1"]))
