from torch.distributed.distributed_c10d import BackendConfig

from pgolf_core import dist


def test_gpu_runs_reduce_cpu_scalars_through_gloo_and_cuda_tensors_through_nccl():
    """The loop all-reduces CPU scalars (clock, loss); NCCL alone would refuse them."""
    assert BackendConfig(dist.backend("cuda")).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert BackendConfig(dist.backend("cpu")).get_device_backend_map()["cpu"] == "gloo"
