"""io.safetensors_bytes: the same tensors and metadata give the same file, every time,
and the file reads back as the library's own. (The quantizer reference and the Hessians
are written through it: tests/test_artifact.py and tests/test_calibration.py check that
each stays the same bytes when rewritten.)"""

from __future__ import annotations

import json

import safetensors
import torch

from pgolf_core import io


def _header(data: bytes) -> tuple[int, str]:
    size = int.from_bytes(data[:8], "little")
    return size, data[8 : 8 + size].decode()


def test_one_file_per_content_sorted_metadata_read_back_alike(tmp_path):
    tensors = {"b.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.q": torch.tensor([1, -2], dtype=torch.int8)}
    metadata = {"zeta": "1", "alpha": json.dumps([1, 2]), "mid": "é \" \\ ok"}
    files = {io.safetensors_bytes(tensors, metadata) for _ in range(20)}
    assert len(files) == 1
    data = files.pop()
    size, header = _header(data)
    assert size % 8 == 0 and len(data) == 8 + size + 6 * 4 + 2
    parsed = json.loads(header)
    assert list(parsed["__metadata__"]) == ["alpha", "mid", "zeta"]
    (tmp_path / "t.safetensors").write_bytes(data)
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)
