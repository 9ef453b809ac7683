"""End to end through DVC on a temporary copy of the repo with a seconds-long profile:
the whole DAG runs, reruns only what changed, `dvc exp run -S` takes effect, and
`verify` refuses a broken artifact."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf_core import config

ROOT = Path(__file__).resolve().parents[1]
TEST_PROFILE = {
    "tokenize": {"max_documents": 400, "val_documents": 40, "vocab_size": 480, "num_threads": 2},
    "ngrams": {},
    "train": {"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "mlp_mult": 2},
              "schedule": {"iterations": 4}, "runtime": {"val_every": 0, "val_tokens": 1024},
              "seq_len": 64, "batch_tokens": 1024, "micro_batch_seqs": 16},
    "quantize": {"passthrough_max_numel": 256},
    "verify": {"seq_len": 64},
    "evaluate": {"seq_len": 64, "stride": 32},
}
ALL_STAGES = {"tokenize", "ngrams", "train", "script", "quantize", "verify", "evaluate", "export"}
pytestmark = pytest.mark.slow


def run(repo, *args, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def dvc(repo, *args, check=True):
    return run(repo, sys.executable, "-m", "dvc", *args, check=check)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def set_params(repo, section, **values):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section] = config.merge_nested(params[section], values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the tracked tree, with the test profile applied and one full run."""
    repo = tmp_path_factory.mktemp("pgolf") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("metrics/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for section, values in TEST_PROFILE.items():
        set_params(repo, section, **values)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.name", "pgolf test")
    run(repo, "git", "config", "user.email", "test@pgolf.local")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "test copy")
    first = dvc(repo, "repro")
    assert ran_stages(first.stdout) == ALL_STAGES
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "first run")
    return repo


def test_full_run_writes_every_metric(repo):
    metrics = {name: json.loads((repo / "metrics" / name).read_text())
               for name in ("tokenize.json", "ngrams.json", "quantize.json", "verify.json", "eval.json")}
    train = json.loads((repo / "metrics/train/metrics.json").read_text())
    assert {"documents", "bytes", "tokens"} <= set(metrics["tokenize.json"]["val"])
    assert metrics["ngrams.json"]["val_bpb_unigram"] > metrics["ngrams.json"]["val_bpb_bigram"]
    assert train["steps"] == 4 and {"train_seconds", "tokens_per_second", "ms_per_step", "val_bpb_prequant",
                                    "peak_mem_mib", "world_size", "seed"} <= set(train)
    assert train["calib_seconds"] > 0 and train["within_budget"]
    assert train["train_plus_calib_seconds"] == pytest.approx(train["train_seconds"] + train["calib_seconds"])
    assert train["challenge_run"] is False and "not_a_challenge_run" not in train  # a CPU run; its reasons are labels
    labels = json.loads((repo / "metrics/provenance/train.json").read_text())["labels"]
    assert "device 'cpu', not an H100" in labels["not_a_challenge_run"]
    verify = metrics["verify.json"]
    assert verify["challenge_run"] is False
    assert verify["fits_16mb"] and verify["roundtrip_exact"]
    assert verify["artifact_bytes"] == verify["code_bytes"] + verify["model_bytes"]
    assert verify["quant_damage"] == pytest.approx(verify["val_bpb_roundtrip"] - verify["val_bpb_float"], abs=1e-12)
    assert verify["val_bpb_float"] == pytest.approx(train["val_bpb_prequant"], rel=1e-6)  # same weights, same windows
    ev = metrics["eval.json"]
    assert ev["val_bpb"] == ev["val_bpb_sliding"] and ev["tokens_scored"] == metrics["tokenize.json"]["val"]["tokens"] - 1
    assert ev["val_bpb_nonoverlap"] == pytest.approx(verify["val_bpb_roundtrip"], rel=1e-9)
    # code bytes are the shipped script's, and that script alone rebuilds the score
    script = json.loads((repo / "metrics/script.json").read_text())
    assert verify["code_bytes"] == script["code_bytes"] == (repo / "data/script/train_gpt.py").stat().st_size
    assert verify["val_bpb_isolated"] == pytest.approx(ev["val_bpb"], abs=1e-6)
    # the run as a records folder: the shipped script, the figures, the tokenizer it learnt
    submission = json.loads((repo / "data/submission/submission.json").read_text())
    assert (repo / "data/submission/train_gpt.py").read_bytes() == (repo / "data/script/train_gpt.py").read_bytes()
    assert submission["val_bpb"] == ev["val_bpb"] and submission["bytes_total"] == verify["artifact_bytes"]
    assert (repo / "data/submission/tokenizer.model").is_file() and (repo / "data/submission/README.md").is_file()
    assert json.loads((repo / "metrics/export.json").read_text())["exported"] is True
    assert (repo / "metrics/train/plots/metrics/train_loss.tsv").is_file()


def test_provenance_is_beside_the_metrics_which_hold_only_figures(repo):
    """`dvc metrics diff` and `dvc exp show` list every changed value of a metrics file: a
    commit, a hash or a name there is noise. Each stage's provenance (commit with a dirty
    flag, versions, input hashes, its non-numeric labels) is metrics/provenance/<name>.json."""
    names = {"tokenize": "tokenize.json", "ngrams": "ngrams.json", "train": "train/metrics.json",
             "script": "script.json", "quantize": "quantize.json", "verify": "verify.json", "eval": "eval.json",
             "export": "export.json"}

    def leaves(value):
        if isinstance(value, dict):
            for inner in value.values():
                yield from leaves(inner)
        else:
            yield value

    for stem, name in names.items():
        figures = json.loads((repo / "metrics" / name).read_text())
        assert all(isinstance(v, (bool, int, float)) for v in leaves(figures)), name
        provenance = json.loads((repo / "metrics" / "provenance" / f"{stem}.json").read_text())
        assert {"git_commit", "dirty", "python_version", "torch_version", "device", "data_sha256"} <= set(provenance)
        assert provenance["dirty"] in (True, False) and len(provenance["git_commit"]) == 40
    labels = {stem: json.loads((repo / "metrics/provenance" / f"{stem}.json").read_text()).get("labels", {})
              for stem in names}
    assert labels["eval"]["final_mode"] == "sliding" and labels["train"]["stopped_by"] == "iterations"
    assert labels["tokenize"]["corpus_sha256"] and labels["quantize"]["compressor_per_group"]
    verify = json.loads((repo / "metrics/provenance/verify.json").read_text())
    assert verify["broken_rules"] == []
    bundled = json.loads((repo / "metrics/provenance/script.json").read_text())["bundled_modules"]
    assert "pgolf_core.model" in bundled and "pgolf_core.train" in bundled and "pgolf_core.hub" not in bundled


def test_second_repro_reruns_nothing(repo):
    assert ran_stages(dvc(repo, "repro").stdout) == set()


def copy_of(repo, tmp_path) -> Path:
    """A copy of the module's repo (git, DVC cache and outputs) for a change the later
    tests must not see, so that nothing has to be rerun to undo it."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    return copy


def test_gptq_reruns_quantize_and_after_and_never_retrains(repo, tmp_path):
    repo = copy_of(repo, tmp_path)
    set_params(repo, "quantize", method="gptq", clip="sdclip")
    assert ran_stages(dvc(repo, "repro").stdout) == {"script", "quantize", "verify", "evaluate", "export"}
    quant = json.loads((repo / "metrics/provenance/quantize.json").read_text())["labels"]
    verify = json.loads((repo / "metrics/verify.json").read_text())
    assert quant["method"] == "gptq" and verify["roundtrip_exact"]
    assert json.loads((repo / "metrics/provenance/verify.json").read_text())["broken_rules"] == []


def test_gptq_without_hessians_is_refused_naming_the_key(repo, tmp_path):
    from pgolf_core import calibration

    calibration.save_hessians(tmp_path / "none.safetensors", calibration.Calibration({}, {}, {}, {}, 0, 0.0))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["quantize"].update(method="gptq")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(repo, sys.executable, "-m", "stages.quantize", "--params", str(tmp_path / "params.yaml"),
              "--model", "data/train/model.safetensors", "--hessians", str(tmp_path / "none.safetensors"),
              "--out", str(tmp_path / "artifact"), "--reference", str(tmp_path / "ref.safetensors"),
              "--script", "data/script/train_gpt.py", "--metrics", str(tmp_path / "q.json"), check=False)
    assert out.returncode != 0 and "train.calib_batches > 0" in out.stderr
    assert not (tmp_path / "artifact").exists() and not (tmp_path / "q.json").exists()


def test_evaluate_change_reruns_the_shipped_script_and_what_reads_it(repo):
    """The evaluate section is baked into train_gpt.py: its bytes (the artifact's code
    bytes, quantize.fit_bytes's budget) change with it. Never the training."""
    set_params(repo, "evaluate", stride=16)
    assert ran_stages(dvc(repo, "repro").stdout) == {"script", "quantize", "verify", "evaluate", "export"}


def test_exp_run_override_takes_effect_and_metrics_diff_shows_it(repo):
    """A train change reruns train and everything after it (the train section is baked
    into the script too), never tokenize or ngrams."""
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    ran = ran_stages(dvc(repo, "exp", "run", "-S", "train.schedule.iterations=6").stdout)
    assert ran == {"train", "script", "quantize", "verify", "evaluate", "export"}
    assert json.loads((repo / "metrics/train/metrics.json").read_text())["steps"] == 6
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["schedule"]["iterations"] == 6
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    assert diff["metrics/train/metrics.json"]["steps"] == {"old": 4, "new": 6, "diff": 2}
    assert "val_bpb" in diff["metrics/eval.json"]


def test_unknown_params_key_fails_the_stage_and_names_it(repo):
    set_params(repo, "evaluate", strid=8)
    out = dvc(repo, "repro", check=False)
    assert out.returncode != 0 and "unknown params key evaluate.strid (did you mean 'stride'?)" in out.stderr + out.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["evaluate"]["strid"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "checkout")  # the failed stage (script, which bakes evaluate) lost its output: back from the cache


def _verify(repo, artifact_dir, reference="data/quant/reference.safetensors", params="params.yaml",
            train_metrics="metrics/train/metrics.json"):
    return run(repo, sys.executable, "-m", "stages.verify", "--params", params, "--artifact", str(artifact_dir),
               "--reference", reference, "--model", "data/train/model.safetensors", "--shards", "data/shards",
               "--tokenizer", "data/tokenizer", "--train-metrics", train_metrics, "--script", "data/script/train_gpt.py",
               "--metrics", str(artifact_dir / "verify.json"), check=False)


def test_verify_rejects_a_tampered_artifact(repo, tmp_path):
    tampered = tmp_path / "artifact"
    shutil.copytree(repo / "data/artifact", tampered)
    blob = bytearray((tampered / "model.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tampered / "model.bin").write_bytes(bytes(blob))
    out = _verify(repo, tampered)
    assert out.returncode != 0 and "verify FAILED" in out.stderr and "sha256" in out.stderr
    assert not (tampered / "verify.json").exists()


def test_verify_rejects_an_artifact_that_disagrees_with_the_reference(repo, tmp_path):
    from pgolf_core import artifact

    qm = artifact.read_reference(repo / "data/quant/reference.safetensors")
    name, tensor = next((n, t) for n, t in qm.tensors.items() if t.kind == "int8")
    tensor.q[0, 0] = -tensor.q[0, 0] if tensor.q[0, 0] else 1
    artifact.write_reference(tmp_path / "ref.safetensors", qm)
    out = _verify(repo, repo / "data/artifact", reference=str(tmp_path / "ref.safetensors"))
    assert out.returncode != 0 and "differs from the quantizer's reference in 1 tensors" in out.stderr
    assert name in out.stderr


def test_verify_rejects_an_oversized_artifact_and_a_challenge_run_over_the_time_budget(repo, tmp_path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["verify"].update(max_artifact_bytes=1000)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    train = json.loads((repo / "metrics/train/metrics.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({**train, "train_seconds": 700.0, "challenge_run": True}))
    artifact_dir = tmp_path / "artifact"
    shutil.copytree(repo / "data/artifact", artifact_dir)
    out = _verify(repo, artifact_dir, params=str(tmp_path / "params.yaml"), train_metrics=str(tmp_path / "train.json"))
    assert out.returncode != 0 and "> 1,000" in out.stderr and "a challenge run whose train + calibration took" in out.stderr
    written = json.loads((artifact_dir / "verify.json").read_text())
    assert written["fits_16mb"] is True  # the challenge's cap; the lowered one is the broken rule
    assert len(json.loads((artifact_dir / "provenance" / "verify.json").read_text())["broken_rules"]) == 2


def test_evaluate_refuses_a_tokenizer_of_another_vocab(repo, tmp_path, tiny_tokenizer_dir):
    out = run(repo, sys.executable, "-m", "stages.evaluate", "--params", "params.yaml", "--artifact", "data/artifact",
              "--shards", "data/shards", "--tokenizer", str(tiny_tokenizer_dir), "--metrics", str(tmp_path / "e.json"),
              check=False)
    assert out.returncode != 0 and "model vocab 480 != tokenizer vocab 512" in out.stderr
    assert not (tmp_path / "e.json").exists()
