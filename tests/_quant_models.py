"""A small random model for the quantization tests: every category, a gate, passthrough."""

import torch

MODEL_CONFIG = {"num_layers": 1, "model_dim": 32, "vocab_size": 96, "name": "tiny"}


def random_state(seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    return {
        "tok_emb.weight": r(96, 32),
        "blocks.0.attn.q.weight": r(32, 32),
        "blocks.0.attn.proj.weight": r(32, 32) * 3,
        "blocks.0.attn.gate": r(4, 12) * 20,
        "blocks.0.attn.gain": r(32) + 1.0,
        "blocks.0.mlp.fc.weight": r(64, 32),
        "blocks.0.mlp.proj.weight": r(32, 64),
        "value_embed.weight": r(40, 32),  # matches no pattern -> "other"
        "final_norm.gain": r(32) + 1.0,
    }
