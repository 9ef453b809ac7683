import os
import subprocess
from pathlib import Path

import pytest
from torch.distributed.distributed_c10d import BackendConfig

from pgolf_core import dist
from launch import torchrun

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_runs_reduce_cpu_scalars_through_gloo_and_cuda_tensors_through_nccl():
    """The loop all-reduces CPU scalars (clock, loss); NCCL alone would refuse them."""
    assert BackendConfig(dist.backend("cuda")).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert BackendConfig(dist.backend("cpu")).get_device_backend_map()["cpu"] == "gloo"



def test_the_process_group_outwaits_rank_0_packing_alone(monkeypatch):
    """After training, ranks wait at a barrier while rank 0 quantizes and packs (a dozen
    packs with fit_bytes): the group's timeout must be longer than NCCL's 10 minutes."""
    import datetime

    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda **kwargs: calls.append(kwargs))
    dist.init("cuda")
    assert calls == [{"backend": "cpu:gloo,cuda:nccl", "timeout": dist.COLLECTIVE_TIMEOUT}]
    assert dist.COLLECTIVE_TIMEOUT >= datetime.timedelta(minutes=30)


DDP_BLOCK_MASK_SCRIPT = '''
import sys
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, sys.argv[1])
from pgolf_core import kernels
from pgolf_core.config import ModelConfig
from pgolf_core.model import GPT

torch_dist.init_process_group("gloo")
kernels._block_mask_wanted = lambda ids: torch.compiler.is_compiling()  # the CUDA path, on a CPU
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=64, num_layers=6, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2,
                        doc_mask=True, unet_skips=True, num_loops=1, loop_start=1, loop_end=2,
                        parallel_mode="routed", parallel_start=4)).eval()
with torch.no_grad():  # away from the zero-initialised projections, where attention cannot matter
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
idx = torch.randint(2, 64, (2, 160))
idx[0, [5, 70]] = 1
with torch.no_grad():
    dense = model(idx)
    compiled = torch.compile(DistributedDataParallel(model, bucket_cap_mb=2))(idx)
error = (compiled - dense).abs().max().item()
torch_dist.destroy_process_group()
sys.exit(0 if error < 1e-4 else f"compiled DDP with a block mask differs from the dense mask by {error}")
'''


@pytest.mark.slow
def test_the_document_block_mask_crosses_ddp_graph_splits(tmp_path):
    """Under DDP, torch.compile splits the model's graph at gradient-bucket boundaries;
    the FlexAttention block mask made in the first piece must reach every later one (the
    8-GPU doc_mask path; forward only: FlexAttention has no CPU backward)."""
    script = tmp_path / "ddp_block_mask.py"
    script.write_text(DDP_BLOCK_MASK_SCRIPT)
    run = subprocess.run([*torchrun(tmp_path, 2),
                          str(script), str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "TORCH_LOGS": "ddp_graphs"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "---split graph---" in run.stderr and "submod_1" in run.stderr  # the graph was split
