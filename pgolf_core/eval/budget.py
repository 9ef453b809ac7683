"""The evaluation budget: what `eval_seconds` counts and how a run on other hardware is
projected to the challenge's 8xH100.

`eval_seconds_<mode>` runs from reading the artifact to the final sum: decompression,
dequantization, warm-up and the scoring loop. `eval_seconds_timed_as_records` is the
final mode's scoring loop alone, from its first window to its final sum: the records
started their timers there, after deserializing (about 20 s) and a compile warm-up on
random tokens (138-184 s), so their 330-525 s TTT loops are this figure, not the first.

Projection model (stated in metrics/eval.json as `projection_model`): the setup (artifact
read, warm-up) is paid once, as measured; the loop's device-seconds (its wall time times
the processes that ran it) are spread over 8 GPUs, this device's rate taken as an H100's,
and stretched by the mode's `balance` (the document modes hand each rank whole batches,
and the ranks wait for the slowest at every phase: its share against an even one,
modeled from the documents' lengths); a run in one process adds `sync_seconds` for each
cross-process synchronisation the loop would make on 8 (gradient all-reduces of TTT, the
final reduction); runs on several processes already paid theirs. Scaled to a token
count, the loop scales linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

CHALLENGE_GPUS = 8
PROJECTION_MODEL = ("setup (artifact read + warm-up) as measured + loop_seconds * processes / 8 * balance "
                    "(this device's per-GPU rate taken as an H100's; balance: the document modes' slowest of "
                    "8 ranks against an even split of the positions they forward, between phases, modeled from "
                    "the documents' lengths, 1 for the window modes) + syncs * sync_seconds when run in one "
                    "process; loop scaled linearly to the token count")


@dataclass(frozen=True)
class ModeTiming:
    setup_seconds: float  # artifact read to the start of the scoring loop
    loop_seconds: float  # the scoring loop, first window to final sum
    world_size: int
    syncs: int  # cross-process synchronisations the loop makes
    tokens: int  # targets scored
    balance: float = 1.0  # the loop's wall time on 8 processes against an even split, relative to this run's

    @property
    def eval_seconds(self) -> float:
        return self.setup_seconds + self.loop_seconds


def project_8xh100(t: ModeTiming, sync_seconds: float, tokens: int | None = None) -> float:
    """Seconds the same evaluation would take on 8xH100 (see the module's model), for
    `tokens` targets (default: the ones measured)."""
    scale = 1.0 if tokens is None else tokens / t.tokens
    syncs = t.syncs * sync_seconds if t.world_size == 1 else 0.0
    return t.setup_seconds + scale * (t.loop_seconds * t.world_size / CHALLENGE_GPUS * t.balance + syncs)


def check_budget(final_mode: str, projected: float, max_seconds: float) -> None:
    """Fail when the final mode's projection breaks `evaluate.max_eval_seconds` (0 = no check)."""
    if max_seconds > 0 and projected > max_seconds:
        raise RuntimeError(f"evaluate.final_mode {final_mode!r} projects to {projected:.0f} s on 8xH100, over "
                           f"evaluate.max_eval_seconds={max_seconds:.0f}: the challenge allows 600 s of evaluation")
