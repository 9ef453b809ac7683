"""The exported train_gpt.py (issue 22): generated from pgolf's modules, run alone in a
fresh `python -I` where pgolf_core cannot be imported, it trains, writes its artifact and
scores it to the val_bpb pgolf's own stage functions give in this process; its eval-only
entry rescores the artifact; the environment maps onto the typed config; the exporter
writes a records-style folder and refuses runs that break the rules."""

import ast
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_core import (artifact, bundle, calibration, checkpoint, config, data, submission, submission_export,
                        tokenizer)
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval.run import evaluate
from pgolf_core.model import GPT
from pgolf_core.quant.fit import pack_to_fit
from pgolf_core.quant.pipeline import quantize_model
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.train import set_seed, train

ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 512  # the pieces of conftest's tiny tokenizer
# The script's val_bpb against the in-process pipeline's: same functions, same seed, two processes.
# Equal here, but float32 reduction order may differ between processes (CI once put the export
# bench's two sides 3.0e-10 bpb apart); the artifact itself must stay byte-identical.
TWO_PROCESSES_BPB = 1e-8

# The CPU profile with GPTQ (so calibration runs in the launch), baked into the script;
# the environment shrinks it to a tiny run, as a user of the public scripts would.
PROFILE = config.read_profile(ROOT / "profiles" / "cpu.yaml")
BAKED_PARAMS = config.merge_nested(PROFILE, {"quantize": {"method": "gptq"}})
ENV = {"VOCAB_SIZE": str(TINY_VOCAB), "NUM_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
       "MLP_MULT": "2", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "256", "ITERATIONS": "6",
       "GPTQ_CALIB_BATCHES": "2", "VAL_LOSS_EVERY": "3", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "SEED": "7",
       "RUN_ID": "tiny"}
# The same run written as params, independently of the environment mapping.
TINY_PARAMS = config.merge_nested(BAKED_PARAMS, {
    "tokenize": {"vocab_size": TINY_VOCAB},
    "train": {"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "mlp_mult": 2},
              "seq_len": 32, "batch_tokens": 256, "calib_batches": 2, "seed": 7,
              "schedule": {"iterations": 6}, "runtime": {"val_every": 3}},
    "evaluate": {"seq_len": 64, "stride": 32}})
NEVER_BUNDLED = ("pgolf_core.hub", "pgolf_core.ngrams", "pgolf_core.export", "pgolf_core.bundle",
                 "pgolf_core.submission_export", "pgolf_core.profile", "pgolf_core.corpus")
FINAL = re.compile(r"^final mode:(\S+) val_bpb:([0-9.]+) val_loss:([0-9.]+) artifact_bytes:(\d+) code_bytes:(\d+) "
                   r"model_bytes:(\d+)", re.M)


def configs(values: dict) -> dict:
    return {name: config.build_section(name, values.get(name) or {}) for name in config.SECTIONS}


def baked(values: dict) -> dict:
    return submission_export.baked_params(configs(values))


def clean_env(**extra) -> dict:
    """This environment without PYTHONPATH and without any variable the script reads."""
    return {**submission.settings_free(os.environ), **extra}


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, shards, tiny_tokenizer_dir):
    """The CPU profile's script, shrunk by the environment, trained alone in an empty folder;
    then its eval-only entry on the artifact it wrote."""
    shipped = submission_export.build_script(configs(BAKED_PARAMS))
    folder = tmp_path_factory.mktemp("submission")
    script = folder / "train_gpt.py"
    script.write_bytes(shipped.data)
    env = clean_env(DATA_PATH=str(shards), TOKENIZER_PATH=str(tiny_tokenizer_dir / tokenizer.MODEL_FILE), **ENV)
    trained = bundle.run_isolated(script, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    rescored = bundle.run_isolated(script, env={**env, "EVAL_ONLY": "1",
                                                "ARTIFACT_PATH": str(folder / submission.ARTIFACT_NAME)}, timeout=600)
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    return shipped, folder, trained, rescored


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, shards, tiny_tokenizer_dir):
    """TINY_PARAMS through the pipeline's own functions in this process, the way the
    train, quantize and evaluate stages chain them (files in between)."""
    params = configs(TINY_PARAMS)
    cfg, quant_cfg, eval_cfg = params["train"], params["quantize"], params["evaluate"]
    work = tmp_path_factory.mktemp("pipeline")
    device = torch.device("cpu")
    set_seed(cfg.seed)
    sp = tokenizer.load_tokenizer(tiny_tokenizer_dir)
    assert sp.vocab_size() == TINY_VOCAB
    stream = data.TokenStream(data.list_shards(shards, "train"), sp.vocab_size())
    val = data.load_split(shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, shards, val)
    model = GPT(cfg.model.with_vocab(sp.vocab_size()), resolve_kernels(device, cfg.runtime))
    collected = []
    result = train(cfg, model, stream, val, val_bytes, device, log=lambda step, values: None,
                   calibrate=lambda m: collected.append(calibration.collect_hessians(
                       m, stream, cfg.calib_batches, cfg.micro_batch_seqs, cfg.seq_len, device, None)))
    checkpoint.save_model(work / "model.safetensors", model)
    calibration.save_hessians(work / "hessians.safetensors", collected[0])
    state, model_config = checkpoint.read_model_file(work / "model.safetensors")
    qm, _ = quantize_model(state, quant_cfg, calibration.load_hessians(work / "hessians.safetensors"), device)
    qm, blob, _, _ = pack_to_fit(qm, dataclasses.asdict(model_config), quant_cfg.compressors, quant_cfg.layouts,
                                 quant_cfg.fit_bytes, 0, quant_cfg.chunk_bytes)
    (work / "artifact").mkdir()
    (work / "artifact" / "model.bin").write_bytes(blob)
    metrics = evaluate(eval_cfg, lambda: artifact.load_model(work / "artifact" / "model.bin"), val, val_bytes, device)
    metrics["final_mode"] = eval_cfg.final_mode  # a label: the stage writes it to the provenance
    train_metrics = {**dataclasses.asdict(result), "num_params": sum(p.numel() for p in model.parameters()),
                     "challenge_run": False, "not_a_challenge_run": ["1 process(es), not 8"]}  # as the stage writes
    return {"params": params, "work": work, "blob": blob, "eval": metrics, "train": train_metrics,
            "val_loss": submission.val_loss_of(eval_cfg, val, val_bytes, metrics["val_bpb"])}


def final_line(result) -> dict:
    match = FINAL.search(result.stdout)
    assert match, result.stdout[-3000:]
    mode, bpb, loss, total, code, model = match.groups()
    return {"mode": mode, "val_bpb": float(bpb), "val_loss": float(loss), "artifact_bytes": int(total),
            "code_bytes": int(code), "model_bytes": int(model)}


# --- what is bundled ---------------------------------------------------------------------


def imported_packages(modules) -> set[str]:
    """Top-level names every `import` / `from ... import` of these modules' sources names,
    wherever it sits (inside functions too); relative imports are left out."""
    names = set()
    for module in modules:
        base = bundle.SOURCE_ROOT.joinpath(*module.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_the_script_bundles_only_the_run_path():
    traced = bundle.traced_modules(("pgolf_core.submission",))
    for needed in ("pgolf_core.train", "pgolf_core.calibration", "pgolf_core.quant.gptq", "pgolf_core.quant.fit",
                   "pgolf_core.artifact", "pgolf_core.eval.run", "pgolf_core.tokenizer", "pgolf_core.submission"):
        assert needed in traced
    for absent in NEVER_BUNDLED:
        assert absent not in traced
    # the probe lists pgolf_core modules only: bench's absence is read from the bundled sources' imports
    assert "bench" not in imported_packages(traced) and "pgolf_core" in imported_packages(traced)
    # training's fused kernels only when the run switches them on
    assert not {"pgolf_core.fused_mlp", "pgolf_core.fused_ce"} & set(traced)
    plain = submission_export.script_modules(configs(BAKED_PARAMS)["train"])
    assert plain == (("pgolf_core.submission",), ("pgolf_core.fused_mlp", "pgolf_core.fused_ce"))
    fused = submission_export.script_modules(configs(config.merge_nested(
        BAKED_PARAMS, {"train": {"runtime": {"fused_mlp": True}}}))["train"])
    assert fused == (("pgolf_core.submission", "pgolf_core.fused_mlp"), ("pgolf_core.fused_ce",))


def test_requirements_come_from_the_bundled_imports(script_run):
    required, optional = submission_export.script_requirements(script_run[0].modules)
    names = {line.split("==")[0].lower() for line in required}
    assert names == {"brotli", "safetensors", "sentencepiece", "tqdm", "zstandard"}
    assert {line.split("==")[0] for line in optional} == {"PyYAML", "triton"}  # lazy: params files, GPU kernels


# --- the script's run ---------------------------------------------------------------------


def test_the_script_reproduces_the_pipeline(script_run, pipeline_run):
    shipped, folder, trained, _ = script_run
    line = final_line(trained)
    reference = pipeline_run["eval"]
    assert line["mode"] == "sliding"
    assert line["val_bpb"] == pytest.approx(reference["val_bpb"], abs=1e-6)
    summary = json.loads((folder / submission.SUMMARY_NAME).read_text())
    assert summary["val_bpb"] == pytest.approx(reference["val_bpb"], abs=TWO_PROCESSES_BPB, rel=0)
    assert summary["eval"]["val_bpb_nonoverlap"] == pytest.approx(reference["val_bpb_nonoverlap"],
                                                                  abs=TWO_PROCESSES_BPB, rel=0)
    assert summary["val_loss"] == pytest.approx(pipeline_run["val_loss"], rel=1e-12)
    assert (folder / submission.ARTIFACT_NAME).read_bytes() == pipeline_run["blob"]
    assert line["code_bytes"] == shipped.bytes == summary["code_bytes"]
    assert line["model_bytes"] == len(pipeline_run["blob"])
    assert summary["artifact_bytes"] == shipped.bytes + len(pipeline_run["blob"]) and summary["fits_16mb"]
    assert summary["train"]["steps"] == 6 and summary["train"]["calib_seconds"] > 0
    assert summary["train"]["val_bpb_prequant"] == pytest.approx(pipeline_run["train"]["val_bpb_prequant"],
                                                                  abs=TWO_PROCESSES_BPB, rel=0)
    assert summary["settings"]["train"] == config.to_dict(pipeline_run["params"]["train"])
    assert "step:3/6 val_bpb:" in trained.stdout  # VAL_LOSS_EVERY=3


def test_eval_only_rescores_the_artifact(script_run, pipeline_run):
    _, folder, trained, rescored = script_run
    assert final_line(rescored)["val_bpb"] == final_line(trained)["val_bpb"]
    summary = json.loads((folder / submission.EVAL_SUMMARY_NAME).read_text())
    assert summary["eval_only"]
    assert summary["val_bpb"] == pytest.approx(pipeline_run["eval"]["val_bpb"], abs=TWO_PROCESSES_BPB, rel=0)
    assert "step:" not in rescored.stdout and "train" not in summary


# The record profile as baked (every record switch: XSA, a loop, routed lanes, gates, GPTQ with
# SDClip, LQER, the int8 gate, four layouts, fit_bytes; phased TTT final), with the device,
# compile, schedule and evaluation batching a CPU can run; the environment shrinks the model.
RECORD_BAKED = config.merge_nested(config.read_profile(ROOT / "profiles" / "record_8xh100.yaml"), {
    "train": {"runtime": {"device": "cpu", "compile": False, "val_every": 0}, "micro_batch_seqs": 2,
              "schedule": {"mode": "steps", "max_wallclock_seconds": 0.0, "calib_reserve_seconds": 0.0}},
    "quantize": {"passthrough_max_numel": 512},  # else this model's matrices would all pass through as fp16
    "evaluate": {"modes": ["ttt_phased"], "compile": False, "batch_seqs": 4, "lora_batch_docs": 6,
                 "lora_group_rows": 3, "phase_boundaries": [3, 6], "ttt_chunk_tokens": 256, "max_eval_seconds": 0.0}})
RECORD_ENV = {"VOCAB_SIZE": str(TINY_VOCAB), "NUM_LAYERS": "4", "MODEL_DIM": "32", "NUM_HEADS": "2",
              "NUM_KV_HEADS": "1", "MLP_MULT": "2", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "3",
              "XSA_LAST_N": "4", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "256", "ITERATIONS": "3",
              "GPTQ_CALIB_BATCHES": "1", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "SEED": "5", "RUN_ID": "record"}


def test_the_record_profiles_script_scores_its_artifact_as_the_pipeline_does(tmp_path, shards, tiny_tokenizer_dir):
    """The record profile's script, alone, trains and scores in phased TTT; the pipeline's
    `evaluate`, in this process, gives the same val_bpb on the artifact it wrote, and the
    eval-only entry gives it again. Guards every record-only path of the shipped script
    (with its unreferenced defs dropped) against a name the bundle lost."""
    params = configs(RECORD_BAKED)
    shipped = submission_export.build_script(params)
    assert shipped.dropped
    script = tmp_path / "train_gpt.py"
    script.write_bytes(shipped.data)
    env = clean_env(DATA_PATH=str(shards), TOKENIZER_PATH=str(tiny_tokenizer_dir / tokenizer.MODEL_FILE),
                    **RECORD_ENV)
    trained = bundle.run_isolated(script, env=env, timeout=900)
    assert trained.returncode == 0, trained.stderr[-4000:]
    line = final_line(trained)
    assert line["mode"] == "ttt_phased" and line["code_bytes"] == shipped.bytes
    blob = (tmp_path / submission.ARTIFACT_NAME).read_bytes()
    sp = tokenizer.load_tokenizer(tiny_tokenizer_dir)
    val = data.load_split(shards, "val", sp.vocab_size())
    val_bytes = val_byte_counts(sp, shards, val)
    eval_cfg = dataclasses.replace(params["evaluate"], seq_len=64, stride=32)
    reference = evaluate(eval_cfg, lambda: artifact.load_model(tmp_path / submission.ARTIFACT_NAME), val, val_bytes,
                         torch.device("cpu"))
    assert reference["val_bpb"] == reference["val_bpb_ttt_phased"]
    summary = json.loads((tmp_path / submission.SUMMARY_NAME).read_text())
    assert summary["val_bpb"] == pytest.approx(reference["val_bpb"], abs=1e-6, rel=0)
    rescored = bundle.run_isolated(script, env={**env, "EVAL_ONLY": "1",
                                                "ARTIFACT_PATH": str(tmp_path / submission.ARTIFACT_NAME)}, timeout=900)
    assert rescored.returncode == 0, rescored.stderr[-4000:]
    assert final_line(rescored)["val_bpb"] == pytest.approx(line["val_bpb"], abs=1e-6, rel=0)
    assert len(blob) == line["model_bytes"]
    packed = summary["quantize"]
    assert packed["method"] == "gptq" and {"attention", "mlp", "embedding"} <= set(packed["bytes_per_group"])


# --- settings from the environment -------------------------------------------------------------


def test_environment_maps_onto_the_config(tmp_path):
    train_cfg, quant_cfg, eval_cfg, paths = submission.settings_from_env(
        baked(BAKED_PARAMS), {**ENV, "DATA_PATH": "d", "TOKENIZER_PATH": "t.model", "MAX_WALLCLOCK_SECONDS": "30",
                              "OUT_DIR": str(tmp_path), "EVAL_ONLY": "0", "TRAIN_LOG_EVERY": "2"})
    expected = configs(config.merge_nested(TINY_PARAMS, {"train": {"schedule": {"max_wallclock_seconds": 30.0},
                                                                   "runtime": {"log_every": 2}}}))
    assert train_cfg == expected["train"] and train_cfg.schedule.iterations == 6 and train_cfg.runtime.val_every == 3
    assert quant_cfg == expected["quantize"] and eval_cfg == expected["evaluate"]
    assert paths == submission.Paths(data=Path("d"), tokenizer=Path("t.model"), out_dir=tmp_path,
                                     artifact=tmp_path / submission.ARTIFACT_NAME, run_id="tiny",
                                     vocab_size=TINY_VOCAB, eval_only=False)


def test_the_records_ttt_gate_and_chunk_variables_map_and_no_name_is_both_mapped_and_refused():
    train_cfg, quant_cfg, eval_cfg, _ = submission.settings_from_env(baked(BAKED_PARAMS), {
        "TTT_CHUNK_SIZE": "16", "TTT_WARM_START_A": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
        "GATED_ATTN_QUANT_GATE": "1", "ENABLE_LOOPING_AT": "0.42"})
    # the records' TTT_CHUNK_SIZE is the per-document chunk (#687: 128; the phased records: 48)
    assert eval_cfg.lora_chunk_tokens == 16 and eval_cfg.ttt_chunk_tokens == configs(BAKED_PARAMS)[
        "evaluate"].ttt_chunk_tokens
    assert eval_cfg.lora_warm_start_a is True and train_cfg.schedule.loop_start_frac == 0.42
    assert train_cfg.model.attn_gate_scale == 0.5 and quant_cfg.gate_int8 is True
    assert not set(submission.ENV_KEYS) & set(submission.UNSUPPORTED)
    assert not set(submission.RUN_VARS) & (set(submission.ENV_KEYS) | set(submission.UNSUPPORTED))


def test_without_environment_the_baked_params_and_public_paths_hold():
    train_cfg, quant_cfg, eval_cfg, paths = submission.settings_from_env(baked(BAKED_PARAMS), {})
    expected = configs(BAKED_PARAMS)
    assert (train_cfg, quant_cfg, eval_cfg) == (expected["train"], expected["quantize"], expected["evaluate"])
    assert str(paths.data) == "data/datasets/fineweb10B_sp1024"
    assert str(paths.tokenizer) == "data/tokenizers/fineweb_1024_bpe.model"
    assert paths.artifact.name == submission.ARTIFACT_NAME and not paths.eval_only and paths.run_id


@pytest.mark.parametrize("env, named", [
    ({"ITERATIONS": "ten"}, r"ITERATIONS='ten': expected an integer"),
    ({"MATRIX_LR": "nan"}, r"MATRIX_LR='nan': expected a finite number"),
    ({"EVAL_ONLY": "maybe"}, r"EVAL_ONLY='maybe': expected 0 or 1"),
    ({"MODEL_DIM": "36"}, r"MODEL_DIM \(sets train.model.model_dim\): train.model.model_dim=36 must split"),
    ({"TRAIN_SEQ_LEN": "100"}, r"TRAIN_SEQ_LEN \(sets train.seq_len\): train.batch_tokens=8192 is not a multiple"),
    ({"TRAIN_SEQ_LEN": "100", "TRAIN_BATCH_TOKENS": "1050"}, r"TRAIN_BATCH_TOKENS \(sets train.batch_tokens\), "
                                                              r"TRAIN_SEQ_LEN \(sets train.seq_len\)"),
    ({"EVAL_STRIDE": "0"}, r"EVAL_STRIDE \(sets evaluate.stride\): evaluate.stride=0"),
    ({"GPTQ_CALIB_BATCHES": "0"}, r"GPTQ_CALIB_BATCHES is 0 but quantize.method is 'gptq'"),
    ({"WARMDOWN_ITERS": "1200"}, r"WARMDOWN_ITERS is a public script's setting this script does not honour"),
    ({"WARMDOWN_FRAC": "0.75", "TTT_LORA_RANK": "96", "PATH": "/bin", "TORCH_LOGS": "+dynamo"},
     r"^TTT_LORA_RANK, WARMDOWN_FRAC: named like a public script's setting, but this script does not read it"),
    ({"TTT_ENABLED": "1"}, r"TTT_ENABLED is a public script's setting .*: test-time training is chosen by "
                           r"evaluate.modes"),
    ({"GPTQ_ENABLED": "0"}, r"GPTQ_ENABLED is a public script's setting .*: the quantizer is quantize.method"),
    ({"VOCAB_SIZE": "-3"}, r"VOCAB_SIZE='-3': must be positive"),
    ({"DATA_PATH": ""}, r"DATA_PATH is set but empty"),
])
def test_bad_settings_name_their_variable(env, named):
    with pytest.raises(submission.SettingsError, match=named):
        submission.settings_from_env(baked(BAKED_PARAMS), env)


def test_bad_paths_name_their_variable(tmp_path, shards, tiny_tokenizer_dir):
    model_file = str(tiny_tokenizer_dir / tokenizer.MODEL_FILE)

    def paths(**env):
        return submission.settings_from_env(baked(BAKED_PARAMS), env)[3]

    with pytest.raises(submission.SettingsError, match="TOKENIZER_PATH='.*nope.model': no such file"):
        submission.load_tokenizer(paths(TOKENIZER_PATH=str(tmp_path / "nope.model")))
    with pytest.raises(submission.SettingsError, match="VOCAB_SIZE is 1024 .* has 512 pieces"):
        submission.load_tokenizer(paths(TOKENIZER_PATH=model_file))
    sp = submission.load_tokenizer(paths(TOKENIZER_PATH=str(tiny_tokenizer_dir), VOCAB_SIZE="512"))  # a folder works too
    with pytest.raises(submission.SettingsError, match="DATA_PATH='.*empty': no train shards"):
        (tmp_path / "empty").mkdir()
        submission.load_data(paths(DATA_PATH=str(tmp_path / "empty")), sp, with_train=True)
    with pytest.raises(submission.SettingsError, match="ARTIFACT_PATH='.*missing.pgolf': no such file"):
        submission.run(baked(BAKED_PARAMS), {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(tmp_path / "missing.pgolf"),
                                             "DATA_PATH": str(shards), "TOKENIZER_PATH": model_file, "VOCAB_SIZE": "512"})


# --- the exporter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_script(pipeline_run):
    return submission_export.build_script(pipeline_run["params"])


@pytest.fixture(scope="module")
def shipped_file(tiny_script, tmp_path_factory):
    """The script as the script stage would have written it."""
    path = tmp_path_factory.mktemp("script") / submission_export.SCRIPT_NAME
    path.write_bytes(tiny_script.data)
    return path


def agreeing_verify(pipeline_run) -> dict:
    """verify's figures when the shipped script scored the artifact as evaluate did."""
    return {"val_bpb_isolated": pipeline_run["eval"]["val_bpb"], "isolated_final_mode": pipeline_run["eval"]["final_mode"]}


def export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, out, *, params=None, train=None, eval_=None,
           **kwargs):
    kwargs.setdefault("verify_metrics", agreeing_verify(pipeline_run))
    if "shipped" not in kwargs:
        kwargs["shipped"] = out.parent / "shipped_train_gpt.py"
        kwargs["shipped"].parent.mkdir(parents=True, exist_ok=True)
        kwargs["shipped"].write_bytes(tiny_script.data)
    return submission_export.export_run(
        params or pipeline_run["params"], pipeline_run["work"] / "artifact", {**pipeline_run["train"], **(train or {})},
        {**pipeline_run["eval"], **(eval_ or {})}, shards, tiny_tokenizer_dir, out, script=tiny_script, **kwargs)


def test_export_writes_a_records_folder(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    log = tmp_path / "run.log"
    log.write_text("step:1/6 train_loss:6.2\n")
    out = tmp_path / "records" / "track_10min_16mb" / "2026-12-05_TinyCPU"
    result = export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, out, train_log=log,
                    hardware="cpu", torch_version=torch.__version__, git_commit="abc123")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "requirements.txt", "submission.json", "tokenizer.model", "train.log", "train_gpt.py"]
    assert (out / "train_gpt.py").read_bytes() == tiny_script.data
    assert (out / "tokenizer.model").read_bytes() == (tiny_tokenizer_dir / tokenizer.MODEL_FILE).read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    assert sub == result and sub["author"] == "" and sub["github_id"] == "" and sub["name"] == "TinyCPU"
    assert sub["val_bpb"] == pipeline_run["eval"]["val_bpb"]
    assert sub["val_loss"] == pytest.approx(pipeline_run["val_loss"], rel=1e-12)
    assert sub["bytes_code"] == tiny_script.bytes and sub["bytes_total"] == tiny_script.bytes + len(pipeline_run["blob"])
    assert sub["seeds"] == [7] and sub["track"] == "10min_16mb" and sub["hardware"] == "1x cpu"
    assert sub["compliance"].pop("challenge_run") is False and all(v is True for v in sub["compliance"].values())
    readme = (out / "README.md").read_text()
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme and "SEED=7" in readme
    assert "EVAL_ONLY=1" in readme and f"{pipeline_run['eval']['val_bpb']:.8f}" in readme
    assert "`train.model.num_layers=1`" in readme and "`quantize.method=gptq`" in readme
    assert re.search(r"\| validation documents also in the training shards \| [\d,]+ of [\d,]+ \([\d,]+ of [\d,]+ "
                     r"tokens; refused above 1% of the tokens\) \|", readme)
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert [r.split("==")[0].lower() for r in requirements if not r.startswith("#")] == \
        ["brotli", "safetensors", "sentencepiece", "tqdm", "zstandard"]


def test_an_lrzip_run_names_the_program_it_needs(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    """lrzip runs as a program, which no requirements.txt line installs: the folder says so."""
    quantize = dataclasses.replace(pipeline_run["params"]["quantize"], compressors=["zlib", "lrzip"])
    out = tmp_path / "lrzip"
    export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, out, params={**pipeline_run["params"],
                                                                               "quantize": quantize})
    assert "# system programs, not from pip (quantize.compressors): lrzip" in (out / "requirements.txt").read_text()
    assert "System programs it runs (not from pip): lrzip." in (out / "README.md").read_text()
    plain = tmp_path / "plain"
    export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, plain)
    assert "lrzip" not in (plain / "requirements.txt").read_text() + (plain / "README.md").read_text()


def _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, out, match, **kwargs):
    with pytest.raises(submission_export.ExportRefused, match=match):
        export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, out, **kwargs)
    assert not out.exists()  # nothing written


def test_refuses_an_artifact_over_the_limit(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    params = {**pipeline_run["params"], "verify": config.build_section("verify", {"max_artifact_bytes": 1000})}
    _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out",
             r"artifact is [\d,]+ bytes \([\d,]+ script \+ [\d,]+ model\) > 1,000 \(verify.max_artifact_bytes\)",
             params=params)
    broken = submission_export.broken_rules(pipeline_run["params"], tiny_script.bytes, 16_000_000 - tiny_script.bytes + 1,
                                            pipeline_run["train"], pipeline_run["eval"],
                                            {"val_tokens": 1, "overlap_tokens": 0, "overlap_documents": 0,
                                             "val_documents": 1}, tiny_script.modules, agreeing_verify(pipeline_run))
    assert broken == [f"artifact is 16,000,001 bytes ({tiny_script.bytes:,} script + "
                      f"{16_000_001 - tiny_script.bytes:,} model) > 16,000,000"]


def test_refuses_a_run_whose_shipped_script_scored_otherwise(tmp_path, pipeline_run, tiny_script, shards,
                                                            tiny_tokenizer_dir):
    val = pipeline_run["eval"]["val_bpb"]
    agreeing = agreeing_verify(pipeline_run)
    assert submission_export.broken_rules(
        pipeline_run["params"], tiny_script.bytes, 1000, pipeline_run["train"], pipeline_run["eval"],
        {"val_tokens": 1, "overlap_tokens": 0, "overlap_documents": 0, "val_documents": 1}, tiny_script.modules,
        agreeing) == []
    for verify_metrics, shown in (({**agreeing, "val_bpb_isolated": val + 0.01}, f"{val + 0.01}"),
                                  ({**agreeing, "isolated_final_mode": "nonoverlap"}, "'nonoverlap'"),
                                  ({}, "None")):
        _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out",
                 rf"the shipped script alone scored the artifact .*{re.escape(shown)}.*: the code that counts is not",
                 verify_metrics=verify_metrics)


def test_refuses_a_script_that_could_read_ngram_tables(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    assert not set(tiny_script.modules) & set(submission_export.NGRAM_MODULES)
    assert "pgolf_core.ngrams" in bundle.traced_modules(("pgolf_core.ngrams",))  # the names are real modules
    reading = dataclasses.replace(tiny_script, modules=tiny_script.modules + ("pgolf_core.ngrams",))
    _refusal(pipeline_run, reading, shards, tiny_tokenizer_dir, tmp_path / "out",
             r"the shipped script bundles pgolf_core.ngrams: it could read n-gram tables at evaluation")


@pytest.mark.parametrize("changes, dropped, match", [
    ({"train_seconds": 590.0, "calib_seconds": 12.5, "challenge_run": True}, (),
     r"a challenge run whose train \+ calibration took 602.5 s > 600 s"),
    ({"within_budget": False}, (), r"broke the run's own wall-clock cap"),
    ({}, ("calib_seconds",), r"no train_seconds, calib_seconds or challenge_run"),
    ({}, ("challenge_run",), r"no train_seconds, calib_seconds or challenge_run"),
], ids=["over-600s", "own-cap", "no-calibration-time", "no-challenge-flag"])
def test_refuses_training_over_the_budget(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir, changes,
                                          dropped, match):
    metrics = {k: v for k, v in {**pipeline_run["train"], **changes}.items() if k not in dropped}
    _refusal({**pipeline_run, "train": metrics}, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out", match)


@pytest.mark.parametrize("eval_, match", [
    ({"final_mode": "best_of_all", "val_bpb_best_of_all": 0.1, "val_bpb": 0.1},
     r"evaluation mode 'best_of_all', not one of the score-first modes nonoverlap, sliding"),
    ({"final_mode": "nonoverlap"}, r"from mode 'nonoverlap' but the params fixed evaluate.final_mode='sliding'"),
    ({"val_bpb": 0.5}, r"val_bpb 0.5 is not val_bpb_sliding"),
    ({"projected_8xh100_seconds": 750.0}, r"projects to 750 s on 8xH100 > 600 s"),
], ids=["not-score-first", "chosen-afterwards", "not-the-mode", "eval-over-600s"])
def test_refuses_an_evaluation_that_breaks_the_rules(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir,
                                                     eval_, match):
    _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out", match, eval_=eval_)


def test_refuses_a_run_that_trained_on_validation(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    leaky = tmp_path / "leaky"
    shutil.copytree(shards, leaky)
    val = data.load_split(shards, "val")
    train_tokens = data.load_split(shards, "train")
    cut = int(np.flatnonzero(train_tokens == config.BOS_ID)[np.flatnonzero(train_tokens == config.BOS_ID) > 15_000][0])
    data.write_split(leaky, "train", np.concatenate([train_tokens[:cut], val, train_tokens[cut:]]),
                     20_000)  # the validation documents between two training ones, across a shard boundary
    overlap = submission_export.validation_overlap(leaky, chunk_tokens=1000)
    assert overlap["overlap_documents"] == overlap["val_documents"] == 10
    assert overlap["overlap_tokens"] == overlap["val_tokens"] == len(val)
    assert submission_export.validation_overlap(shards)["overlap_tokens"] == 0
    _refusal(pipeline_run, tiny_script, leaky, tiny_tokenizer_dir, tmp_path / "out",
             r"the training shards hold 10 of the 10 validation documents .*: the validation split was trained on")


def test_overlap_counts_exactly_the_leaked_documents_the_last_one_included(tmp_path, shards):
    """Validation documents 2 and 7 copied into the training data, 7 as its very last
    document (read from what is left after the final chunk): exactly those two count."""
    val = data.load_split(shards, "val")
    starts = [int(i) for i in np.flatnonzero(val == config.BOS_ID)] + [len(val)]
    assert starts[0] == 0 and len(starts) == 11
    doc = lambda i: val[starts[i] : starts[i + 1]]  # noqa: E731
    train_tokens = data.load_split(shards, "train")
    cut = int(np.flatnonzero(train_tokens == config.BOS_ID)[3])
    leaky = tmp_path / "leaky"
    shutil.copytree(shards, leaky)
    data.write_split(leaky, "train", np.concatenate([train_tokens[:cut], doc(2), train_tokens[cut:], doc(7)]), 20_000)
    overlap = submission_export.validation_overlap(leaky, chunk_tokens=1000)
    assert overlap["overlap_documents"] == 2
    assert overlap["overlap_tokens"] == len(doc(2)) + len(doc(7))


def test_refuses_a_run_that_shipped_another_script(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    other = tmp_path / "train_gpt.py"
    other.write_bytes(tiny_script.data + b"\n")  # one byte more: other code, other code_bytes
    _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out",
             r"train_gpt.py differs from the script these params and this checkout generate", shipped=other)


def test_refuses_an_artifact_of_other_settings(tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    other = configs(config.merge_nested(TINY_PARAMS, {"train": {"model": {"mlp_mult": 3}}}))
    _refusal(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "out",
             r"the artifact's model config is not train.model of these params", params=other)


def test_export_cli(tmp_path, pipeline_run, tiny_script, shipped_file, shards, tiny_tokenizer_dir, monkeypatch,
                    capsys):
    """The documented command, on files as the stages write them (figures, provenance labels)."""
    import yaml

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({n: config.to_dict(c) for n, c in pipeline_run["params"].items()}))
    metrics = tmp_path / "metrics"
    (metrics / "train").mkdir(parents=True)
    (metrics / "provenance").mkdir()
    (metrics / "train" / "metrics.json").write_text(json.dumps(pipeline_run["train"]))
    figures = {k: v for k, v in pipeline_run["eval"].items() if not isinstance(v, str)}
    (metrics / "eval.json").write_text(json.dumps(figures))
    (metrics / "provenance" / "eval.json").write_text(json.dumps({"labels": {"final_mode": "sliding"}}))
    (metrics / "provenance" / "train.json").write_text(json.dumps({"device": "cpu", "torch_version": "2.x"}))
    monkeypatch.setattr(submission_export, "build_script", lambda params: tiny_script)  # built once, by the fixture
    (metrics / "verify.json").write_text(json.dumps({"val_bpb_isolated": pipeline_run["eval"]["val_bpb"]}))
    (metrics / "provenance" / "verify.json").write_text(json.dumps({"labels": {"isolated_final_mode": "sliding"}}))
    out = tmp_path / "records" / "track_10min_16mb" / "2026-12-05_Cli"
    required = ["--params", str(params_file), "--artifact", str(pipeline_run["work"] / "artifact"),
                "--script", str(shipped_file), "--verify-metrics", str(metrics / "verify.json")]
    args = required + ["--train-metrics", str(metrics / "train" / "metrics.json"),
                       "--eval-metrics", str(metrics / "eval.json"),
                       "--shards", str(shards), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out)]
    for dropped in ("--script", "--verify-metrics"):  # the checks of what shipped are never skipped
        at = required.index(dropped)
        with pytest.raises(SystemExit):
            submission_export.main(required[:at] + required[at + 2:] + args[len(required):])
        assert f"the following arguments are required: {dropped}" in capsys.readouterr().err
    submission_export.main(args)
    assert f"export: {out}: val_bpb" in capsys.readouterr().out
    sub = json.loads((out / "submission.json").read_text())
    assert sub["hardware"] == "1x cpu" and sub["pytorch_version"] == "2.x" and sub["name"] == "Cli"
    with pytest.raises(SystemExit, match="exists and is not empty"):
        submission_export.main(args)
    (metrics / "provenance" / "eval.json").write_text(json.dumps({"labels": {"final_mode": "nonoverlap"}}))
    with pytest.raises(SystemExit, match="(?s)export FAILED: refused to export.*'nonoverlap'"):
        submission_export.main(args[:-1] + [str(tmp_path / "other")])


def test_val_loss_is_the_mean_nll_of_the_scored_targets(shards, tiny_sp):
    val = data.load_split(shards, "val")
    counts = val_byte_counts(tiny_sp, shards, val)
    cfg = config.build_section("evaluate", {"seq_len": 32, "stride": 32, "lora_chunk_tokens": 32, "truncate_to_seq_len": True})
    end = (len(val) - 1) // 32 * 32 + 1
    nll = 2.5 * (end - 1)  # a mean of 2.5 nats over the truncated targets
    bpb = nll / math.log(2) / counts[1:end].sum()
    assert submission.val_loss_of(cfg, val, counts, bpb) == pytest.approx(2.5, rel=1e-12)


def test_a_run_that_is_no_challenge_run_is_exported_with_its_seconds_as_measurements(
        tmp_path, pipeline_run, tiny_script, shards, tiny_tokenizer_dir):
    """Only a challenge run's seconds are the challenge's: a CPU run of 4,000 s still
    exports (its script is the submission), and its README says why it is no challenge run."""
    slow = {**pipeline_run, "train": {**pipeline_run["train"], "train_seconds": 4000.0}}
    out = tmp_path / "out"
    result = export(slow, tiny_script, shards, tiny_tokenizer_dir, out)
    assert result["compliance"]["challenge_run"] is False and result["compliance"]["train_under_600s"] is False
    assert "| challenge run | no (1 process(es), not 8): the time figures are measurements on this machine" in \
        (out / "README.md").read_text()


def test_the_readme_gives_the_training_projection_and_its_model(tmp_path, pipeline_run, tiny_script, shards,
                                                                  tiny_tokenizer_dir):
    """The train metrics' projection to 8xH100 and its model go to the README's training
    row; a run on a device whose rate does not carry over says so instead of a figure."""
    h100 = {"projected_8xh100_train_plus_calib_seconds": 1234.56, "projection_model_8xh100": "the model, stated"}
    export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "h100", train=h100)
    assert "calibration" in (row := next(line for line in (tmp_path / "h100" / "README.md").read_text().splitlines()
                                         if line.startswith("| training |")))
    assert row.endswith("measured; 1234.6 s projected on 8xH100 (the model, stated) |")
    cpu = {"projection_model_8xh100": "none: device 'cpu' is not an H100"}
    export(pipeline_run, tiny_script, shards, tiny_tokenizer_dir, tmp_path / "cpu", train=cpu)
    assert "measured; no 8xH100 projection (none: device 'cpu' is not an H100) |" in \
        (tmp_path / "cpu" / "README.md").read_text()
