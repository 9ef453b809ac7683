"""SDClip's k chosen per category by the calibration reconstruction error (issue 19).

The records fix k per category by hand (04-27: 13 / 11.5 / 14). #1394 ties a row's
compressed size to b − log2 k, so k trades bytes against rounding error, and at a given
width there is a k whose error is smallest: a small k clips more of each row's tail and
rounds the rest finely, a large k clips nothing and rounds coarsely. With
`quantize.sdclip_search` listing candidate values, each category takes the candidate
whose quantized matrices best reproduce their layers' outputs on the calibration inputs:
Σ tr(E H Eᵀ) over the category's matrices, E = W − Ŵ under the run's own method (RTN or
GPTQ, so GPTQ's error propagation is part of what is compared) and width, H the
calibration second moment. H comes from training tokens only, never from validation
tokens. A matrix without an H (a lookup table, whose inputs are one-hot) counts ‖E‖²_F.

Every matrix's integers depend on its own category's k alone, so one quantization of
the whole model per candidate, with that candidate as every category's k, gives every
category's error at that k.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Callable

import torch

from pgolf_core.config import CategoryClip, QuantizeConfig
from pgolf_core.quant import QuantizedModel, category_of, dequantize_tensor

SEARCHED = tuple(asdict(CategoryClip()))  # the categories SDClip scales (gates have their own grid)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) in float64 for E = w − w_hat (‖E‖²_F without H): the summed squared
    error of the layer's outputs over the calibration inputs, per input row."""
    e = w.detach().double() - w_hat.detach().double()
    if hessian is None:
        return float((e * e).sum())
    return float(((e @ hessian.double()) * e).sum())


def search_sdclip_k(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: QuantizeConfig,
                    quantize: Callable[[QuantizeConfig], QuantizedModel]) -> tuple[CategoryClip, dict]:
    """(k per category, {category: {k: error}}) over `cfg.sdclip_search`. `quantize(c)`
    quantizes `state` under config `c` (the run's method, pruning included). A category
    with no integer matrix keeps `cfg.sdclip_k`'s value; ties go to the larger k (fewer
    bytes)."""
    errors: dict[str, dict[float, float]] = {}
    for k in sorted(cfg.sdclip_search):
        qm = quantize(replace(cfg, sdclip_k=CategoryClip(**dict.fromkeys(SEARCHED, float(k)))))
        for name, t in qm.tensors.items():
            category = category_of(name)
            if t.kind != "int8" or category not in SEARCHED:
                continue
            err = output_error(state[name], dequantize_tensor(t), hessians.get(name))
            errors.setdefault(category, {}).setdefault(float(k), 0.0)
            errors[category][float(k)] += err
    chosen = {category: min(sorted(by_k, reverse=True), key=by_k.__getitem__) for category, by_k in errors.items()}
    return replace(cfg.sdclip_k, **chosen), errors
