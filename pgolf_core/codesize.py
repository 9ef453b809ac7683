"""Code bytes of the artifact: the `pgolf_core` source files that evaluation imports.

Found through the import system in a fresh interpreter (so modules that only the
calling stage happens to have loaded do not count), never a hand-kept list. Until
the artifact carries its own code, this is what `verify` charges against 16 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# What rebuilding the model from the artifact and scoring it needs.
EVAL_ENTRY_MODULES = ("pgolf_core.artifact", "pgolf_core.eval.sliding",
                      "pgolf_core.bpb", "pgolf_core.data", "pgolf_core.tokenizer")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
files = sorted({m.__file__ for n, m in list(sys.modules.items())
                if (n == "pgolf_core" or n.startswith("pgolf_core.")) and getattr(m, "__file__", None)})
print(json.dumps(files))
"""


def imported_source_files(entry_modules=EVAL_ENTRY_MODULES) -> list[Path]:
    """Every pgolf_core file a fresh interpreter loads when importing `entry_modules`."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *entry_modules],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"importing {entry_modules} failed in a fresh interpreter:\n{out.stderr}")
    return [Path(p) for p in json.loads(out.stdout.strip().splitlines()[-1])]


def code_bytes(entry_modules=EVAL_ENTRY_MODULES) -> tuple[int, dict[str, int]]:
    """(total bytes, bytes per file) of the evaluation's pgolf_core sources."""
    sizes = {str(p): p.stat().st_size for p in imported_source_files(entry_modules)}
    return sum(sizes.values()), sizes
