"""The exported train_gpt.py against the pipeline's own functions, same settings (issue 22).

Builds the profile's script (`submission_export.build_script`) with a fixed-step schedule
and the sliding final mode baked in, runs it alone (`bundle.run_isolated`: `python -I`,
an empty folder, no pgolf_core) on the dev corpus, then runs the same entry in this process
with the installed pgolf_core (`submission.run`: train, calibrate, quantize, pack, score,
the pipeline's functions). Prints and writes one JSON line with DESIGN.md's keys: both
val_bpb (`val_bpb_exported`, the script's; `val_bpb_pipeline`), their difference (exported
minus pipeline), `code_bytes` (the script as shipped), the artifact's and model's bytes,
and each run's seconds. Each side's folder (script, artifact, summary) is left in the
workdir as `run_script/` and `run_pipeline/`, replaced by the next run.

    python -m bench.export --profile profiles/record_8xh100.yaml --workdir data/dev_run --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.header import RESULTS, header
from bench.train_dev_run import prepare
from pgolf_core import bundle, config, submission, submission_export, tokenizer


def fixed_step_params(profile: str, steps: int, batch_tokens: int, micro_batch_seqs: int, assignments: list[str]) -> dict:
    """Every section of `profile` with a step schedule of `steps` (no wall clock), no
    periodic validation, and the sliding window as the only (final) mode: a run short
    enough for one device call, the same for both sides."""
    overrides = config.read_profile(profile)
    run = {"train": {"batch_tokens": batch_tokens, "micro_batch_seqs": micro_batch_seqs,
                     "schedule": {"mode": "steps", "iterations": steps, "max_wallclock_seconds": 0.0,
                                  "calib_reserve_seconds": 0.0},
                     "runtime": {"val_every": 0, "snapshot_every": 0}},
           "evaluate": {"modes": ["sliding"], "final_mode": "sliding", "max_eval_seconds": 0.0}}
    merged = config.merge_nested(config.merge_nested(overrides, run), config.parse_assignments(assignments))
    return {name: config.build_section(name, merged.get(name) or {}) for name in config.SECTIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--corpus", default="data/dev_corpus/docs.jsonl")
    parser.add_argument("--workdir", default=None,
                        help="keeps tokenizer and shards between runs, and each side's last run (run_script/, run_pipeline/)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=131072)
    parser.add_argument("--micro-batch-seqs", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params key of the profile, e.g. --set train.runtime.device=cpu")
    parser.add_argument("--out", default=str(RESULTS / "export.json"))
    args = parser.parse_args()

    params = fixed_step_params(args.profile, args.steps, args.batch_tokens, args.micro_batch_seqs, args.set)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pgolf-export-"))
    shards, tok_dir = prepare(work, Path(args.corpus), params["tokenize"].vocab_size)
    shipped = submission_export.build_script(params)
    runs = {}
    for side in ("script", "pipeline"):
        folder = work / f"run_{side}"  # emptied per run: each side starts in an empty folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        env = {**submission.settings_free(os.environ), "DATA_PATH": str(shards.resolve()),
               "TOKENIZER_PATH": str((tok_dir / tokenizer.MODEL_FILE).resolve()), "OUT_DIR": str(folder)}
        script = folder / submission_export.SCRIPT_NAME
        script.write_bytes(shipped.data)
        start = time.perf_counter()
        if side == "script":  # alone: no repository, no pgolf_core
            done = bundle.run_isolated(script, env=env, cwd=folder)
            if done.returncode != 0:
                raise SystemExit(f"export bench: the script failed alone:\n{done.stderr[-3000:]}")
            summary = json.loads((folder / submission.SUMMARY_NAME).read_text())
        else:  # the same entry, the installed pgolf_core's functions, this process
            summary = submission.run(submission_export.baked_params(params), env, script_path=script)
        runs[side] = {"seconds": time.perf_counter() - start, **summary}
        print(f"export bench: {side}: val_bpb {summary['val_bpb']:.6f} in {runs[side]['seconds']:.0f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() and params["train"].runtime.device != "cpu" else "cpu"
    record = {
        **header(device), "profile": args.profile, "corpus": args.corpus, "steps": args.steps,
        "batch_tokens": args.batch_tokens, "overrides": args.set,
        "val_bpb_exported": runs["script"]["val_bpb"], "val_bpb_pipeline": runs["pipeline"]["val_bpb"],
        "val_bpb_difference": runs["script"]["val_bpb"] - runs["pipeline"]["val_bpb"],
        "code_bytes": shipped.bytes, "script_form": shipped.form, "script_sizes": shipped.sizes,
        "artifact_bytes": runs["script"]["artifact_bytes"], "model_bytes": runs["script"]["model_bytes"],
        "seconds_script": runs["script"]["seconds"], "seconds_pipeline": runs["pipeline"]["seconds"],
    }
    print(json.dumps(record))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
