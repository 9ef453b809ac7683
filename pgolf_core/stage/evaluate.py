"""Stage `evaluate`: exact val_bpb of the artifact's model in every configured mode
(`pgolf_core.eval.run`), each timed from reading the artifact to its final sum.

`val_bpb` is the mode named by `evaluate.final_mode`, fixed before any mode runs:
picking the best mode afterwards would be selection on the validation set. The metrics
are written before the budget check fails the stage, so a run that breaks the budget
still shows why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pgolf_core import artifact, data, dist, io
from pgolf_core.config import EvaluateConfig
from pgolf_core.eval import budget
from pgolf_core.eval.run import evaluate
from pgolf_core.stage.result import StageResult
from pgolf_core.stage.validation import check_model_vocab, load_validation


@dataclasses.dataclass(frozen=True)
class EvaluatePaths:
    artifact: Path = dataclasses.field(metadata={"help": "artifact folder (model.bin)"})
    shards: Path = dataclasses.field(metadata={"help": "shards folder; only its val shards are read"})
    tokenizer: Path
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: EvaluateConfig, paths: EvaluatePaths) -> StageResult:
    """Every mode's val_bpb and timings; the evaluation budget's breach, if any, as the
    broken rule. Runs in one process or under torchrun (rank 0 reports)."""
    device = dist.select_device("auto")
    dist.init(device.type)
    sp, val_tokens, val_bytes = load_validation(paths.tokenizer, paths.shards)

    def load_model():
        model = artifact.load_model(paths.artifact / "model.bin").to(device)
        check_model_vocab(model.cfg, sp, paths.tokenizer)
        return model

    metrics = evaluate(cfg, load_model, val_tokens, val_bytes, device, progress=dist.is_main())
    inputs = {}
    if dist.is_main():
        # the validation shards only: hashing the whole folder would read every training shard
        val_files = sorted([*paths.shards.glob(data.VAL_PATTERN), *paths.shards.glob(data.VAL_BYTES_PATTERN)])
        inputs = {"artifact": io.sha256_tree(paths.artifact), "val_shards": io.sha256_files(val_files)}
    try:
        budget.check_budget(cfg.final_mode, metrics["projected_8xh100_seconds"], cfg.max_eval_seconds)
        broken = []
    except RuntimeError as e:
        broken = [str(e)]
    report = dist.is_main()
    dist.shutdown()
    return StageResult(metrics, inputs, broken_rules=broken, write_report=report)
