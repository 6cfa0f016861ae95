"""Rank-side code of the GPU tests."""
import torch
from mpi4py import MPI

from hvd_unreliable.algorithms import rps_average
from hvd_unreliable.faults import parse_loss_spec
from hvd_unreliable.transport import Transport
from hvd_unreliable.transport.cuda import mpi_cuda_aware


def rps_on_cuda():
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    x = [torch.full((1000,), float(rank), device=device), torch.arange(10.0, device=device) * (rank + 1)]
    rps_average(x, Transport(comm))
    expected = [torch.full((1000,), (n - 1) / 2, device=device), torch.arange(10.0, device=device) * (n + 1) / 2]
    err = max(float((a - b).abs().max()) for a, b in zip(x, expected))
    return {"device": str(x[0].device), "max_error": err}


def lossy_rps_cuda_equals_cpu(steps=3):
    """RPS rounds at p = 0.3 with packets on CPU tensors, on staged CUDA tensors and (when the
    MPI is CUDA-aware) on CUDA tensors handed to MPI directly: the results must be identical."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    start = [torch.randn(5000, generator=torch.Generator().manual_seed(rank)), torch.randn(3, 7) * rank]
    paths = {"cpu": ("cpu", False), "staged": (device, False)}
    if mpi_cuda_aware():
        paths["direct"] = (device, True)
    results = {}
    for name, (dev, aware) in paths.items():
        x = [t.to(dev, copy=True) for t in start]
        transport = Transport(comm, parse_loss_spec("random 30%"), seed=5, packet_bytes=256, cuda_aware=aware)
        for step in range(steps):
            transport.set_step(step)
            rps_average(x, transport)
        results[name] = torch.cat([t.cpu().reshape(-1) for t in x])
        transport.free()
    same = {name: bool(torch.equal(v, results["cpu"])) for name, v in results.items()}
    return {"paths": sorted(paths), "identical": same, "moved": not torch.equal(results["cpu"][:5000], start[0])}
