"""The quantize stage's steps in order, shared by the stage and bench/quantize.py.

Magnitude pruning comes before the integers are chosen (it changes what they round);
the search over SDClip's k next (it compares the integers the run would pick, and under
a byte target packs them as they would ship);
LQER after them (it corrects their error against the *unpruned* weights, so it can win
back part of pruning's damage too); pruning to a byte target last, at packing, because
only the packed bytes say how much is enough (`fit.pack_to_fit`).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from pgolf_core.artifact import pack_artifact
from pgolf_core.config import QuantizeConfig
from pgolf_core.quant import QuantizedModel
from pgolf_core.quant.gptq import quantize_gptq
from pgolf_core.quant.lqer import add_lqer
from pgolf_core.quant.prune import prune_state
from pgolf_core.quant.rtn import quantize_rtn
from pgolf_core.quant.sdclip_search import ByteTarget, search_sdclip_k


def quantize_model(state: dict[str, torch.Tensor], cfg: QuantizeConfig, hessians: dict | None = None,
                   device: torch.device | str = "cpu", progress=None, *, model_config: dict | None = None,
                   code_bytes: int = 0, pack_cache: dict | None = None) -> tuple[QuantizedModel, dict]:
    """(quantized model, report) of a float state dict under `cfg`: prune_fraction, then,
    when `cfg.sdclip_search` lists candidates, the k per category they choose
    (`sdclip_search`; under `cfg.sdclip_search_bytes` it packs with `model_config` and
    counts `code_bytes`, keeping its compressed groups in `pack_cache` for the caller's
    final pack), then `cfg.method` (GPTQ needs `hessians`; `progress(name)` per GPTQ
    matrix quantized), then LQER when lqer_rank > 0. The report has "lqer": per corrected
    matrix its error before and after; "sdclip_k": the k per category used (searched or
    set) when the clip is SDClip; "sdclip_search": the search's report.
    Under GPTQ the pruned entries are held at 0 while their error is compensated, so
    `prune_fraction` means the same zeros for both methods."""
    if cfg.uses_hessians and not hessians:
        needs = "quantize.method 'gptq'" if cfg.method == "gptq" else "quantize.sdclip_search"
        raise ValueError(f"{needs} needs the calibration Hessians and none were given: set train.calib_batches > 0 "
                         "(and rerun train)" + (", or quantize.method: rtn" if cfg.method == "gptq" else ""))
    if cfg.sdclip_search_bytes and model_config is None:
        raise ValueError("quantize.sdclip_search_bytes packs candidate artifacts, which needs the model's config")
    pruned = prune_state(state, cfg.prune_fraction, cfg.passthrough_max_numel) if cfg.prune_fraction else state
    # the pruned entries stay 0 through GPTQ's error propagation (it compensates them instead)
    fixed_zero = {name: pruned[name] == 0 for name in state if pruned[name] is not state[name]}
    last: dict = {}  # the byte search ends by quantizing its choice: the run reuses those integers

    def integers(c: QuantizeConfig) -> QuantizedModel:
        key = tuple(asdict(c.sdclip_k).values())
        if key not in last:
            last.clear()
            last[key] = quantize_gptq(pruned, hessians, c, device, progress=progress, fixed_zero=fixed_zero) \
                if c.method == "gptq" else quantize_rtn(pruned, c)
        return last[key]

    def shipped(qm: QuantizedModel) -> tuple[QuantizedModel, list]:  # what the artifact holds: + LQER
        return add_lqer(qm, state, cfg.lqer_rank, cfg.lqer_top_k) if cfg.lqer_rank else (qm, [])

    report: dict = {"lqer": []}
    if cfg.sdclip_search:
        target = ByteTarget(cfg.sdclip_search_bytes, code_bytes, lambda qm: pack_artifact(
            shipped(qm)[0], model_config, cfg.compressors, cfg.layouts, chunk_bytes=cfg.chunk_bytes,
            cache=pack_cache)[1]) if cfg.sdclip_search_bytes else None
        chosen, report["sdclip_search"] = search_sdclip_k(state, hessians, cfg, integers, target)
        cfg = replace(cfg, sdclip_k=chosen)
    if cfg.clip == "sdclip":
        report["sdclip_k"] = asdict(cfg.sdclip_k)
    qm, report["lqer"] = shipped(integers(cfg))
    return qm, report
