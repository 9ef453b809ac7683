"""Packing to a byte target: zero the cheapest ±1 integers until artifact + code fits.

The 03-25 record (#609) landed its artifact under the cap by zeroing quantized ±1 values
in order of least damage (s_row², `prune.unit_candidates`) and binary-searching how many.
Every probe of that search is a full compression, and a record-size model takes tens of
seconds per codec, so the search packs each group only with the (layout, codec) pair
that won it at the start (one compression per changed group per probe, unchanged groups
cached) and steps by interpolation between the bracket's sizes, falling back to
bisection, rather than halving blindly. Every probe is itself a valid artifact, so the
search keeps the smallest count whose probe fitted; that count is then re-packed with
every configured layout and codec and the smaller of the two packs is shipped. The full
search is not always the smaller: it minimises each group's bytes, but the header that
names the choices (zlib-compressed JSON) can grow by a few bytes, so within a few bytes
of the budget the probe's pack is what fits. Whether the target is within reach is
asked of both packs at the largest count too (another layout or codec may win once
every candidate is zeroed).
Measured on 2 CPU cores, a record-size artifact of random int6 integers pruned 150 KB
under its size: 201.9 s in all with groups in 2 MB chunks (6 probes of 16-22 s), 908.1 s
with each group compressed whole (12 probes of 49-64 s); the whole 23 MB brotli stream
also sized unevenly (zeroing 2,737 more integers once saved 18.9 KB), which cost probes.
The target is decimal bytes of the artifact *with* the code (the 03-25 record computed
its "15.9 MB" in MiB, 16.67 M bytes: pgolf never does).
"""

from __future__ import annotations

import time

from pgolf_core.artifact import pack_artifact
from pgolf_core.quant import QuantizedModel
from pgolf_core.quant.prune import unit_candidates, zero_cheapest

MAX_PROBES = 40  # interpolation converges in far fewer; this bounds a pathological size curve


def pack_to_fit(qm: QuantizedModel, model_config: dict, compressors, layouts, fit_bytes: int, code_bytes: int,
                chunk_bytes: int, progress=None, cache: dict | None = None) -> tuple[QuantizedModel, bytes, dict, dict]:
    """(model as packed, artifact, pack report, fit report) with len(artifact) + code_bytes
    <= fit_bytes (fit_bytes 0: packed as it is), zeroing as few ±1 integers as the search
    finds (to within 1/2000 of the candidates); groups are compressed in chunks of
    `chunk_bytes` (`pack_artifact`). `progress(n, size)` is called after each probe.
    `cache` (`pack_artifact`'s) may hold groups an earlier pack compressed (the k search's).
    Raises ValueError naming quantize.fit_bytes when even zeroing every candidate does not fit."""
    start = time.perf_counter()
    blob, report = pack_artifact(qm, model_config, compressors, layouts, chunk_bytes=chunk_bytes, cache=cache)
    first_seconds = time.perf_counter() - start
    budget = fit_bytes - code_bytes
    fit = {"fit_bytes": fit_bytes, "zeroed": 0, "first_pack_seconds": first_seconds}
    if not fit_bytes:  # off: the plain pack
        return qm, blob, report, fit
    fit = {"fit_bytes": fit_bytes, "code_bytes": code_bytes, "model_bytes_before": len(blob), "zeroed": 0,
           "candidates": 0, "probes": 0, "first_pack_seconds": first_seconds, "search_seconds": 0.0,
           "full_search_seconds": 0.0}
    if len(blob) <= budget:
        return qm, blob, report, {**fit, "artifact_bytes": len(blob) + code_bytes}
    candidates = unit_candidates(qm)
    total = len(candidates)
    choices = {g: (report["layout_per_group"][g], report["compressor_per_group"][g]) for g in report["bytes_per_group"]}
    cache: dict = {}

    def probe(n: int) -> tuple[bytes, dict]:
        fit["probes"] += 1
        packed_n, report_n = pack_artifact(zero_cheapest(qm, candidates, n), model_config, compressors, layouts,
                                           chunk_bytes=chunk_bytes, choices=choices, cache=cache)
        if progress:
            progress(n, len(packed_n))
        return packed_n, report_n

    def full(n: int) -> tuple[bytes, dict]:
        return pack_artifact(zero_cheapest(qm, candidates, n), model_config, compressors, layouts,
                             chunk_bytes=chunk_bytes)

    search_start = time.perf_counter()
    lo, size_lo = 0, len(blob)
    hi, fitted = total, probe(total)  # `fitted`: the smallest pack found at `hi`, once it fits
    if len(fitted[0]) > budget:
        fitted = min(fitted, full(total), key=lambda pack: len(pack[0]))
    if len(fitted[0]) > budget:
        raise ValueError(f"quantize.fit_bytes={fit_bytes:,} is out of reach: zeroing all {total:,} +-1 integers "
                         f"leaves {len(fitted[0]):,} model bytes + {code_bytes:,} code bytes; raise it or quantize "
                         "coarser")
    size_hi = len(fitted[0])
    tolerance = max(1, total // 2000)
    bisect_next = False
    while hi - lo > tolerance and fit["probes"] < MAX_PROBES:
        if bisect_next or size_lo <= size_hi:
            n = (lo + hi) // 2
        else:  # the size falls about linearly in n: aim at the budget
            n = lo + round((size_lo - budget) / (size_lo - size_hi) * (hi - lo))
        n = min(max(n, lo + 1), hi - 1)
        pack = probe(n)
        width = hi - lo
        if len(pack[0]) <= budget:
            hi, size_hi, fitted = n, len(pack[0]), pack
        else:
            lo, size_lo = n, len(pack[0])
        bisect_next = (hi - lo) > width // 2  # interpolation that did not halve the bracket: bisect once
    fit["search_seconds"] = time.perf_counter() - search_start

    full_start = time.perf_counter()
    searched = full(hi)
    blob, report = min(searched, fitted, key=lambda pack: len(pack[0]))  # ties: the full search's
    fit["full_search_seconds"] = time.perf_counter() - full_start
    fit.update({"zeroed": hi, "candidates": total, "artifact_bytes": len(blob) + code_bytes,
                "shipped_pack": "full search" if blob is searched[0] else "probe"})
    return zero_cheapest(qm, candidates, hi), blob, report, fit
