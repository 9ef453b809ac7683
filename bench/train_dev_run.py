"""A short real training run of a profile's model on the dev corpus (one GPU, minutes).

Tokenizes `data/dev_corpus/docs.jsonl` (../shared/data/build_dev_corpus.py; its first 250
documents are validation) with a fresh tokenizer of the profile's vocabulary, then trains
with `pgolf_core.train.train` at a small batch for about one epoch (the corpus is ~10 M
tokens at vocab 8192, so the record's 786,432-token batch would see it all in ~13 steps),
logging val_bpb as it goes. Reports the curve, the step at which the recurrence switched
on, and how many graphs torch.compile built after the timed run began (0 = no recompile).
`val_bpb_prequant` scores the EMA's weights, which start from the initialisation: at a
decay of 0.9965, 75 steps leave 0.9965^75 = 77 % of their weight there, so compare runs by
`last_eval_before_ema`, the curve's last val_bpb of the trained weights.
Writes bench/results/train_dev_run.json (GPU runs).

    python -m bench.train_dev_run --profile profiles/record_8xh100.yaml --batch-tokens 131072 --steps 75
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


from bench.header import RESULTS, header
from pgolf_core import config, corpus, data, dist, export, tokenizer
from pgolf_core.bpb import val_byte_counts
from pgolf_core.dispatch import resolve_kernels
from pgolf_core.model import GPT
from pgolf_core.train import set_seed, train


def prepare(work: Path, corpus_path: Path, vocab_size: int) -> tuple[Path, Path]:
    """Tokenizer (learnt on the train documents) and shards under `work`, built once."""
    shards, tok_dir = work / f"shards_{vocab_size}", work / f"tokenizer_{vocab_size}"
    if not (tok_dir / tokenizer.MODEL_FILE).is_file():
        docs = list(corpus.iter_documents("jsonl", corpus_path))
        model = tokenizer.train_tokenizer(docs[250:], vocab_size, num_threads=os.cpu_count() or 1)
        export.export_shards(iter(docs), model, shards, val_documents=250, shard_tokens=10_000_000,
                             num_workers=min(8, os.cpu_count() or 1))
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / tokenizer.MODEL_FILE).write_bytes(model)
    return shards, tok_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--corpus", default="data/dev_corpus/docs.jsonl")
    parser.add_argument("--workdir", default=None, help="keeps tokenizer and shards between runs")
    parser.add_argument("--batch-tokens", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--micro-batch-seqs", type=int, default=32,
                        help="sequences per forward; dividing the batch's 64 keeps one compiled shape")
    parser.add_argument("--val-every", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train key of the profile (A/B runs), e.g. --set model.doc_mask=true")
    parser.add_argument("--out", default=str(RESULTS / "train_dev_run.json"),
                        help="where a GPU run writes its JSON")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only build tokenizer and shards in --workdir (CPU; carry them to the GPU)")
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    tok_cfg = config.build_section("tokenize", overrides.get("tokenize", {}))
    run_settings = {"batch_tokens": args.batch_tokens, "micro_batch_seqs": args.micro_batch_seqs,
                    "schedule": {"mode": "steps", "iterations": args.steps, "max_wallclock_seconds": 0.0,
                                 "calib_reserve_seconds": 0.0},
                    "runtime": {"val_every": args.val_every, "val_tokens": 0, "log_every": 1, "device": args.device}}
    cfg = config.build_section("train", config.merge_nested(config.merge_nested(overrides.get("train", {}), run_settings),
                                                            config.parse_assignments(args.set)))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pgolf-dev-run-"))
    shards, tok_dir = prepare(work, Path(args.corpus), tok_cfg.vocab_size)
    if args.prepare_only:
        return
    sp = tokenizer.load_tokenizer(tok_dir)
    device = dist.select_device(cfg.runtime.device)
    set_seed(cfg.seed)
    kernels = resolve_kernels(device, cfg.runtime)
    model = GPT(cfg.model.with_vocab(sp.vocab_size()), kernels).to(device)
    stream = data.TokenStream(data.list_shards(shards, "train"), sp.vocab_size())
    val = data.load_split(shards, "val", sp.vocab_size())
    curve, switch_step = [], None

    def log(step: int, values: dict) -> None:
        nonlocal switch_step
        if values.get("looping") and switch_step is None:
            switch_step = step - 1  # 0-based index of the first step that ran looped
        if "val_bpb" in values or "train_loss" in values:
            curve.append({"step": step, **values})

    result = train(cfg, model, stream, val, val_byte_counts(sp, shards, val), device, log)
    record = {
        **header(device.type),
        "corpus": args.corpus, "train_tokens": stream.num_tokens, "val_tokens": int(len(val)),
        "steps": result.steps, "tokens_per_second": round(result.tokens_per_second),
        "val_bpb_prequant": result.val_bpb_prequant,  # the EMA's weights: on a short run, near the init
        "last_eval_before_ema": next(({"step": c["step"], "val_bpb": c["val_bpb"]}
                                      for c in reversed(curve) if "val_bpb" in c), None),
        **kernels.describe(device, doc_mask=cfg.model.doc_mask, compiled=cfg.runtime.compile,
                           cap=cfg.model.logit_softcap),
        "overrides": args.set,
        "loop_switch_step": switch_step, "loop_start_frac": cfg.schedule.loop_start_frac,
        "graphs_compiled_after_start": result.graphs_compiled_in_run,  # after the warm-up
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}))
    if device.type == "cuda":
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
