"""Pruning: zero weights before quantization by magnitude, or quantized ±1 values after it.

Zeros compress to almost nothing, so pruning trades a little damage for bytes. Two forms
from the records: magnitude pruning of a fixed fraction of each matrix before
quantization (#569: 2 %, #687: 3 %), and the 03-25 record's (#609) selective pruning of
quantized ±1 values, the cheapest to remove, in order of least damage (zeroing a ±1 moves
the weight by exactly its row's scale s, so the squared damage is s²).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pgolf_core.quant import QuantizedModel, category_of
from pgolf_core.quant.rtn import is_quantized


def prune_matrix(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of `w` with exactly round(fraction · numel) entries of smallest |w| set to 0
    (ties broken by position, so the count is exact)."""
    k = round(fraction * w.numel())
    out = w.detach().clone()
    if k:
        order = torch.argsort(w.abs().flatten(), stable=True)
        out.view(-1)[order[:k]] = 0
    return out


def prune_state(state: dict[str, torch.Tensor], fraction: float, passthrough_max_numel: int) -> dict[str, torch.Tensor]:
    """`state` with every matrix that will get integers (`is_quantized`; not the gates)
    magnitude-pruned by `fraction`; other tensors unchanged (the same objects)."""
    return {name: prune_matrix(t, fraction)
            if fraction > 0 and category_of(name) != "gate" and is_quantized(t, passthrough_max_numel) else t
            for name, t in state.items()}


@dataclass(frozen=True)
class Candidates:
    """The ±1 integers of a model in order of least damage: entry j is position `flat[j]`
    of the flattened integers of tensor `names[tensor[j]]`; a prefix of length n names the
    n cheapest to zero."""

    names: list
    tensor: torch.Tensor
    flat: torch.Tensor

    def __len__(self) -> int:
        return len(self.flat)


def unit_candidates(qm: QuantizedModel) -> Candidates:
    """The ±1 integers of every quantized matrix (gates and LQER factors excluded) by
    s_row² ascending, then tensor order, then position (so the order is reproducible)."""
    names, keys, tensor_idx, flats = [], [], [], []
    for name, t in qm.tensors.items():
        if t.kind != "int8" or category_of(name) == "gate":
            continue
        flat = torch.nonzero(t.q.flatten().abs() == 1).flatten()
        keys.append(t.scale.double()[flat // t.q.shape[1]] ** 2)
        tensor_idx.append(torch.full_like(flat, len(names)))
        flats.append(flat)
        names.append(name)
    if not names:
        return Candidates(names=[], tensor=torch.zeros(0, dtype=torch.long), flat=torch.zeros(0, dtype=torch.long))
    key, tensor, flat = torch.cat(keys), torch.cat(tensor_idx), torch.cat(flats)
    order = torch.argsort(flat, stable=True)  # lexicographic: minor keys first, stable sorts after
    order = order[torch.argsort(tensor[order], stable=True)]
    order = order[torch.argsort(key[order], stable=True)]
    return Candidates(names=names, tensor=tensor[order], flat=flat[order])


def zero_cheapest(qm: QuantizedModel, candidates: Candidates, n: int) -> QuantizedModel:
    """`qm` with the first `n` candidates set to 0 (the others and every other tensor untouched)."""
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot zero {n} of {len(candidates)} candidate +-1 values")
    tensor, flat = candidates.tensor[:n], candidates.flat[:n]
    tensors = dict(qm.tensors)
    for i, name in enumerate(candidates.names):
        idx = flat[tensor == i]
        if len(idx):
            q = tensors[name].q.clone()
            q.view(-1)[idx] = 0
            tensors[name] = replace(tensors[name], q=q)
    return QuantizedModel(tensors=tensors, method=qm.method)
