"""The command line of every stage, one shape: `python -m stages.<name> --params
params.yaml --<path> ...` parses `--params` and one flag per field of the stage's Paths
dataclass (`train_metrics` -> `--train-metrics`), loads the stage's params section (the
`script` stage, which bakes several sections into the submission, gets them as a dict of
typed configs), calls its `run`, writes the report (`io.write_stage_report`: metrics file + provenance), prints
the summary, and exits non-zero with "<stage> FAILED: <reason>" on bad inputs (a
ValueError or FileNotFoundError: no report written) or on broken rules (after writing)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

from pgolf_core import config, io
from pgolf_core.stage.result import StageResult


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def parser(stage: str, paths_cls: type, description: str | None = None,
           sections: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """`--params` and a Path flag per field of `paths_cls`: required unless the field has
    a default; the help is the field's `metadata["help"]`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help=f"params file; the stage reads its {', '.join(f'`{s}`' for s in sections or (stage,))} "
                         f"section{'s' if sections and len(sections) > 1 else ''}")
    for field in dataclasses.fields(paths_cls):
        required = field.default is dataclasses.MISSING
        ap.add_argument(flag(field.name), dest=field.name, type=Path, required=required,
                        default=None if required else field.default, help=field.metadata.get("help"))
    return ap


def main(stage: str, run: Callable[..., StageResult], paths_cls: type, argv: list[str] | None = None) -> StageResult:
    """Parse `argv` (default: sys.argv), run the stage, write, print; exit on failure. A
    stage module that declares `SECTIONS` gets those params sections, {name: typed
    config}, instead of its own one."""
    description = sys.modules[run.__module__].__doc__
    sections = getattr(sys.modules[run.__module__], "SECTIONS", None)
    args = parser(stage, paths_cls, description, sections).parse_args(argv)
    paths = paths_cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(paths_cls)})
    try:
        cfg = {name: config.load_section(args.params, name) for name in sections} if sections \
            else config.load_section(args.params, stage)
        result = run(cfg, paths)
    except (ValueError, FileNotFoundError) as e:  # unreadable, mismatched or missing inputs: no report
        sys.exit(f"{stage} FAILED: {e}")
    if result.write_report:
        io.write_stage_report(paths.metrics, result.metrics, result.inputs, **result.provenance)
    for line in result.summary:
        print(line)
    if result.broken_rules:
        sys.exit(f"{stage} FAILED:\n  " + "\n  ".join(result.broken_rules))
    return result
