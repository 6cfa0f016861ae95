"""Rank-side code of the GPU tests."""
import torch
from mpi4py import MPI

from hvd_unreliable.algorithms import rps_average
from hvd_unreliable.transport import Transport


def rps_on_cuda():
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    x = [torch.full((1000,), float(rank), device=device), torch.arange(10.0, device=device) * (rank + 1)]
    rps_average(x, Transport(comm))
    expected = [torch.full((1000,), (n - 1) / 2, device=device), torch.arange(10.0, device=device) * (n + 1) / 2]
    err = max(float((a - b).abs().max()) for a, b in zip(x, expected))
    return {"device": str(x[0].device), "max_error": err}
