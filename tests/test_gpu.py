"""The GPU path: CUDA tensors through the plugin, staged through pinned host memory or handed
to a CUDA-aware MPI directly. Skipped where torch sees no GPU."""
import pytest
import torch

from tests.mpirun import needs_horovod, run_mpi

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_rps_average_of_cuda_tensors_equals_the_mean_at_p0():
    res = run_mpi(2, "tests.workers.gpu:rps_on_cuda", timeout=180)
    for r in res:
        assert r["device"].startswith("cuda") and r["max_error"] < 1e-6


def test_lossy_rps_on_cuda_tensors_is_bit_identical_to_cpu_on_every_path():
    res = run_mpi(2, "tests.workers.gpu:lossy_rps_cuda_equals_cpu", timeout=180)
    for r in res:
        assert r["moved"] and all(r["identical"].values()), r


ONE_GPU_PER_RANK = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL wants a GPU per rank")


@pytest.mark.parametrize("backend", ["mpi4py", pytest.param("horovod", marks=[needs_horovod, ONE_GPU_PER_RANK])])
def test_reliable_mode_averages_cuda_gradients(backend):
    """Horovod averages them on the GPUs (with NCCL where it was built with it), mpi4py through
    pinned host memory."""
    res = run_mpi(2, "tests.workers.optimizer:reliable_average", {"backend": backend, "device": "cuda"}, timeout=180)
    for r in res:
        assert r["device"].startswith("cuda") and r["backend"] == backend and r["max_ulps"] <= 2, r
        assert r["grads"] == res[0]["grads"]
