"""Benchmark: the output head + loss of one record micro-batch, plain against fused.

Compiles forward + backward of rms_norm -> tied head (bf16) -> soft cap -> per-token
NLL at B=48, T=2048, D=512, V=8192 two ways: `loss.softcap_nll` (float32 capped logits,
then cross-entropy) and `loss.fused_softcap_nll` (gradient made in the forward pass),
checks the fused loss and gradients against the plain ones, and prints ms per
micro-batch. Floor: the logits are 805 M values; a bf16 write, then one read by the
loss, a bf16 gradient write and one read by the head's backward matmul is 6.4 GB.

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
    for name, fn in (("plain", head_loss(softcap_nll)), ("fused", head_loss(fused_softcap_nll))):
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
              "fused_vs_plain_rel_error": {"loss": rel(grads["fused"][0], grads["plain"][0]),
                                           "grad_x": rel(grads["fused"][1], grads["plain"][1]),
                                           "grad_weight": rel(grads["fused"][2], grads["plain"][2])}}
    print(json.dumps(result))
    (ROOT / "bench" / "results" / "step_parts.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
