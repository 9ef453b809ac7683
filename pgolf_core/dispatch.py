"""The one place a run's kernels are chosen: `resolve_kernels` probes the device and the
installed packages once and returns the `kernels.Kernels` the model is built with.

Training's fused kernels live in `fused_mlp` and `fused_ce`, imported here only when
asked for: the model never imports them, so evaluation's code never loads them.
"""

from __future__ import annotations

import importlib.util

import torch

from pgolf_core.config import RuntimeConfig
from pgolf_core.kernels import Kernels


def resolve_kernels(device: torch.device | str, runtime: RuntimeConfig) -> Kernels:
    """The kernels of the run's switches (`train.runtime.flash_attn`, `fused_mlp`,
    `fused_ce`) that can run on `device`; each asked for that cannot is left out, with one
    printed line saying why. FA4 needs a CUDA device and flash_attn.cute (it is the CUDA
    runs' default, so a CPU run leaves it out without a word); the Triton kernels need
    triton, and run on CUDA tensors, or on CPU tensors under Triton's interpreter
    (`TRITON_INTERPRET=1` when this is called)."""
    device = torch.device(device)
    flash = runtime.flash_attn and device.type == "cuda" and \
        _usable("flash_attn", device, "SDPA or FlexAttention's Triton kernels")
    mlp = loss = None
    if runtime.fused_mlp and _usable("fused_mlp", device, "the plain MLP"):
        from pgolf_core.fused_mlp import fused_mlp as mlp
    if runtime.fused_ce and _usable("fused_ce", device, "the compiled loss"):
        from pgolf_core.fused_ce import softcap_ce as loss
    return Kernels(device.type, flash, mlp, loss)


def _usable(switch: str, device: torch.device, instead: str) -> bool:
    why = _unusable_because(switch, device)
    if why:
        print(f"kernels: {switch} asked for, but {why}: using {instead}", flush=True)
    return not why


def _unusable_because(switch: str, device: torch.device) -> str:
    """Why the kernels of `switch` cannot run on `device`; "" when they can."""
    if switch == "flash_attn":
        if device.type != "cuda":
            return f"FA4 runs on CUDA devices, not {device.type}"
        return "" if _installed("flash_attn.cute") else "flash_attn.cute is not installed"
    if not _installed("triton"):
        return "triton is not installed"
    import triton

    interpreted = triton.knobs.runtime.interpret
    if device.type == ("cpu" if interpreted else "cuda"):
        return ""
    if interpreted:
        return f"Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors, not {device.type}"
    return f"Triton runs {device.type} tensors only interpreted (TRITON_INTERPRET=1)"


def _installed(module: str) -> bool:
    """Whether `module` can be found (not imported: FlexAttention imports flash_attn itself)."""
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 - a broken package counts as absent
        return False
