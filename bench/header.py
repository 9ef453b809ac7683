"""The fields every benchmark result starts with (DESIGN.md's contract): which device,
when, the command that reproduces it, and the code it measured. One definition, so every
result can be traced to a commit and rerun as written."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path

from pgolf_core.io import git_state

RESULTS = Path(__file__).resolve().parent / "results"  # bench/results/<name>.json: the committed record


def header(device_type: str = "cpu") -> dict:
    """`device` (the GPU's name for "cuda", else the CPU's model name), the UTC date (ISO),
    the command as the `python -m bench.<name> ...` that was run, the git commit and
    whether tracked files differed from it (then the commit alone does not say what ran)."""
    module = getattr(sys.modules["__main__"].__spec__, "name", None) or sys.argv[0]
    return {
        "device": _gpu_name() if device_type == "cuda" else cpu_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", module, *sys.argv[1:]]),
        **git_state(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()
