"""Model weights on disk as safetensors (no pickle), with the model config in the
file's metadata so a model is rebuilt from the file alone."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pgolf_core import io
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT

CONFIG_KEY = "model_config"


def save_model(path: str | Path, model: GPT) -> None:
    """Write float32 weights + config atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with io.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_KEY: model.cfg.to_json()})


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict, config) of a saved model; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path} (run the train stage)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: not written by pgolf's train stage")
    return state, ModelConfig.from_json(metadata[CONFIG_KEY])


def build_model(state: dict[str, torch.Tensor], cfg: ModelConfig) -> GPT:
    """A GPT carrying `state`; refuses non-finite weights and mismatched shapes by name."""
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"weight {name} holds NaN or Inf values")
    model = GPT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights do not fit the model config {cfg}: {e}") from e
    return model

