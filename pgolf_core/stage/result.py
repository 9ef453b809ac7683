"""What every stage's `run(cfg, paths)` returns, for `cli.main` to write and print."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageResult:
    """A stage's outcome.

    `metrics` is its report: `io.write_stage_report` puts the figures (numbers, flags) in
    the metrics file and the other values in the provenance's `labels`. `inputs` are the
    provenance's `data_sha256`; `provenance` its further entries (verify's `broken_rules`
    and `code_files`). `broken_rules` non-empty fails the stage after the report is
    written, so a broken run still shows why. `summary` is printed once the report is
    written. `write_report` is False where there is nothing for the CLI to write: the
    train stage writes its DVCLive folder itself as it trains, and a torchrun process
    other than rank 0 writes nothing.
    """

    metrics: dict
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)
    broken_rules: list[str] = dataclasses.field(default_factory=list)
    summary: list[str] = dataclasses.field(default_factory=list)
    write_report: bool = True
