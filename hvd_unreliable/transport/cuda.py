"""Whether the MPI library takes CUDA device buffers (a "CUDA-aware" MPI).

Asked once per process through ``MPIX_Query_cuda_support()``, the run-time query Open MPI
(>= 2.0) and MPICH (>= 4.0) export from the library mpi4py loaded. An MPI without the query
counts as not CUDA-aware: CUDA tensors are then staged through pinned host memory, which works
everywhere. ``HVDU_CUDA_AWARE=1`` or ``0`` overrides the query, e.g. for an Open MPI 5 built
with UCX, whose query answers for its own CUDA transport only.
"""
from __future__ import annotations

import ctypes
import functools
import os

from ..errors import check_choice

ENV = "HVDU_CUDA_AWARE"


@functools.lru_cache(maxsize=None)
def _query() -> bool:
    from mpi4py import MPI  # noqa: F401  (loads the MPI library into the process first)

    for lib in [None, *_loaded_mpi_libraries()]:  # the global namespace, then libmpi* by path
        query = getattr(ctypes.CDLL(lib), "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype, query.argtypes = ctypes.c_int, []
            return bool(query())
    return False


def _loaded_mpi_libraries():
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libmpi.so"))


def mpi_cuda_aware(environ=os.environ) -> bool:
    """True when CUDA tensors may be handed to MPI directly; ``$HVDU_CUDA_AWARE`` overrides."""
    forced = environ.get(ENV, "")
    if forced:
        return check_choice(ENV, forced, ("0", "1")) == "1"
    return _query()
