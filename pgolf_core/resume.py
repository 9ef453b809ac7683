"""Snapshots of a training run, so a run that dies part-way (a long 1xH100 run, a
pre-empted machine) resumes from its last snapshot with the same result it would
have reached uninterrupted.

A snapshot holds everything the loop carries from step to step: weights, optimizer
state, EMA, data position, step and timed seconds. It is tied to the run by a
fingerprint (the train section, the inputs' hashes, the number of processes); a
snapshot of another run is never resumed. It is written atomically, read with
`torch.load(weights_only=True)` (no arbitrary pickles), and deleted once the run
completes. Snapshots are not DVC outputs: DVC deletes outputs before it reruns a
stage, which is exactly when a snapshot is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf_core import io

SNAPSHOT_FILE = "snapshot.pt"


@dataclass
class Snapshot:
    fingerprint: str
    step: int
    elapsed: float  # timed training seconds so far
    stream_position: int
    model: dict
    optimizers: list
    ema: list | None


def fingerprint(cfg, inputs: dict[str, str], world_size: int) -> str:
    """What makes two runs the same run: every train setting, the inputs' hashes, the process count."""
    text = json.dumps({"train": dataclasses.asdict(cfg), "inputs": inputs, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Snapshots:
    """Where one run's snapshot lives (`directory/snapshot.pt`) and how it is saved and read."""

    def __init__(self, directory: str | Path, run_fingerprint: str):
        self.path = Path(directory) / SNAPSHOT_FILE
        self.fingerprint = run_fingerprint

    def save(self, snapshot: Snapshot) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.path) as tmp:
            torch.save({f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}, tmp)  # no deep copy

    def load(self) -> tuple[Snapshot | None, str]:
        """(snapshot, why) — the snapshot to resume from, or None and the reason there is none.
        A file that cannot be read is an error that names it: deleting it starts afresh."""
        if not self.path.is_file():
            return None, f"no snapshot at {self.path}"
        try:
            values = torch.load(self.path, map_location="cpu", weights_only=True)
            snapshot = Snapshot(**values)
        except (RuntimeError, OSError, EOFError, TypeError, pickle.UnpicklingError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
            raise ValueError(f"training snapshot {self.path} is unreadable ({reason}); delete it to start afresh") from e
        if snapshot.fingerprint != self.fingerprint:
            return None, f"snapshot at {self.path} belongs to another run (settings or inputs differ): starting afresh"
        return snapshot, f"resuming from the snapshot at step {snapshot.step} ({snapshot.elapsed:.1f} s trained)"

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
