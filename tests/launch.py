"""The command that starts a test's processes under torchrun. torchrun makes a fresh log
folder for every launch (`/tmp/torchelastic_*`) and never removes it; with `--log-dir`
inside the test's own `tmp_path` those folders go where pytest prunes old runs, instead of
piling up in /tmp, ten per suite run."""

import sys
from pathlib import Path


def torchrun(tmp_path: Path, nproc: int) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local processes, logs under `tmp_path`;
    the caller appends the script (or `-m module`) and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--log-dir", str(tmp_path / "torchrun_logs")]
