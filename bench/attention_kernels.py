"""Benchmark: causal GQA attention forward + backward at the record's shape, per kernel.

Times `pgolf_core.kernels.causal_attention` (the path training takes) and each PyTorch
SDPA backend forced on its own, with the KV heads grouped (`enable_gqa`) and expanded
to the query heads, and checks each against a float64 reference on a slice. Tells which
attention path the trainer should take on this GPU. FLOPs: 4 * B * H * T^2 * E / 2
forward (QK^T and AV, causal half), 2.5x that for forward + backward.

    python bench/attention_kernels.py            # B=48 H=8 K=4 T=2048 E=64 (record micro-batch)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import median_ms  # noqa: E402
from pgolf_core import kernels  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def reference(q, k, v):
    """Plain float64 causal attention with KV heads repeated to the query heads."""
    group = q.size(1) // k.size(1)
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q @ k.mT / q.size(-1) ** 0.5
    mask = torch.ones(q.size(2), q.size(2), dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def variants(num_heads: int, num_kv: int):
    group = num_heads // num_kv
    yield "pgolf_causal_attention", kernels.causal_attention
    for name, backend in BACKENDS.items():
        def gqa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def expanded(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                      is_causal=True)
        yield f"sdpa_{name}_gqa", gqa
        yield f"sdpa_{name}_expanded", expanded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    B, H, K, T, E = args.batch, args.heads, args.kv_heads, args.seq_len, args.head_dim
    torch.manual_seed(0)
    make = lambda heads: torch.randn(B, heads, T, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = make(H), make(K), make(K)
    grad = torch.randn(B, H, T, E, device="cuda", dtype=torch.bfloat16)
    expected = reference(q[:2, :, :512], k[:2, :, :512], v[:2, :, :512])
    flops = 2.5 * 4 * B * H * T * T * E / 2
    rows = {}
    for name, fn in variants(H, K):
        try:
            out = fn(q[:2, :, :512], k[:2, :, :512], v[:2, :, :512])
            error = ((out.double() - expected).norm() / expected.norm()).item()

            def step(fn=fn):
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(grad)
            for _ in range(3):
                step()
            ms = median_ms(step, args.repeats)
            rows[name] = {"ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "rel_error": float(f"{error:.2e}")}
        except RuntimeError as e:  # a backend that refuses this shape or GPU says so
            rows[name] = {"error": str(e).splitlines()[0][:160]}
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shape": {"B": B, "H": H, "K": K, "T": T, "E": E}, "torch": torch.__version__,
              "pgolf_path": kernels.attention_path(torch.device("cuda")), "variants": rows}
    print(json.dumps(result))
    for name, row in rows.items():
        print(f"{name:32s} {row}")
    out = ROOT / "bench" / "results" / "attention_kernels.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
