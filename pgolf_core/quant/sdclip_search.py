"""SDClip's k chosen per category by the calibration reconstruction error (issue 19),
optionally under a byte target.

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
category's error at that k. The artifact stores each category in its own group, each
group compressed on its own, so one pack per candidate also gives every category's
bytes at that k: with `quantize.sdclip_search_bytes`, the search takes the combination
of least summed error among those whose predicted artifact (these group bytes, plus the
rest measured once) fits the target, and then packs the combination itself to confirm,
since the compressed header and LQER's factors are not part of the prediction.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from pgolf_core.config import CategoryClip, QuantizeConfig
from pgolf_core.quant import QuantizedModel, category_of, dequantize_tensor

SEARCHED = tuple(asdict(CategoryClip()))  # the categories SDClip scales (gates have their own grid)
MAX_CONFIRM_ROUNDS = 5  # packs of a chosen combination before the search gives up on the target


@dataclass(frozen=True)
class ByteTarget:
    """What the byte criterion needs: `pack(qm)` packs integers as the run would ship
    them (LQER included) and returns the pack report (`artifact.pack_artifact`'s);
    the artifact with `code_bytes` of code must be at most `target` bytes."""

    target: int
    code_bytes: int
    pack: Callable[[QuantizedModel], dict]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) in float64 for E = w − w_hat (‖E‖²_F without H): the summed squared
    error of the layer's outputs over the calibration inputs, per input row."""
    e = w.detach().double() - w_hat.detach().double()
    if hessian is None:
        return float((e * e).sum())
    return float(((e @ hessian.double()) * e).sum())


def search_sdclip_k(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: QuantizeConfig,
                    quantize: Callable[[QuantizeConfig], QuantizedModel],
                    bytes_target: ByteTarget | None = None) -> tuple[CategoryClip, dict]:
    """(k per category, report) over `cfg.sdclip_search`. `quantize(c)` quantizes `state`
    under config `c` (the run's method, pruning included). A category with no integer
    matrix keeps `cfg.sdclip_k`'s value; ties go to the larger k (fewer bytes).

    The report has "error": {category: {k: error}}; with `bytes_target` also "bytes":
    {category: {k: compressed bytes of its group}}, "predicted_model_bytes" and
    "model_bytes" of the chosen combination, and "packs" (how many packs it took).
    Raises ValueError naming quantize.sdclip_search_bytes when no combination fits."""
    errors: dict[str, dict[float, float]] = {}
    sizes: dict[str, dict[float, int]] = {}
    rest = 0  # the artifact's bytes outside the searched groups (header, passthrough, LQER, gates)
    for k in sorted(cfg.sdclip_search):
        qm = quantize(_every_category(cfg, float(k)))
        for name, t in qm.tensors.items():
            category = category_of(name)
            if t.kind != "int8" or category not in SEARCHED:
                continue
            err = output_error(state[name], dequantize_tensor(t), hessians.get(name))
            errors.setdefault(category, {}).setdefault(float(k), 0.0)
            errors[category][float(k)] += err
        if bytes_target:
            report = bytes_target.pack(qm)
            for category in errors:
                sizes.setdefault(category, {})[float(k)] = report["bytes_per_group"][category]
            rest = max(rest, report["model_bytes"] - sum(report["bytes_per_group"][c] for c in errors))
    if not bytes_target:
        chosen = {category: min(sorted(by_k, reverse=True), key=by_k.__getitem__) for category, by_k in errors.items()}
        return replace(cfg.sdclip_k, **chosen), {"error": errors}

    budget = bytes_target.target - bytes_target.code_bytes
    excluded: set[tuple] = set()
    packs = len(cfg.sdclip_search)
    for _ in range(MAX_CONFIRM_ROUNDS):
        combination = least_error_within(errors, sizes, budget - rest, excluded)
        if combination is None:
            break
        chosen_cfg = replace(cfg, sdclip_k=replace(cfg.sdclip_k, **combination))
        report = bytes_target.pack(quantize(chosen_cfg))
        packs += 1
        predicted = rest + sum(sizes[c][k] for c, k in combination.items())
        if report["model_bytes"] <= budget:
            return chosen_cfg.sdclip_k, {"error": errors, "bytes": sizes, "predicted_model_bytes": predicted,
                                         "model_bytes": report["model_bytes"], "packs": packs}
        excluded.add(tuple(sorted(combination.items())))
        rest += report["model_bytes"] - predicted  # what the prediction missed, charged to every later choice
    smallest = {c: max(by_k) for c, by_k in errors.items()}
    least = rest + sum(sizes[c][k] for c, k in smallest.items())
    raise ValueError(f"quantize.sdclip_search_bytes={bytes_target.target:,} is out of reach: the largest candidate "
                     f"k ({', '.join(f'{c} {k:g}' for c, k in smallest.items())}) packs to about {least:,} model bytes "
                     f"+ {bytes_target.code_bytes:,} code bytes; add larger k to quantize.sdclip_search, lower "
                     "quantize.bits, or prune to the target with quantize.fit_bytes")


def least_error_within(errors: dict[str, dict[float, float]], sizes: dict[str, dict[float, int]], budget: int,
                       excluded: set[tuple] = frozenset()) -> dict[str, float] | None:
    """The k per category of least summed error whose summed bytes are at most `budget`
    (ties: fewer bytes, then larger k), skipping the combinations in `excluded` (sorted
    (category, k) tuples); None when none fits. Exhaustive: a few categories of a few
    candidates each (7 candidates, 4 categories: 2,401 combinations)."""
    categories = sorted(errors)
    best, best_key = None, None
    for ks in itertools.product(*(sorted(errors[c], reverse=True) for c in categories)):
        combination = dict(zip(categories, ks))
        size = sum(sizes[c][k] for c, k in combination.items())
        if size > budget or tuple(sorted(combination.items())) in excluded:
            continue
        key = (sum(errors[c][k] for c, k in combination.items()), size)
        if best_key is None or key < best_key:
            best, best_key = combination, key
    return best


def _every_category(cfg: QuantizeConfig, k: float) -> QuantizeConfig:
    return replace(cfg, sdclip_k=CategoryClip(**dict.fromkeys(SEARCHED, k)))
