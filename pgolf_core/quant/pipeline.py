"""The quantize stage's steps in order, shared by the stage and bench/quantize.py.

Magnitude pruning comes before the integers are chosen (it changes what they round);
LQER after them (it corrects their error against the *unpruned* weights, so it can win
back part of pruning's damage too); pruning to a byte target last, at packing, because
only the packed bytes say how much is enough (`fit.pack_to_fit`).
"""

from __future__ import annotations

import torch

from pgolf_core.config import QuantizeConfig
from pgolf_core.quant import QuantizedModel
from pgolf_core.quant.gptq import quantize_gptq
from pgolf_core.quant.lqer import add_lqer
from pgolf_core.quant.prune import prune_state
from pgolf_core.quant.rtn import quantize_rtn


def quantize_model(state: dict[str, torch.Tensor], cfg: QuantizeConfig, hessians: dict | None = None,
                   device: torch.device | str = "cpu", progress=None) -> tuple[QuantizedModel, dict]:
    """(quantized model, report) of a float state dict under `cfg`: prune_fraction, then
    `cfg.method` (GPTQ needs `hessians`; `progress(name)` per GPTQ matrix), then LQER when
    lqer_rank > 0. The report has "lqer": per corrected matrix its error before and after.
    Under GPTQ the pruned entries are held at 0 while their error is compensated, so
    `prune_fraction` means the same zeros for both methods."""
    pruned = prune_state(state, cfg.prune_fraction, cfg.passthrough_max_numel) if cfg.prune_fraction else state
    if cfg.method == "gptq":
        if not hessians:
            raise ValueError("quantize.method 'gptq' needs Hessians and none were given: set train.calib_batches > 0 "
                             "(and rerun train), or quantize.method: rtn")
        # the pruned entries stay 0 through GPTQ's error propagation (it compensates them instead)
        fixed_zero = {name: pruned[name] == 0 for name in state if pruned[name] is not state[name]}
        qm = quantize_gptq(pruned, hessians, cfg, device, progress=progress, fixed_zero=fixed_zero)
    else:
        qm = quantize_rtn(pruned, cfg)
    report: dict = {"lqer": []}
    if cfg.lqer_rank:
        qm, report["lqer"] = add_lqer(qm, state, cfg.lqer_rank, cfg.lqer_top_k)
    return qm, report
