"""Benchmark: evaluation speed of each mode on this device, projected to 8xH100 for the
40,540,160-token FineWeb validation set (DESIGN.md: `tokens_per_second_<mode>`,
`projected_8xh100_seconds_<mode>`).

Each mode runs as `evaluate` runs it (`pgolf_core.eval.run`: a fresh model per mode,
compiled when the profile's `evaluate.compile` says so, the warm-up on random tokens,
then the scoring loop; `--set compile=false` for the eager figures) over the first
`--tokens` tokens of the validation stream: the val shards when `--shards` is given,
else synthetic documents of geometric length (mean `--doc-len`, FineWeb's about 811
tokens) with random tokens. The model is the artifact (`--artifact`), a trained float
checkpoint (`--model`), or the profile's architecture at initialisation (speed only:
TTT's arithmetic does not depend on the weights). `ttt_phased`'s boundaries are scaled
by the slice's share of the 50,000 validation documents, so its phases train the same
share of tokens. The projection is `pgolf_core.eval.budget`'s model (stated in the
JSON); the setup (model load, warm-up) is counted once, the loop scaled to the full set.
That scaling is linear in tokens, but the document LoRA modes' work per token grows with
document length (`lora_window_tokens`): the JSON's `mean_document_tokens` and
`lora_window_tokens_per_target` say how the slice compares with FineWeb's documents.
Their loop is also stretched by how evenly 8 ranks share it (`balance_8xh100` per mode),
modeled on FineWeb-sized documents (`fineweb_like_balance`), since the slice has too few
batches to show it.
The JSON is rewritten after every mode (`"complete": false` until the last), so a call
cut by its time limit keeps the modes it finished.

    python -m bench.eval_speed --profile profiles/record_8xh100.yaml --model data/train/model.safetensors \
        --shards data/shards --tokens 4000000
    python -m bench.eval_speed --profile profiles/cpu.yaml --device cpu --tokens 3000 \
        --set seq_len=64 stride=32 lora_rank=4 --out /tmp/eval_speed.json   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from bench.header import RESULTS, header
from pgolf_core import artifact, checkpoint, config, data, tokenizer
from pgolf_core.bpb import bits_per_byte, val_byte_counts
from pgolf_core.eval import budget
from pgolf_core.eval.lora import batch_plan, deal_balance, documents, queue_order
from pgolf_core.eval.run import timed_mode, truncated
from pgolf_core.model import GPT

FINEWEB_VAL_TOKENS = 40_540_160
FINEWEB_VAL_DOCUMENTS = 50_000


def synthetic_stream(num_tokens: int, vocab: int, bos: int, doc_len: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(bos + 1, vocab, num_tokens)
    tokens[rng.random(num_tokens) < 1.0 / doc_len] = bos
    tokens[0] = bos
    return tokens


def lora_window_tokens(docs: list[tuple[int, int]], chunk_tokens: int, seq_len: int) -> int:
    """Token positions the document LoRA loop forwards (and back-propagates) over `docs`:
    each chunk of `chunk_tokens` targets is scored in a window of its document that ends at
    the chunk's last target and holds at most `seq_len` tokens. Per target that grows with
    the document's length (about n / 2K for n targets up to seq_len, seq_len / K beyond),
    so a slice of longer documents than FineWeb's (mean about 811 tokens) costs more per
    token than FineWeb would, and its linear projection overstates `ttt_lora` and
    `ttt_phased`: the JSON carries this figure per target to read the projection by."""
    total = 0
    for start, end in docs:
        targets = end - start
        chunk_ends = np.minimum(np.arange(1, -(-targets // chunk_tokens) + 1) * chunk_tokens, targets)
        total += int(np.minimum(chunk_ends, seq_len).sum())
    return total


def fineweb_like_balance(cfg, phased: bool, seed: int = 0) -> float:
    """`deal_balance` on 8 ranks for FINEWEB_VAL_DOCUMENTS documents of geometric length
    with FineWeb's mean (its length distribution is not known here), in the profile's
    batches and, for `ttt_phased`, its phases: the document modes' balance for the
    projection to the full set. The timed slice cannot give it: its 117 documents are
    two batches, which on 8 ranks would read as 4x."""
    lengths = np.random.default_rng(seed).geometric(FINEWEB_VAL_DOCUMENTS / FINEWEB_VAL_TOKENS, FINEWEB_VAL_DOCUMENTS)
    ends = np.cumsum(lengths)
    _, costs, _, phase_after = batch_plan(queue_order(list(zip((ends - lengths).tolist(), ends.tolist()))), cfg, phased)
    return deal_balance(costs, budget.CHALLENGE_GPUS, phase_after)


def peak_mem_mib(device: torch.device) -> float:
    """The mode's peak: on CUDA the allocator's since the mode began (an 8xH100 run has
    80 GB per GPU, so a figure from a larger device says whether the mode fits there);
    on the CPU the process's resident peak so far (it never resets: read the first mode's)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/record_8xh100.yaml")
    parser.add_argument("--artifact", default=None, help="an artifact's model.bin")
    parser.add_argument("--model", default=None, help="a float checkpoint (data/train/model.safetensors)")
    parser.add_argument("--shards", default=None, help="read the val shards here instead of synthetic tokens")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="validation tokens timed per mode")
    parser.add_argument("--doc-len", type=float, default=811.0, help="synthetic documents' mean length")
    parser.add_argument("--modes", nargs="*", default=None,
                        help="timed in this order; default: the profile's evaluate.modes")
    parser.add_argument("--set", nargs="*", default=[], help="evaluate.KEY=VALUE overrides")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", default=None,
                        help="with --shards: count real bytes and report val_bpb_<mode> of the timed slice")
    parser.add_argument("--out", default=str(RESULTS / "eval_speed.json"))
    args = parser.parse_args()

    overrides = config.read_profile(args.profile)
    values = {**overrides.get("evaluate", {}), **config.parse_assignments(args.set)}
    if args.modes:  # the profile's final mode stays final when it is timed, else the first one listed
        final = config.build_section("evaluate", values).final_mode
        values.update(modes=args.modes, final_mode=final if final in args.modes else args.modes[0])
    cfg = config.build_section("evaluate", values)
    train_cfg = config.build_section("train", overrides.get("train", {}))
    vocab = config.build_section("tokenize", overrides.get("tokenize", {})).vocab_size
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def load() -> GPT:
        if args.artifact:
            return artifact.load_model(args.artifact).to(device)
        if args.model:
            state, model_cfg = checkpoint.read_model_file(args.model)
            return checkpoint.build_model(state, model_cfg).to(device)
        torch.manual_seed(0)
        return GPT(train_cfg.model.with_vocab(vocab)).to(device)

    probe = load()
    bos, vocab = probe.cfg.bos_id, probe.cfg.vocab_size
    num_params = sum(p.numel() for p in probe.parameters())
    del probe
    if args.shards:
        tokens = data.load_split(args.shards, "val", vocab)[: args.tokens].astype(np.int64)
    else:
        tokens = synthetic_stream(args.tokens, vocab, bos, args.doc_len)
    if args.shards and args.tokenizer:
        byte_counts = val_byte_counts(tokenizer.load_tokenizer(args.tokenizer), args.shards,
                                      data.load_split(args.shards, "val", vocab))[: len(tokens)]
    else:
        byte_counts = np.ones(len(tokens), dtype=np.int64)  # speed only: bytes do not change the work
        byte_counts[0] = 0
    tokens, byte_counts = truncated(cfg, tokens, byte_counts)
    docs = int((tokens == bos).sum())
    spans = documents(tokens, bos)
    window_tokens = lora_window_tokens(spans, cfg.lora_chunk_tokens, cfg.seq_len)
    share = docs / FINEWEB_VAL_DOCUMENTS
    scaled = sorted({max(1, round(b * share)) for b in cfg.phase_boundaries})
    balance = {mode: fineweb_like_balance(cfg, phased=mode == "ttt_phased") if mode in ("ttt_lora", "ttt_phased")
               else 1.0 for mode in cfg.modes}  # the profile's own boundaries: FineWeb's 50,000 documents
    cfg = dataclasses.replace(cfg, phase_boundaries=scaled)

    result = header(device.type)
    per_mode = {}

    def time_mode(mode: str) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = timed_mode(mode, cfg, load, tokens, byte_counts, device, autocast, progress=True)  # as `evaluate` times it
        peak = peak_mem_mib(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        totals = run.result.sums
        timing = dataclasses.replace(run.timing, balance=balance[mode])  # the slice is too short to show it
        result[f"tokens_per_second_{mode}"] = round(timing.tokens / timing.loop_seconds)
        result[f"projected_8xh100_seconds_{mode}"] = round(
            budget.project_8xh100(timing, cfg.sync_seconds, tokens=FINEWEB_VAL_TOKENS), 1)
        # setup = the artifact read (decompress, dequantize, build, to the device) + compile and warm-up
        per_mode[mode] = {"setup_seconds": round(timing.setup_seconds, 2), "load_seconds": round(run.load_seconds, 2),
                          "warmup_seconds": round(timing.setup_seconds - run.load_seconds, 2),
                          "warmup_seconds_by_call": {call: round(v, 2) for call, v in run.warmup_seconds_by_call.items()},
                          "loop_seconds": round(timing.loop_seconds, 2), "syncs": timing.syncs,
                          "nll_per_token": totals.nll_nats / totals.num_targets, "compiled": cfg.compile,
                          "graphs_compiled_in_loop": run.graphs_compiled_in_loop, "peak_mem_mib": peak,
                          "balance_8xh100": round(balance[mode], 4)}
        if args.shards and args.tokenizer:  # the quality of the timed slice (dev-corpus figures off FineWeb)
            result[f"val_bpb_{mode}"] = bits_per_byte(totals.nll_nats, totals.num_bytes)
        print(f"eval_speed: {mode} {result[f'tokens_per_second_{mode}']:,} tok/s, 8xH100 projection "
              f"{result[f'projected_8xh100_seconds_{mode}']} s, val_bpb {result.get(f'val_bpb_{mode}')}, "
              f"{per_mode[mode]}", file=sys.stderr, flush=True)

    def write(complete: bool) -> None:
        record = {**result, "complete": complete, "final_mode": cfg.final_mode}
        if f"projected_8xh100_seconds_{cfg.final_mode}" in result:
            record["final_mode_within_600s"] = result[f"projected_8xh100_seconds_{cfg.final_mode}"] <= 600.0
        record.update({
            "projection_model": budget.PROJECTION_MODEL, "projected_tokens": FINEWEB_VAL_TOKENS,
            "timed_tokens": int(len(tokens) - 1), "timed_documents": docs, "phase_boundaries_scaled": scaled,
            "mean_document_tokens": round((len(tokens) - 1) / len(spans), 1),
            "lora_window_tokens_per_target": round(window_tokens / (len(tokens) - 1), 3),
            "balance_model": ("document modes: lora.deal_balance on 8 ranks over 50,000 geometric documents of "
                              "FineWeb's mean length in the profile's batches and phases; window modes 1"),
            "per_mode": per_mode,
            "config": {"profile": args.profile, "model": args.artifact or args.model or "initialisation",
                       "tokens": "val shards" if args.shards else f"synthetic, mean document {args.doc_len}",
                       "num_params": num_params, "evaluate": config.to_dict(cfg), "torch": torch.__version__},
        })
        if complete:
            print(json.dumps(record))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    for mode in cfg.modes:
        time_mode(mode)
        write(complete=False)
    write(complete=True)


if __name__ == "__main__":
    main()
