"""Stage `evaluate`: exact val_bpb of the artifact's model in every configured mode
(`pgolf_core.eval.run`), each timed from reading the artifact to its final sum.

`val_bpb` is the mode named by `evaluate.final_mode`, fixed before any mode runs:
picking the best mode afterwards would be selection on the validation set. The metrics
are written before the budget check, so a run that breaks the budget still shows why.
"""

import argparse
from pathlib import Path

from pgolf_core import artifact, config, data, dist, io, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval import budget
from pgolf_core.eval.run import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("params", "artifact", "shards", "tokenizer", "metrics"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    cfg = config.load_section(args.params, "evaluate")
    device = dist.select_device("auto")
    dist.init(device.type)
    sp = tokenizer.load_tokenizer(args.tokenizer)

    def load_model():
        model = artifact.load_model(args.artifact / "model.bin").to(device)
        if model.cfg.vocab_size != sp.vocab_size():
            raise ValueError(f"model vocab {model.cfg.vocab_size} != tokenizer vocab {sp.vocab_size()} "
                             f"({args.tokenizer})")
        return model

    val_tokens = data.load_split(args.shards, "val", sp.vocab_size())
    metrics = evaluate(cfg, load_model, val_tokens, val_byte_counts(sp, args.shards, val_tokens), device,
                       progress=dist.is_main())
    if dist.is_main():
        # the validation shards only: hashing the whole folder would read every training shard
        val_files = sorted([*args.shards.glob(data.VAL_PATTERN), *args.shards.glob(data.VAL_BYTES_PATTERN)])
        inputs = {"artifact": io.sha256_tree(args.artifact), "val_shards": io.sha256_files(val_files)}
        io.write_stage_report(args.metrics, metrics, inputs)
    budget.check_budget(cfg.final_mode, metrics["projected_8xh100_seconds"], cfg.max_eval_seconds)
    dist.shutdown()


if __name__ == "__main__":
    main()
