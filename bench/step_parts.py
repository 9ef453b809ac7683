"""Benchmark: the output head + loss of one record micro-batch, three ways.

Compiles forward + backward of rms_norm -> tied head (bf16) -> soft cap -> per-token
NLL at B=48, T=2048, D=512, V=8192 with `loss.softcap_nll` (plain: float32 capped logits,
then cross-entropy), `loss.fused_softcap_nll` (fused: Inductor's kernels from a one-pass
log-sum-exp) and `fused_ce.softcap_ce` (triton: the two Triton kernels of `train.fused_ce`),
checks each loss and its gradients against the plain ones, and prints ms per micro-batch.
Floor: the logits are 805 M values; a bf16 write by the head, one read by the loss
forward, a read and a bf16 gradient write by its backward, and the head's backward
matmuls reading that gradient: 8 GB, about 2.4 ms at 3.35 TB/s.

    python bench/step_parts.py
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import median_ms  # noqa: E402
from pgolf_core.fused_ce import softcap_ce  # noqa: E402
from pgolf_core.loss import fused_softcap_nll, softcap_nll  # noqa: E402

B, T, D, V, CAP = 48, 2048, 512, 8192, 30.0


def head_loss(loss_fn):
    def run(x, weight, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = F.linear(F.rms_norm(x, (D,)), weight)
        return loss_fn(logits, targets, CAP).mean()
    return torch.compile(run)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, V, (B, T), device="cuda")
    rows, grads = {}, {}
    variants = {"plain": softcap_nll, "fused": fused_softcap_nll, "triton": softcap_ce}
    for name, fn in ((name, head_loss(loss)) for name, loss in variants.items()):
        def step(fn=fn):
            x.grad = weight.grad = None
            loss = fn(x, weight, targets)
            loss.backward()
            return loss
        for _ in range(3):
            loss = step()
        grads[name] = (loss.detach(), x.grad.clone(), weight.grad.clone())
        torch.cuda.reset_peak_memory_stats()
        rows[name] = {"ms_fwd_bwd": round(median_ms(step), 3),
                      "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
    rel = lambda a, b: float(f"{((a.double() - b.double()).norm() / b.double().norm()).item():.2e}")  # noqa: E731
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]),
              "shape": {"B": B, "T": T, "D": D, "V": V}, "torch": torch.__version__, "variants": rows,
              "rel_error_vs_plain": {name: {"loss": rel(grads[name][0], grads["plain"][0]),
                                            "grad_x": rel(grads[name][1], grads["plain"][1]),
                                            "grad_weight": rel(grads[name][2], grads["plain"][2])}
                                     for name in variants if name != "plain"}}
    print(json.dumps(result))
    (ROOT / "bench" / "results" / "step_parts.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
