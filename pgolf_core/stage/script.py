"""Stage `script`: the run's submission script, `train_gpt.py`, generated from pgolf's own
modules (`submission_export.build_script`: traced, bundled, minified, self-extracting when
smaller) with the profile's train, quantize and evaluate sections baked in.

Its bytes are the artifact's code bytes (issue 22: pgolf counts what it ships): `quantize`
packs to `quantize.fit_bytes` against them and `verify` charges them and runs the script,
alone, to score the artifact. A change to any baked section changes the script, so those
stages rerun: the shipped code changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pgolf_core import io
from pgolf_core.stage.result import StageResult
from pgolf_core.submission_export import BAKED_SECTIONS, build_script, script_modules

SECTIONS = ("tokenize", *BAKED_SECTIONS, "script")  # tokenize: the vocabulary size it is built for


@dataclasses.dataclass(frozen=True)
class ScriptPaths:
    out: Path = dataclasses.field(metadata={"help": "the generated script (train_gpt.py)"})
    metrics: Path = dataclasses.field(metadata={"help": "metrics file (JSON)"})


def run(cfg: dict, paths: ScriptPaths) -> StageResult:
    """Generate, write and measure the script; `cfg` holds the typed `SECTIONS`."""
    _, left_out = script_modules(cfg["train"])
    shipped = build_script(cfg)
    with io.atomic_path(paths.out) as tmp:
        tmp.write_bytes(shipped.data)
    metrics = {"code_bytes": shipped.bytes, "form": shipped.form, "bytes_plain": shipped.sizes["plain"],
               "bytes_minified": shipped.sizes["minified"], "bytes_self_extracting": shipped.sizes["self_extracting"]}
    modules = list(shipped.modules)
    summary = [f"script: {paths.out} {shipped.bytes:,} bytes ({shipped.form}; {shipped.sizes['plain']:,} readable, "
               f"{shipped.sizes['minified']:,} minified), {len(modules)} modules"
               + (f", left out: {', '.join(left_out)}" if left_out else "")
               + f"; {len(shipped.dropped)} functions and classes nothing in it calls dropped"]
    return StageResult(metrics, provenance={"bundled_modules": modules, "dropped_defs": list(shipped.dropped)},
                       summary=summary)
