"""The benchmark scripts' CPU smoke modes: a GPU session must not be the first to find a
script broken by a change elsewhere (their figures are measured on the GPU, not here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> dict:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["fused", "plain"])
def test_train_throughput_smoke_run_on_cpu(loss):
    result = run_script("bench/train_throughput.py", "--profile", "profiles/cpu.yaml", "--device", "cpu",
                        "--steps", "1", "--warmup", "1", "--no-compile", "--loss", loss)
    assert result["device"] == "cpu" and result["loss"] == loss and result["attention_path"] == "sdpa"
    assert result["tokens_per_second"] > 0 and result["flops_per_token"] > 0


@pytest.mark.slow
def test_train_dev_run_smoke_run_on_cpu(tmp_path, embedded_docs):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in embedded_docs[:1000]))
    result = run_script("bench/train_dev_run.py", "--profile", "profiles/cpu.yaml", "--corpus", str(corpus),
                        "--workdir", str(tmp_path / "work"), "--device", "cpu", "--batch-tokens", "8192",
                        "--micro-batch-seqs", "16", "--steps", "4", "--val-every", "2")
    assert result["steps"] == 4 and result["loop_switch_step"] is None  # the CPU profile has no recurrence
    assert result["val_tokens"] > 0 and 0 < result["val_bpb_prequant"] < 20
