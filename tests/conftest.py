"""Shared fixtures: a small real tokenizer and token streams from the embedded corpus,
and a tiny model config. Session-scoped: the stdlib scan takes a couple of seconds."""

from pathlib import Path

import pytest
import torch

from pgolf_core import corpus, tokenizer
from pgolf_core.model import ModelConfig

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def embedded_docs() -> list[str]:
    return corpus.load_documents("embedded")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, embedded_docs) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    model = tokenizer.train_tokenizer(embedded_docs[100:600], TINY_VOCAB)
    (directory / tokenizer.MODEL_FILE).write_bytes(model)
    return directory


@pytest.fixture(scope="session")
def tiny_sp(tiny_tokenizer_dir):
    return tokenizer.load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=TINY_VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
