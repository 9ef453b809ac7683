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


def test_artifact_cap_may_be_lowered_never_raised():
    assert config.build_section("verify", {"max_artifact_bytes": 15_950_000}).max_artifact_bytes == 15_950_000
    for bad in (16_000_001, 17_000_000, 0):
        with pytest.raises(ValueError, match=f"verify.max_artifact_bytes={bad}: must lie in \\(0, 16,000,000\\]"):
            config.build_section("verify", {"max_artifact_bytes": bad})


def test_nested_quantize_keys_build_check_and_merge(tmp_path):
    cfg = config.load_section(write(tmp_path, {"quantize": {"bits": {"mlp": 5}, "sdclip_k": {"embedding": 20}}}),
                              "quantize")
    assert (cfg.bits.mlp, cfg.bits.attention, cfg.sdclip_k.embedding) == (5, 8, 20.0)
    with pytest.raises(ValueError, match="params 'quantize.bits' must be a mapping of attention, mlp"):
        config.build_section("quantize", {"bits": 6})  # the old single width
    with pytest.raises(ValueError, match="unknown params key quantize.bits.mlpp \\(did you mean 'mlp'\\?\\)"):
        config.build_section("quantize", {"bits": {"mlpp": 6}})
    with pytest.raises(ValueError, match="quantize.bits.attention=4: must be 5, 6, 7 or 8"):
        config.build_section("quantize", {"bits": {"attention": 4}})
    with pytest.raises(ValueError, match="quantize.method='awq'"):
        config.build_section("quantize", {"method": "awq"})
    base = {"quantize": {"bits": {"mlp": 6, "attention": 6}}}
    assert config.merge_nested(base, {"quantize": {"bits": {"mlp": 5}}}) == {"quantize": {"bits": {"mlp": 5, "attention": 6}}}
