import pytest
import yaml

from pgolf_core import config


def write(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    path = write(tmp_path, {"train": {"optimizer": {"matrx_lr": 0.1}}})
    with pytest.raises(ValueError, match=r"unknown params key train\.optimizer\.matrx_lr \(did you mean 'matrix_lr'\?\)"):
        config.load_section(path, "train")
    # a near miss at the top of a section is named with the subsection it belongs to
    with pytest.raises(ValueError, match=r"unknown params key train\.matrx_lr \(did you mean 'optimizer\.matrix_lr'\?\)"):
        config.build_section("train", {"matrx_lr": 0.1})


def test_a_key_that_moved_into_a_subsection_is_refused_with_its_new_name():
    with pytest.raises(ValueError, match=r"^params key train\.matrix_lr moved to train\.optimizer\.matrix_lr$"):
        config.build_section("train", {"matrix_lr": 0.03})
    with pytest.raises(ValueError, match=r"^params key train\.num_layers moved to train\.model\.num_layers$"):
        config.build_section("train", {"num_layers": 2})
    with pytest.raises(ValueError, match=r"train\.max_wallclock_seconds moved to train\.schedule\.max_wallclock_seconds"):
        config.build_section("train", {"max_wallclock_seconds": 600.0})
    with pytest.raises(ValueError, match=r"train\.compile moved to train\.runtime\.compile"):
        config.build_section("train", {"compile": True})
    with pytest.raises(ValueError, match=r"train\.schedule is a section now: its value moved to train\.schedule\.mode"):
        config.build_section("train", {"schedule": "wallclock"})


def test_a_removed_key_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"^params key verify\.time_budget_seconds was removed: the training budget is "
                                         r"the challenge's 600 s \(pgolf_core/challenge\.py\), checked by verify on a "
                                         r"challenge run only; delete the key$"):
        config.build_section("verify", {"time_budget_seconds": 100000.0})


def test_each_train_subsection_is_its_own_typed_config():
    cfg = config.build_section("train", {"model": {"num_layers": 2}, "optimizer": {"matrix_lr": 0.05},
                                         "schedule": {"mode": "wallclock", "max_wallclock_seconds": 60},
                                         "runtime": {"compile": True}, "seq_len": 128})
    assert isinstance(cfg.model, config.ModelConfig) and cfg.model.num_layers == 2
    assert cfg.optimizer.matrix_lr == 0.05 and cfg.schedule.max_wallclock_seconds == 60.0
    assert cfg.schedule.train_seconds_cap == 60.0 and cfg.runtime.compile and cfg.seq_len == 128
    assert cfg.model.vocab_size == 0 and cfg.model.with_vocab(300).vocab_size == 300
    with pytest.raises(ValueError, match=r"train\.model\.vocab_size=512 but the tokenizer has 300 pieces"):
        config.build_section("train", {"model": {"vocab_size": 512}}).model.with_vocab(300)
    assert config.section_keys("train")[:2] == ["train.model.vocab_size", "train.model.num_layers"]
    assert "train.optimizer.matrix_lr" in config.section_keys("train") and "train.seq_len" in config.section_keys("train")


def test_unknown_section_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="unknown section 'trian'.*'train'"):
        config.load_section(write(tmp_path, {"trian": {}}), "train")
    with pytest.raises(ValueError, match="train.schedule.iterations: expected an integer, found 'ten'"):
        config.load_section(write(tmp_path, {"train": {"schedule": {"iterations": "ten"}}}), "train")
    with pytest.raises(ValueError, match="train.runtime.compile: expected true/false"):
        config.load_section(write(tmp_path, {"train": {"runtime": {"compile": "yes"}}}), "train")
    with pytest.raises(ValueError, match="train.model.value_embed_layers: expected list, found 3"):
        config.build_section("train", {"model": {"value_embed_layers": 3}})


def test_values_are_validated(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        config.build_section("train", {"model": {"num_heads": 4, "num_kv_heads": 3}})
    with pytest.raises(ValueError, match="final_mode='ttt'"):
        config.build_section("evaluate", {"final_mode": "ttt"})
    with pytest.raises(ValueError, match="compressors"):
        config.build_section("quantize", {"compressors": ["gzip"]})
    with pytest.raises(ValueError, match="train.runtime.compile_mode='max-autotune'.*max-autotune-no-cudagraphs"):
        config.build_section("train", {"runtime": {"compile_mode": "max-autotune"}})  # CUDA graphs: not offered
    with pytest.raises(ValueError, match="train.model.parallel_mode='lanes'"):
        config.build_section("train", {"model": {"parallel_mode": "lanes"}})
    with pytest.raises(ValueError, match="train.schedule.mode 'wallclock' needs train.schedule.max_wallclock_seconds"):
        config.build_section("train", {"schedule": {"mode": "wallclock"}})
    with pytest.raises(ValueError, match="script.payload='base64': must be one of 'base85', 'latin1'"):
        config.build_section("script", {"payload": "base64"})
    with pytest.raises(FileNotFoundError, match="params file not found"):
        config.load_section(tmp_path / "missing.yaml", "train")


def test_ints_widen_to_floats_and_absent_keys_default(tmp_path):
    cfg = config.load_section(write(tmp_path, {"train": {"optimizer": {"matrix_lr": 1}}}), "train")
    assert cfg.optimizer.matrix_lr == 1.0 and isinstance(cfg.optimizer.matrix_lr, float)
    assert cfg.schedule.iterations == config.TrainConfig().schedule.iterations
    assert cfg.optimizer.embed_lr == config.OptimizerConfig().embed_lr


def test_assignments_read_as_yaml_and_keys_are_checked_by_the_section():
    values = config.parse_assignments(["runtime.compile_tune_kernels=true", "optimizer.matrix_lr=0.03",
                                       "runtime.compile_mode=default", "seed=7"])
    assert values == {"runtime": {"compile_tune_kernels": True, "compile_mode": "default"},
                      "optimizer": {"matrix_lr": 0.03}, "seed": 7}
    cfg = config.build_section("train", values)
    assert cfg.optimizer.matrix_lr == 0.03 and cfg.runtime.compile_tune_kernels and cfg.seed == 7
    with pytest.raises(ValueError, match="'optimizer.matrix_lr' is not KEY=VALUE"):
        config.parse_assignments(["optimizer.matrix_lr"])
    with pytest.raises(ValueError, match="did you mean 'matrix_lr'"):
        config.build_section("train", config.parse_assignments(["optimizer.matrx_lr=0.1"]))
    with pytest.raises(ValueError, match="moved to train.optimizer.matrix_lr"):
        config.build_section("train", config.parse_assignments(["matrix_lr=0.1"]))


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
