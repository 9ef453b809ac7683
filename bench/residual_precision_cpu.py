"""Experiment (CPU): does a bf16 residual stream train as well as a float32 one?

Trains the CPU default model (params.yaml) on the pipeline's own shards under bf16
autocast, which the trainer uses only on GPUs, once with `low_precision_residual` off
and once on, per seed, and prints the pre-quantization val_bpb of each. A small-scale
signal for the switch the record profiles turn on; the GPU dev runs
(`gpu_session.sh dev devf32residual`) are the real check. Needs `dvc repro` to have
built data/shards and data/tokenizer. About 2 minutes per run on 2 cores.

    python bench/residual_precision_cpu.py --seeds 1337 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf_core import config, data, dist, tokenizer  # noqa: E402
from pgolf_core.bpb import val_byte_counts  # noqa: E402
from pgolf_core.model import GPT  # noqa: E402
from pgolf_core.train import model_config, set_seed, train  # noqa: E402


def run(base: dict, low_precision: bool, seed: int, shards: Path, tok_dir: Path) -> float:
    cfg = config.build_section("train", {**base, "low_precision_residual": low_precision, "seed": seed})
    sp = tokenizer.load_tokenizer(tok_dir)
    stream = data.TokenStream(data.list_shards(shards, "train"), sp.vocab_size())
    val = data.load_split(shards, "val", sp.vocab_size())
    set_seed(cfg.seed)
    model = GPT(model_config(cfg, sp.vocab_size()))
    result = train(cfg, model, stream, val, val_byte_counts(sp, shards, val), torch.device("cpu"))
    return result.val_bpb_prequant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "shards"))
    parser.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "residual_precision_cpu.json"))
    args = parser.parse_args()

    dist.autocast_dtype = lambda device: torch.bfloat16  # the GPU's autocast, here on the CPU
    base = config.load_params(args.params)["train"]
    runs = {flag: [run(base, flag, seed, Path(args.shards), Path(args.tokenizer)) for seed in args.seeds]
            for flag in (False, True)}
    deltas = [low - high for low, high in zip(runs[True], runs[False])]
    result = {
        "device": "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "autocast": "bfloat16",
        "seeds": args.seeds,
        "val_bpb_prequant_float32_stream": runs[False], "val_bpb_prequant_bf16_stream": runs[True],
        "bf16_minus_float32": deltas, "mean_delta": statistics.mean(deltas),
        "stdev_delta": statistics.stdev(deltas) if len(deltas) > 1 else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
