"""Shared fixtures: a small real tokenizer and token streams from the embedded corpus,
and a tiny model config. Session-scoped: the stdlib scan takes a couple of seconds."""

from pathlib import Path

import pytest
import torch

from fake_hub import FakeHub

from pgolf_core import corpus, data, tokenizer
from pgolf_core.config import ModelConfig

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


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tiny_sp, embedded_docs):
    """Train and val shards of the tiny tokenizer (150 train documents, 10 val), read only."""
    directory = tmp_path_factory.mktemp("shards")
    data.write_split(directory, "train", tokenizer.encode_documents(tiny_sp, embedded_docs[100:250]), 20_000)
    data.write_split(directory, "val", tokenizer.encode_documents(tiny_sp, embedded_docs[:10]), 10**6)
    return directory


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=TINY_VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A loopback fake of the Hugging Face hub, reached through HF_ENDPOINT like a mirror."""
    from huggingface_hub import constants, file_download

    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)  # copied there before 1.0
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "harnesses.json"), raising=False)
    yield server
    server.stop()
