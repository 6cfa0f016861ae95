"""The communication context: one MPI world shared by Horovod and mpi4py.

``init()`` works under ``mpirun``, ``horovodrun`` and ``srun --mpi=pmix``. With Horovod
installed it calls ``hvd.init(comm=MPI.COMM_WORLD)`` so Horovod's collectives and this plugin's
transport run on the same ranks; without Horovod, or with ``HVDU_BACKEND=mpi4py``, everything
runs on mpi4py alone. The API mirrors Horovod's: ``init, rank, size, local_rank, local_size,
broadcast_parameters, broadcast_optimizer_state, barrier``, plus ``cuda_device`` (this rank's GPU).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from mpi4py import MPI

from ..errors import ConfigError, LaunchError, check_choice
from ..transport.cuda import mpi_cuda_aware

log = logging.getLogger(__name__)

BACKENDS = ("auto", "horovod", "mpi4py")
# Variables through which launchers announce how many processes they started, and how to start
# them in one MPI world instead ({n}: that number).
_SLURM_FIX = ("Under Slurm launch with `srun --mpi=pmix ...` (see `srun --mpi=list`), or run `mpirun -np {n} ...` "
              "inside the allocation.")
_NO_MPI = "{} starts no MPI world, and this plugin's transport runs over MPI: launch with "
_LAUNCHER_SIZE_VARS = {
    **dict.fromkeys(("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                    _SLURM_FIX),
    "HOROVOD_SIZE": _NO_MPI.format("horovodrun --gloo") + "`horovodrun --mpi -np {n} ...` or `mpirun -np {n} ...`.",
    "WORLD_SIZE": _NO_MPI.format("torchrun") + "`mpirun -np {n} ...` (`python -m hvd_unreliable.train` "
                                               "starts it itself).",
}


@dataclass
class Context:
    comm: MPI.Comm
    local_comm: MPI.Comm
    backend: str  # "horovod" or "mpi4py"
    hvd: Any = None
    cuda_aware: bool = False  # CUDA tensors go to MPI directly (else staged through pinned host memory)


_ctx: Optional[Context] = None


def check_launch(world_size: int, environ=os.environ) -> None:
    """Fail when a launcher announced N > 1 processes but MPI sees a world of 1.

    The classic case is ``srun python train.py`` on a cluster whose MPI needs PMIx: every task
    starts as its own singleton world and would silently train alone. ``horovodrun --gloo`` and
    ``torchrun`` start processes without any MPI world, which this plugin's transport needs.
    """
    if world_size != 1:
        return
    for var, fix in _LAUNCHER_SIZE_VARS.items():
        value = environ.get(var, "")
        if var == "WORLD_SIZE" and "TORCHELASTIC_RUN_ID" not in environ:
            continue  # a generic name: torchrun's only where torchrun started the process
        if value.isdigit() and int(value) > 1:
            raise LaunchError(f"{var}={value} says {value} processes were launched, but MPI sees a world of "
                              f"size 1. Each process started its own MPI world. {fix.format(n=value)}")


def init(comm: Optional[MPI.Comm] = None, backend: Optional[str] = None) -> Context:
    """Initialise the context (idempotent). ``backend``: auto | horovod | mpi4py
    (default: ``$HVDU_BACKEND`` or auto = Horovod when importable)."""
    global _ctx
    if _ctx is not None:
        return _ctx
    comm = comm if comm is not None else MPI.COMM_WORLD
    backend = backend or os.environ.get("HVDU_BACKEND", "auto")
    check_choice("HVDU_BACKEND", backend, BACKENDS)
    check_launch(comm.Get_size())
    cuda_aware = mpi_cuda_aware()  # $HVDU_CUDA_AWARE is checked here, before any communication
    hvd = None
    if backend in ("auto", "horovod"):
        try:
            import horovod.torch as hvd  # noqa: F811
        except ImportError as e:
            if backend == "horovod":
                raise ConfigError("HVDU_BACKEND", backend, f"'mpi4py' or 'auto' (Horovod is not importable: {e})") from e
            hvd = None
        if hvd is not None:
            hvd.init(comm=comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    _ctx = Context(comm, local, "horovod" if hvd is not None else "mpi4py", hvd, cuda_aware)
    log.debug("rank %d/%d initialised with backend %s, CUDA-aware MPI: %s", comm.Get_rank(), comm.Get_size(),
              _ctx.backend, _ctx.cuda_aware)
    return _ctx


def context() -> Context:
    """The context; a Horovod script that has called ``hvd.init()`` gets one on first use, on
    Horovod's world, so that switching its optimizer to this plugin's is the only change."""
    if _ctx is None:
        hvd = sys.modules.get("horovod.torch")
        if hvd is None or not hvd.is_initialized():
            raise RuntimeError("hvd_unreliable.init() has not been called (nor Horovod's hvd.init())")
        check_launch(MPI.COMM_WORLD.Get_size())  # Horovod over Gloo (horovodrun --gloo), with no MPI world
        if hvd.size() != MPI.COMM_WORLD.Get_size():
            raise ConfigError("hvd.init(comm=...)", f"{hvd.size()} of {MPI.COMM_WORLD.Get_size()} ranks",
                              "Horovod on all ranks of MPI_COMM_WORLD, or hvd_unreliable.init(comm) with your communicator")
        return init(backend="horovod")
    return _ctx


def shutdown() -> None:
    """Release the context (Horovod first); MPI itself is finalised by mpi4py at exit."""
    global _ctx
    if _ctx is None:
        return
    if _ctx.hvd is not None:
        _ctx.hvd.shutdown()
    _ctx.local_comm.Free()
    _ctx = None


def rank() -> int:
    return context().comm.Get_rank()


def size() -> int:
    return context().comm.Get_size()


def local_rank() -> int:
    return context().local_comm.Get_rank()


def local_size() -> int:
    return context().local_comm.Get_size()


def backend() -> str:
    return context().backend


def cuda_device():
    """This rank's GPU: its local rank modulo the node's GPUs (ranks share GPUs when they
    outnumber them; NCCL, and with it Horovod's GPU allreduce, needs one GPU per rank)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise RuntimeError(f"rank {rank()}: torch sees no CUDA device on this node")
    return torch.device("cuda", local_rank() % gpus)


def barrier() -> None:
    context().comm.Barrier()


def is_root() -> bool:
    """True on rank 0: the only rank that prints summaries and shows progress bars."""
    return _ctx is None or rank() == 0


def root_print(*args, **kwargs) -> None:
    if is_root():
        print(*args, **kwargs, flush=True)
