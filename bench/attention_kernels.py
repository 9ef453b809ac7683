"""Benchmark: causal GQA attention forward + backward at the record's shape, per kernel.

Times each PyTorch SDPA backend forced on its own, with the KV heads grouped
(`enable_gqa`) and expanded to the query heads, and compiled FlexAttention with a causal
and a document block mask (Triton kernels, and FA4's when flash_attn.cute is installed),
and SDPA with the dense document mask. Each is checked against a float64 reference with
its own mask on a slice. Documents: BOS tokens at rate 1/`--doc-len`. Tells which
attention path the trainer should take on this GPU. FLOPs (all variants, so the figure
compares times): 4 * B * H * T^2 * E / 2 forward (QK^T and AV, causal half), 2.5x that
for forward + backward.

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

BOS = 1
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def reference(q, k, v, allowed):
    """Plain float64 attention with KV heads repeated to the query heads; `allowed`
    (B, 1, T, T) says which keys each query sees."""
    group = q.size(1) // k.size(1)
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q @ k.mT / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def masks(idx: torch.Tensor) -> dict:
    """Dense (B, 1, T, T) masks and FlexAttention block masks of token ids (B, T), built
    by the trainer's own `kernels` helpers."""
    B, T = idx.shape
    docs = torch.cumsum(idx == BOS, dim=1)
    return {
        "causal": kernels.dense_document_mask(torch.zeros_like(docs)),  # one document: plain causal
        "documents": kernels.dense_document_mask(docs),
        "causal_block": kernels.block_mask(None, T, idx.device),
        "documents_block": kernels.block_mask(docs, T, idx.device),
    }


def variants(num_heads: int, num_kv: int):
    """(name, which mask it honours, fn(q, k, v, masks))."""
    from torch.nn.attention.flex_attention import flex_attention

    group = num_heads // num_kv
    for name, backend in BACKENDS.items():
        def gqa(q, k, v, m, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def expanded(q, k, v, m, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                      is_causal=True)
        yield f"sdpa_{name}_gqa", "causal", gqa
        yield f"sdpa_{name}_expanded", "causal", expanded
    yield "sdpa_documents_dense", "documents", \
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m["documents"], enable_gqa=True)
    flex = torch.compile(flex_attention, fullgraph=True)
    for backend in ("TRITON", "FLASH") if kernels.HAS_FLASH_ATTN else ("TRITON",):
        for which in ("causal", "documents"):
            yield f"flex_{which}_{backend.lower()}", which, lambda q, k, v, m, which=which, backend=backend: flex(
                q, k, v, block_mask=m[f"{which}_block"], enable_gqa=True, kernel_options={"BACKEND": backend})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--doc-len", type=int, default=1000, help="mean document length of the document masks")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-only", action="store_true", help="only the correctness checks (CPU smoke test)")
    args = parser.parse_args()
    B, H, K, T, E = args.batch, args.heads, args.kv_heads, args.seq_len, args.head_dim
    device = torch.device(args.device)
    torch.manual_seed(0)
    make = lambda heads: torch.randn(B, heads, T, E, device=device, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = make(H), make(K), make(K)
    grad = torch.randn(B, H, T, E, device=device, dtype=torch.bfloat16)
    idx = torch.where(torch.rand(B, T, device=device) < 1 / args.doc_len, BOS, 0)
    full, part = masks(idx), masks(idx[:2, :512])
    sliced = lambda t: t[:2, :, :512].detach()  # noqa: E731
    flops = 2.5 * 4 * B * H * T * T * E / 2
    rows = {}
    for name, which, fn in variants(H, K):
        try:
            expected = reference(sliced(q), sliced(k), sliced(v), part[which])
            out = fn(sliced(q), sliced(k), sliced(v), part)
            error = ((out.double() - expected).norm() / expected.norm()).item()

            rows[name] = {"rel_error": float(f"{error:.2e}")}
            if args.check_only:
                continue

            def step(fn=fn):
                q.grad = k.grad = v.grad = None
                fn(q, k, v, full).backward(grad)
            for _ in range(3):
                step()
            ms = median_ms(step, args.repeats)
            rows[name].update(ms_fwd_bwd=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
        except Exception as e:  # noqa: BLE001 - a backend that refuses this shape or GPU says so
            rows[name] = {"error": str(e).splitlines()[0][:160]}
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]),
              "shape": {"B": B, "H": H, "K": K, "T": T, "E": E}, "torch": torch.__version__,
              "doc_len": args.doc_len, "flash_attn_installed": kernels.HAS_FLASH_ATTN,
              "pgolf_path": kernels.attention_path(torch.device("cuda")),
              "pgolf_path_documents": kernels.attention_path(torch.device("cuda"), doc_mask=True), "variants": rows}
    for name, row in rows.items():
        print(f"{name:32s} {row}")
    print(json.dumps(result))  # last line: the result
    if not args.check_only:
        out = ROOT / "bench" / "results" / "attention_kernels.json"
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
