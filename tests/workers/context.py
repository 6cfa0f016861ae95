"""Rank-side code of the context tests."""

import torch

import hvd_unreliable as hu


def describe(backend=None):
    ctx = hu.init(backend=backend)
    out = {"rank": hu.rank(), "size": hu.size(), "local_rank": hu.local_rank(), "local_size": hu.local_size(),
           "backend": hu.backend(), "cuda_aware": ctx.cuda_aware}
    if ctx.hvd is not None:  # Horovod and mpi4py share one world
        hvd = ctx.hvd
        out["hvd_rank"], out["hvd_size"] = hvd.rank(), hvd.size()
        out["hvd_sum"] = hvd.allreduce(torch.tensor([float(hu.rank() + 1)]), op=hvd.Sum).item()
    hu.barrier()
    hu.shutdown()
    return out


def init_error(backend="mpi4py"):
    """The error ``init`` raises on this rank (e.g. for a bad environment variable), or None."""
    try:
        hu.init(backend=backend)
    except hu.ConfigError as e:
        return {"error": str(e)}
    hu.shutdown()
    return {"error": None}
