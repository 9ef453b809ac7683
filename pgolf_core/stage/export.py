"""Stage `export`: the run as a submission folder laid out like the public records
(`submission_export.export_run`: `train_gpt.py` as the script stage shipped it, README,
submission.json, requirements.txt, the train stage's log, the tokenizer it learnt), in
`data/submission`.

It fails, with every reason and nothing written, when the run breaks a challenge rule
(artifact over 16,000,000 bytes, a challenge run over 600 s of training + calibration, a
final mode that is not score-first or not the one fixed before evaluating, evaluation
projected over 600 s, validation documents among the training shards, a shipped script
whose own score of the artifact, in verify, is not evaluate's). For a real
submission, `python -m pgolf_core.submission_export ... --out
records/track_10min_16mb/<date>_<name>` writes the same folder where the records keep theirs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pgolf_core import io
from pgolf_core.stage.result import StageResult
from pgolf_core.submission_export import ExportRefused, export_run, run_metrics, stage_metrics

SECTIONS = ("tokenize", "train", "quantize", "verify", "evaluate", "script")  # what the folder describes and checks


@dataclasses.dataclass(frozen=True)
class ExportPaths:
    artifact: Path = dataclasses.field(metadata={"help": "artifact folder (model.bin)"})
    script: Path = dataclasses.field(metadata={"help": "the run's train_gpt.py (stage script)"})
    train_metrics: Path = dataclasses.field(metadata={"help": "the train stage's metrics.json"})
    train_log: Path = dataclasses.field(metadata={"help": "the train stage's log (the folder's train.log)"})
    eval_metrics: Path = dataclasses.field(metadata={"help": "the evaluate stage's metrics file"})
    verify_metrics: Path = dataclasses.field(metadata={
        "help": "the verify stage's metrics file: the shipped script's own score must be evaluate's"})
    shards: Path
    tokenizer: Path
    out: Path = dataclasses.field(metadata={"help": "the submission folder"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: dict, paths: ExportPaths) -> StageResult:
    """Write the folder; its figures, or the rules the run breaks."""
    train_metrics, eval_metrics, train_prov = run_metrics(paths.train_metrics, paths.eval_metrics)
    verify_metrics = stage_metrics(paths.verify_metrics, "verify metrics")
    try:
        result = export_run(cfg, paths.artifact, train_metrics, eval_metrics, paths.shards, paths.tokenizer,
                            paths.out, train_log=paths.train_log, name="pgolf_" + paths.out.name,
                            shipped=paths.script, verify_metrics=verify_metrics,
                            hardware=train_prov.get("device"), torch_version=train_prov.get("torch_version"),
                            git_commit=io.git_state()["git_commit"])
    except ExportRefused as refused:
        return StageResult({"exported": False}, broken_rules=refused.reasons,
                           provenance={"broken_rules": refused.reasons})
    metrics = {"exported": True, "val_bpb": result["val_bpb"], "bytes_total": result["bytes_total"],
               "bytes_code": result["bytes_code"], "bytes_model": result["bytes_model"]}
    summary = [f"export: {paths.out}: val_bpb {result['val_bpb']:.6f}, {result['bytes_total']:,} bytes "
               f"({result['bytes_code']:,} script + {result['bytes_model']:,} model)"]
    return StageResult(metrics, {"artifact": io.sha256_tree(paths.artifact)}, summary=summary)
