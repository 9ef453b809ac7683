"""CaseOps on/off through the default CPU pipeline, same corpus, same vocab, same steps.

For each corpus runs tokenize -> train -> quantize -> evaluate twice (case_transform
none / caseops) with params.yaml's values (the wall-clock cap lifted so both runs take
the same number of steps), and reports validation tokens per byte and val_bpb of both.
Prints one JSON line and writes bench/results/caseops_compare.json.

    python bench/caseops_compare.py --corpus embedded --corpus data/dev_corpus/docs.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(work: Path, params: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    d = lambda p: str(work / p)  # noqa: E731
    steps = [
        ["stages.tokenize", "--tokenizer", d("tok"), "--shards", d("shards"), "--downloads", d("dl"),
         "--metrics", d("tokenize.json")],
        ["stages.train", "--shards", d("shards"), "--tokenizer", d("tok"), "--out", d("model.safetensors"),
         "--metrics", d("train")],
        ["stages.quantize", "--model", d("model.safetensors"), "--out", d("artifact"), "--reference", d("ref.safetensors"),
         "--metrics", d("quantize.json")],
        ["stages.evaluate", "--artifact", d("artifact"), "--shards", d("shards"), "--tokenizer", d("tok"),
         "--metrics", d("eval.json")],
    ]
    for module, *args in steps:
        subprocess.run([sys.executable, "-m", module, "--params", d("params.yaml"), *args], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    tok = json.loads((work / "tokenize.json").read_text())
    ev = json.loads((work / "eval.json").read_text())
    train = json.loads((work / "train" / "metrics.json").read_text())
    return {"val_tokens_per_byte": tok["val"]["tokens"] / tok["val"]["bytes"],
            "train_tokens_per_byte": tok["train"]["tokens"] / tok["train"]["bytes"],
            "val_bpb": ev["val_bpb"], "val_bpb_nonoverlap": ev["val_bpb_nonoverlap"],
            "val_bpb_prequant": train["val_bpb_prequant"], "steps": train["steps"], "val_bytes": tok["val"]["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", required=True, help="'embedded' or a JSONL path")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["train"]["max_wallclock_seconds"] = 0.0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pgolf-caseops-"))
    results = {}
    for corpus in args.corpus:
        runs = {}
        for transform in ("none", "caseops"):
            params = json.loads(json.dumps(base))
            params["tokenize"]["case_transform"] = transform
            if corpus != "embedded":
                params["tokenize"].update(source="jsonl", jsonl_path=str(Path(corpus).resolve()))
            runs[transform] = run_pipeline(work / Path(corpus).stem / transform, params)
            print(corpus, transform, runs[transform], file=sys.stderr)
        runs["delta_val_bpb"] = runs["caseops"]["val_bpb"] - runs["none"]["val_bpb"]
        runs["delta_val_tokens_per_byte"] = runs["caseops"]["val_tokens_per_byte"] - runs["none"]["val_tokens_per_byte"]
        results[corpus] = runs
    record = {
        "device": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": {k: base[k] for k in ("tokenize", "train")},
        "results": results,
    }
    print(json.dumps(record))
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "caseops_compare.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
