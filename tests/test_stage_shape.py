"""Every stage has one shape: `stages/<name>.py` is only a call to
`pgolf_core.stage.cli.main`; `pgolf_core.stage.<name>.run(cfg, paths) -> StageResult`
takes its params section and a frozen Paths dataclass whose fields are the path flags of
the stage's `dvc.yaml` cmd. Also: the shared validation setup, the CLI's writing and
failing, the train stage and quantize -> verify -> evaluate called as functions on a
tiny model."""

import ast
import dataclasses
import importlib
import inspect
import json
import shlex
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf_core import bpb, calibration, checkpoint, config, data, io
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT
from pgolf_core.stage import cli
from pgolf_core.stage.result import StageResult
from pgolf_core.stage.validation import check_model_vocab, load_validation
from params_helpers import nested

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGES = sorted(DVC)
MAX_SCRIPT_LINES = 12


def paths_class(stage: str) -> type:
    return getattr(importlib.import_module(f"pgolf_core.stage.{stage}"), f"{stage.capitalize()}Paths")


def test_the_eight_stages_each_have_a_script_and_a_module():
    assert set(STAGES) == {"tokenize", "ngrams", "train", "script", "quantize", "verify", "evaluate", "export"}
    assert sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__") == STAGES
    assert {p.stem for p in (ROOT / "pgolf_core" / "stage").glob("*.py")} >= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_script_is_only_a_call_into_the_shared_cli(stage):
    source = (ROOT / "stages" / f"{stage}.py").read_text()
    assert len(source.splitlines()) <= MAX_SCRIPT_LINES
    docstring, imports, main, guard = ast.parse(source).body  # nothing else at module level
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert ast.unparse(imports) == f"from pgolf_core.stage import cli, {stage}"
    assert isinstance(main, ast.FunctionDef) and main.name == "main"
    assert [a.arg for a in main.args.args] == ["argv"] and len(main.body) == 1
    assert ast.unparse(main.body[0]) == f"cli.main({stage!r}, {stage}.run, {stage}.{stage.capitalize()}Paths, argv)"
    assert ast.unparse(guard) == "if __name__ == '__main__':\n    main()"


def test_the_scripts_are_the_same_text_but_for_the_stage_name():
    def template(stage):
        text = (ROOT / "stages" / f"{stage}.py").read_text()
        return text.replace(stage.capitalize(), "NAME").replace(stage, "name")

    assert len({template(stage) for stage in STAGES}) == 1


@pytest.mark.parametrize("stage", STAGES)
def test_run_takes_its_section_and_its_paths_and_returns_a_stage_result(stage):
    module = importlib.import_module(f"pgolf_core.stage.{stage}")
    assert list(inspect.signature(module.run).parameters) == ["cfg", "paths"]
    # the script stage bakes several sections (its SECTIONS) into the submission: it takes them all
    section = dict if hasattr(module, "SECTIONS") else config.SECTIONS[stage]
    assert typing.get_type_hints(module.run) == {"cfg": section, "paths": paths_class(stage), "return": StageResult}
    assert dataclasses.is_dataclass(paths_class(stage)) and paths_class(stage).__dataclass_params__.frozen


@pytest.mark.parametrize("stage", STAGES)
def test_the_paths_fields_are_the_flags_of_the_dvc_cmd(stage):
    """dvc.yaml's cmd parses, sets every required path, and names no flag the stage lacks."""
    argv = shlex.split(DVC[stage]["cmd"])
    assert argv[:3] == ["python", "-m", f"stages.{stage}"]
    fields = dataclasses.fields(paths_class(stage))
    required = {cli.flag(f.name) for f in fields if f.default is dataclasses.MISSING}
    assert required <= set(argv[3::2]) <= {"--params"} | {cli.flag(f.name) for f in fields}
    args = cli.parser(stage, paths_class(stage)).parse_args(argv[3:])
    assert args.params == Path("params.yaml")
    for f in fields:
        given = cli.flag(f.name) in argv
        assert getattr(args, f.name) == (Path(argv[argv.index(cli.flag(f.name)) + 1]) if given else f.default)


# the shared validation setup

@pytest.fixture
def shards(tmp_path, tiny_sp, embedded_docs):
    """Val and train shards of the tiny tokenizer: three documents, then six."""
    def stream(docs):
        return np.array([t for doc in docs for t in [tiny_sp.bos_id()] + tiny_sp.encode(doc[:300])], dtype=np.uint16)

    data.write_split(tmp_path / "shards", "val", stream(embedded_docs[:3]), 10_000)
    data.write_split(tmp_path / "shards", "train", stream(embedded_docs[3:9]), 10_000)
    return tmp_path / "shards"


def test_load_validation_is_the_tokenizer_the_val_split_and_its_byte_counts(shards, tiny_sp, tiny_tokenizer_dir):
    sp, tokens, byte_counts = load_validation(tiny_tokenizer_dir, shards)
    assert sp.vocab_size() == tiny_sp.vocab_size()
    np.testing.assert_array_equal(tokens, data.load_split(shards, "val", sp.vocab_size()))
    np.testing.assert_array_equal(byte_counts, bpb.val_byte_counts(tiny_sp, shards, tokens))
    assert (tokens == sp.bos_id()).sum() == 3 and byte_counts[0] == 0 and byte_counts.sum() > len(tokens)


def test_load_validation_names_a_missing_tokenizer(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_validation(tmp_path / "nowhere", shards)


def test_check_model_vocab_names_both_sizes_and_the_tokenizer(tiny_sp, tiny_tokenizer_dir):
    check_model_vocab(ModelConfig(vocab_size=tiny_sp.vocab_size()), tiny_sp, tiny_tokenizer_dir)
    with pytest.raises(ValueError) as e:
        check_model_vocab(ModelConfig(vocab_size=480), tiny_sp, tiny_tokenizer_dir)
    assert str(e.value) == f"model vocab 480 != tokenizer vocab {tiny_sp.vocab_size()} ({tiny_tokenizer_dir})"


# the shared CLI, on a stand-in stage that reads the verify section


@dataclasses.dataclass(frozen=True)
class StandInPaths:
    train_metrics: Path
    metrics: Path
    snapshots: Path | None = None


def cli_main(tmp_path, run, *extra):
    (tmp_path / "params.yaml").write_text("verify: {seq_len: 64}\n")
    return cli.main("verify", run, StandInPaths, ["--params", str(tmp_path / "params.yaml"), "--train-metrics",
                                                  str(tmp_path / "train.json"), "--metrics", str(tmp_path / "m.json"),
                                                  *extra])


def test_cli_parses_runs_writes_the_report_and_prints_the_summary(tmp_path, capsys):
    seen = []

    def run(cfg, paths):
        seen.append((cfg, paths))
        return StageResult({"x": 1.5, "mode": "a", "group": {"bytes": 3, "codec": "zstd"}}, {"in": "abc"},
                           provenance={"code_files": {"f.py": 10}}, summary=["stand-in: done", "  detail"])

    result = cli_main(tmp_path, run, "--snapshots", str(tmp_path / "snap"))
    (cfg, paths), = seen
    assert cfg == config.build_section("verify", {"seq_len": 64}) and result.metrics["x"] == 1.5
    assert paths == StandInPaths(tmp_path / "train.json", tmp_path / "m.json", tmp_path / "snap")
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 1.5, "group": {"bytes": 3}}
    provenance = json.loads(io.provenance_path(tmp_path / "m.json").read_text())
    assert provenance["labels"] == {"mode": "a", "group": {"codec": "zstd"}}
    assert provenance["data_sha256"] == {"in": "abc"} and provenance["code_files"] == {"f.py": 10}
    assert capsys.readouterr().out == "stand-in: done\n  detail\n"
    assert cli_main(tmp_path, lambda cfg, paths: (seen.append(paths), StageResult({}))[1]) is not None
    assert seen[-1].snapshots is None  # an optional path's default


@pytest.mark.parametrize("error", [ValueError("model vocab 480 != tokenizer vocab 512 (tok)"),
                                   FileNotFoundError("tokenizer not found: tok/tokenizer.model")])
def test_cli_fails_on_bad_inputs_naming_the_stage_and_writes_nothing(tmp_path, error):
    def run(cfg, paths):
        raise error

    with pytest.raises(SystemExit) as e:
        cli_main(tmp_path, run)
    assert e.value.code == f"verify FAILED: {error}"
    assert not (tmp_path / "m.json").exists() and not io.provenance_path(tmp_path / "m.json").exists()


def test_cli_fails_on_a_mistyped_params_key_before_running(tmp_path):
    (tmp_path / "params.yaml").write_text("verify: {seq_lne: 64}\n")
    with pytest.raises(SystemExit) as e:
        cli.main("verify", lambda cfg, paths: pytest.fail("ran"), StandInPaths,
                 ["--params", str(tmp_path / "params.yaml"), "--train-metrics", "t", "--metrics", "m"])
    assert e.value.code.startswith("verify FAILED: unknown params key verify.seq_lne (did you mean 'seq_len'?)")


def test_cli_writes_then_fails_on_broken_rules(tmp_path, capsys):
    def run(cfg, paths):
        return StageResult({"fits": False}, provenance={"broken_rules": ["too big", "too slow"]},
                           broken_rules=["too big", "too slow"], summary=["stand-in: checked"])

    with pytest.raises(SystemExit) as e:
        cli_main(tmp_path, run)
    assert e.value.code == "verify FAILED:\n  too big\n  too slow"
    assert json.loads((tmp_path / "m.json").read_text()) == {"fits": False}
    assert json.loads(io.provenance_path(tmp_path / "m.json").read_text())["broken_rules"] == ["too big", "too slow"]
    assert capsys.readouterr().out == "stand-in: checked\n"


def test_cli_leaves_the_writing_to_a_stage_that_did_it(tmp_path, capsys):
    cli_main(tmp_path, lambda cfg, paths: StageResult({"steps": 4}, summary=["stand-in: trained"], write_report=False))
    assert not (tmp_path / "m.json").exists() and capsys.readouterr().out == "stand-in: trained\n"


# the train stage as a function, on the CPU: no challenge run, and it says why


def test_train_stage_on_the_cpu_is_not_a_challenge_run_and_says_why(tmp_path, shards, tiny_tokenizer_dir, capsys):
    from pgolf_core.stage import train

    cfg = config.build_section("train", nested(dict(
        num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2, seq_len=16, batch_tokens=64,
        micro_batch_seqs=4, iterations=2, val_every=0, val_tokens=64, calib_batches=1, device="cpu")))
    paths = train.TrainPaths(shards=shards, tokenizer=tiny_tokenizer_dir, out=tmp_path / "model.safetensors",
                             hessians=tmp_path / "hessians.safetensors", metrics=tmp_path / "train",
                             train_log=tmp_path / "train.log")
    result = train.run(cfg, paths)
    log = paths.train_log.read_text().splitlines()
    assert log[0].startswith("train: ") and "seed 1337" in log[0]
    assert [line.split()[0] for line in log if line.startswith("step:")] == ["step:1/2", "step:2/2", "step:2/2"]
    assert log[-len(result.summary):] == result.summary  # the stage's summary closes the log
    assert result.metrics["challenge_run"] is False and result.metrics["resumed_from_step"] == 0
    written = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert written["challenge_run"] is False and "not_a_challenge_run" not in written  # a figure; reasons are labels
    reasons = json.loads(io.provenance_path(tmp_path / "train").read_text())["labels"]["not_a_challenge_run"]
    assert reasons == ["1 process(es), not 8", "device 'cpu', not an H100",
                       "train.schedule.mode 'steps', not a wall-clock schedule",
                       "train.schedule.max_wallclock_seconds 0 (no cap), not a cap of at most 600 s",
                       "a validation split of 3 documents, not the challenge's 50,000",
                       "shards without a record of their source (source.json): rerun tokenize"]  # calibrated, fresh
    (line,) = [line for line in result.summary if "challenge run" in line]
    assert line == f"train: not a challenge run ({'; '.join(reasons)}): its seconds are measurements on this machine"
    # no CPU rate is carried to the H100: no projected figure, and the label says why
    labels = json.loads(io.provenance_path(tmp_path / "train").read_text())["labels"]
    assert labels["projection_model_8xh100"].startswith("none: device 'cpu' is not an H100")
    assert "projected_8xh100_train_plus_calib_seconds" not in written
    assert any(line.startswith("train: projected on 8xH100: none: device 'cpu' is not an H100") for line in result.summary)
    assert result.metrics["calib_seconds"] > 0 and calibration.load_hessians(paths.hessians)
    uncalibrated = train.run(dataclasses.replace(cfg, calib_batches=0), paths)
    assert "no GPTQ calibration in the training launch (train.calib_batches is 0)" in \
        uncalibrated.metrics["not_a_challenge_run"]
    # calib_batches 0 collects nothing: no seconds, a Hessians file without tensors
    assert uncalibrated.metrics["calib_seconds"] == 0.0 and calibration.load_hessians(paths.hessians) == {}


# script -> quantize -> verify -> evaluate as functions, on a tiny untrained model


def test_script_quantize_verify_evaluate_run_as_functions(tmp_path, shards, tiny_sp, tiny_tokenizer_dir):
    from pgolf_core.stage import evaluate, quantize, script, verify

    eval_cfg = config.build_section("evaluate", {"seq_len": 64, "stride": 32})
    baked = {"tokenize": config.build_section("tokenize", {"vocab_size": tiny_sp.vocab_size()}),
             "train": config.build_section("train", {}), "quantize": config.build_section("quantize", {}),
             "evaluate": eval_cfg, "script": config.build_section("script", {"payload": "latin1"})}
    s = script.run(baked, script.ScriptPaths(out=tmp_path / "script" / "train_gpt.py", metrics=tmp_path / "s.json"))
    assert s.metrics["code_bytes"] == (tmp_path / "script" / "train_gpt.py").stat().st_size
    assert s.metrics["code_bytes"] == min(s.metrics["bytes_minified"], s.metrics["bytes_self_extracting"])
    # shipped as latin-1 bytes (script.payload), which verify below runs alone
    assert (tmp_path / "script" / "train_gpt.py").read_bytes().startswith(b"#coding:latin-1\n")
    assert "pgolf_core.model" in s.provenance["bundled_modules"] and s.summary[0].startswith("script: ")

    model = GPT(ModelConfig(vocab_size=tiny_sp.vocab_size(), num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1,
                            mlp_mult=2, bos_id=tiny_sp.bos_id()))
    # fitted to the windows verify scores (64 tokens, none overlapping), so that a coarse artifact's damage below
    # is large and positive whatever the corpus: untrained, its sign followed the embedded corpus, which is read
    # from the stdlib (Python 3.11.2's gave -0.00034 at int5, 3.11.7's +0.00056)
    val = torch.from_numpy(data.load_split(shards, "val", tiny_sp.vocab_size()).astype(np.int64))
    windows = torch.stack([val[i : i + 65] for i in range(0, len(val) - 64, 64)])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        loss = model(windows[:, :-1], windows[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint.save_model(tmp_path / "model.safetensors", model)
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 1.0, "calib_seconds": 0.5, "challenge_run": False})

    q_paths = quantize.QuantizePaths(
        model=tmp_path / "model.safetensors", hessians=tmp_path / "none.safetensors", out=tmp_path / "artifact",
        reference=tmp_path / "reference.safetensors", script=tmp_path / "script" / "train_gpt.py",
        metrics=tmp_path / "quantize.json")
    q = quantize.run(config.build_section("quantize", {"passthrough_max_numel": 256}), q_paths)
    assert q.metrics["model_bytes"] == (tmp_path / "artifact" / "model.bin").stat().st_size
    assert q.metrics["num_quantized_tensors"] > 0 and q.inputs == {"model": io.sha256_files([tmp_path / "model.safetensors"])}
    assert q.write_report and not q.broken_rules and q.summary[0].startswith("quantize: rtn ")
    assert not (tmp_path / "quantize.json").exists()  # the CLI writes the report, not run

    verify_paths = verify.VerifyPaths(artifact=tmp_path / "artifact", reference=tmp_path / "reference.safetensors",
                                      model=tmp_path / "model.safetensors", shards=shards, tokenizer=tiny_tokenizer_dir,
                                      train_metrics=tmp_path / "train.json", script=tmp_path / "script" / "train_gpt.py",
                                      metrics=tmp_path / "verify.json")
    v = verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths)
    assert v.metrics["roundtrip_exact"] and v.metrics["fits_16mb"] and v.broken_rules == []
    assert v.metrics["train_plus_calib_seconds"] == 1.5 and v.provenance["broken_rules"] == []
    assert v.metrics["code_bytes"] == s.metrics["code_bytes"]  # the script as shipped
    assert v.metrics["artifact_bytes"] == s.metrics["code_bytes"] + q.metrics["model_bytes"]
    assert v.metrics["challenge_run"] is False
    lowered = verify.run(config.build_section("verify", {"seq_len": 64, "max_artifact_bytes": 1000}), verify_paths)
    assert len(lowered.broken_rules) == 1 and "> 1,000 (verify.max_artifact_bytes)" in lowered.broken_rules[0]
    assert lowered.metrics["fits_16mb"]  # the challenge's 16,000,000 bytes, whatever the lowered cap
    # verify.max_quant_damage, on an int5 artifact clipped at one standard deviation (about +1.4 bits per byte on
    # this fitted model with either Python)
    coarse = dataclasses.replace(verify_paths, artifact=tmp_path / "coarse", reference=tmp_path / "coarse.safetensors")
    categories = ("attention", "mlp", "embedding", "other")
    quantize.run(config.build_section("quantize", {"passthrough_max_numel": 256, "clip": "sdclip", "bits": dict.fromkeys(
        categories, 5), "sdclip_k": dict.fromkeys(categories, 1.0)}), dataclasses.replace(
        q_paths, out=coarse.artifact, reference=coarse.reference))
    threshold = {"seq_len": 64, "max_quant_damage": 0.0001}
    damaged = verify.run(config.build_section("verify", threshold), coarse)
    damage = damaged.metrics["quant_damage"]
    assert damage == damaged.metrics["val_bpb_roundtrip"] - damaged.metrics["val_bpb_float"] > 0.0001
    assert damaged.broken_rules == [f"quantization damage {damage:+.4f} val_bpb > verify.max_quant_damage 0.0001"]
    assert verify.run(config.build_section("verify", {**threshold, "max_quant_damage": damage + 0.0001}),
                      coarse).broken_rules == []

    # the time budget: broken only by a challenge run, whose seconds are the challenge's
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 650.0, "calib_seconds": 8.5, "challenge_run": False})
    slow = verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths)
    assert slow.broken_rules == [] and slow.metrics["train_plus_calib_seconds"] == 658.5
    assert "not a challenge run: reported, not checked against the challenge's 600 s" in slow.summary[-1]
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 595.0, "calib_seconds": 8.5, "challenge_run": True})
    over_budget = verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths)
    assert over_budget.metrics["challenge_run"] is True
    assert over_budget.broken_rules == ["a challenge run whose train + calibration took 603.5 s > 600 s"]
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 590.0, "calib_seconds": 8.5, "challenge_run": True})
    assert verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths).broken_rules == []
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 1.0, "calib_seconds": 0.5})  # an older train stage
    with pytest.raises(ValueError, match=r"train\.json has no challenge_run: written by an older train stage, rerun it"):
        verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths)

    e = evaluate.run(eval_cfg, evaluate.EvaluatePaths(
        artifact=tmp_path / "artifact", shards=shards, tokenizer=tiny_tokenizer_dir, metrics=tmp_path / "eval.json"))
    assert e.metrics["val_bpb"] == e.metrics["val_bpb_sliding"] > 0 and e.broken_rules == [] and e.write_report
    # the shipped script alone (python -I, no pgolf_core) scores the artifact as evaluate does
    assert v.metrics["isolated_final_mode"] == "sliding"
    assert v.metrics["val_bpb_isolated"] == pytest.approx(e.metrics["val_bpb"], abs=1e-6)
    io.write_json_atomic(tmp_path / "train.json", {"train_seconds": 1.0, "calib_seconds": 0.5, "challenge_run": False})
    (tmp_path / "script" / "train_gpt.py").write_text("raise SystemExit('not a submission')\n")
    (failed,) = verify.run(config.build_section("verify", {"seq_len": 64}), verify_paths).broken_rules
    assert "could not score the artifact alone (exit 1)" in failed and "not a submission" in failed
    assert e.metrics["val_bpb_nonoverlap"] == pytest.approx(v.metrics["val_bpb_roundtrip"], rel=1e-9)
    assert set(e.inputs) == {"artifact", "val_shards"}
    over = evaluate.run(config.build_section("evaluate", {"seq_len": 64, "stride": 32, "max_eval_seconds": 1e-9}),
                        evaluate.EvaluatePaths(artifact=tmp_path / "artifact", shards=shards,
                                               tokenizer=tiny_tokenizer_dir, metrics=tmp_path / "eval.json"))
    assert len(over.broken_rules) == 1 and "evaluate.max_eval_seconds" in over.broken_rules[0]
