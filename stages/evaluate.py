"""Stage `evaluate`: exact val_bpb of the artifact's model in every configured mode.

`val_bpb` is the mode named by `evaluate.final_mode`, fixed before any mode runs:
picking the best mode afterwards would be selection on the validation set.
"""

import argparse
import time
from pathlib import Path

from pgolf_core import artifact, config, data, dist, io, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.eval.sliding import val_bpb

STRIDES = {"nonoverlap": lambda cfg: cfg.seq_len, "sliding": lambda cfg: cfg.stride}


def evaluate(cfg: config.EvaluateConfig, model, val_tokens, val_bytes, device) -> dict:
    if cfg.truncate_to_seq_len:
        end = (len(val_tokens) - 1) // cfg.seq_len * cfg.seq_len + 1
        val_tokens, val_bytes = val_tokens[:end], val_bytes[:end]
    autocast = dist.autocast_dtype(device)
    metrics = {}
    for mode in cfg.modes:
        start = time.perf_counter()
        metrics[f"val_bpb_{mode}"], total = val_bpb(
            model, val_tokens, val_bytes, window=cfg.seq_len, stride=STRIDES[mode](cfg), batch_seqs=cfg.batch_seqs,
            device=device, autocast_dtype=autocast, progress=dist.is_main())
        metrics[f"eval_seconds_{mode}"] = time.perf_counter() - start
        metrics["tokens_scored"] = total.num_targets
        print(f"evaluate: {mode} val_bpb {metrics[f'val_bpb_{mode}']:.4f} over {total.num_targets:,} "
              f"targets / {total.num_bytes:,} bytes in {metrics[f'eval_seconds_{mode}']:.1f} s")
    metrics["eval_seconds"] = sum(v for k, v in metrics.items() if k.startswith("eval_seconds_"))
    return {"val_bpb": metrics[f"val_bpb_{cfg.final_mode}"], "final_mode": cfg.final_mode, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("params", "artifact", "shards", "tokenizer", "metrics"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    cfg = config.load_section(args.params, "evaluate")
    device = dist.select_device("auto")
    dist.init(device.type)
    sp = tokenizer.load_tokenizer(args.tokenizer)
    model = artifact.load_model(args.artifact / "model.bin").to(device)
    if model.cfg.vocab_size != sp.vocab_size():
        raise ValueError(f"model vocab {model.cfg.vocab_size} != tokenizer vocab {sp.vocab_size()} ({args.tokenizer})")
    val_tokens = data.load_split(args.shards, "val", sp.vocab_size())
    metrics = evaluate(cfg, model, val_tokens, val_byte_counts(sp, args.shards, val_tokens), device)
    if dist.is_main():
        inputs = {"artifact": io.sha256_tree(args.artifact), "shards": io.sha256_tree(args.shards)}
        io.write_stage_report(args.metrics, metrics, inputs)
    dist.shutdown()


if __name__ == "__main__":
    main()
