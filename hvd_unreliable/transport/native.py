"""The exchange's hot path in C (``_native.c``), bound to the MPI that mpi4py loaded.

:func:`start_and_wait` copies an exchange's own block, restarts its persistent requests and
polls them for up to ``SPIN_S`` seconds in one call, with the GIL released: what the Python around
``Startall`` and ``Testall`` cost every exchange is the difference between the exchange and
plain ``Alltoall`` on small blocks (docs/benchmarks.md). The extension needs only a C compiler
(``setup.py`` builds it, optionally); it reaches MPI through the function addresses of
mpi4py's own libmpi, so it serves any MPI. Where it is not built, or with ``HVDU_NATIVE=0``,
:data:`start_and_wait` is ``None`` and the transport waits in Python, as before.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional, Sequence

from mpi4py import MPI

SPIN_S = 0.05  # how long a wait polls before it sleeps between polls (Transport._wait too)


def _bind() -> Optional[Callable]:
    if os.environ.get("HVDU_NATIVE", "1") == "0":
        return None
    try:
        from . import _native
    except ImportError:
        return None
    for lib in (MPI.__file__, None):  # mpi4py's module (and the libmpi it links), else what is loaded
        try:
            dll = ctypes.CDLL(lib)
            start, test = (ctypes.cast(getattr(dll, name), ctypes.c_void_p).value for name in ("MPI_Startall", "MPI_Testall"))
        except (OSError, AttributeError):
            continue
        _native.bind(start, test, MPI._sizeof(MPI.Request), MPI._sizeof(MPI.Status))
        return _native.start_and_wait
    return None


#: ``start_and_wait(handles, statuses, own_dst, own_src, own_bytes, spin[, lost])``: 1 when every
#: request started completed, 0 when some are pending after ``spin`` seconds, ``-code`` on an MPI
#: error; or ``None``. ``lost`` (bytes, one per handle) leaves the requests where it is non-zero idle.
start_and_wait = _bind()


def arguments(requests: Sequence[MPI.Prequest], own: tuple = (0, 0, 0)) -> Optional[tuple]:
    """The arguments of :data:`start_and_wait` for ``requests`` (persistent, kept alive by the
    caller) and ``own`` = (destination address, source address, bytes) of a host copy to make
    first; ``None`` without the extension."""
    if start_and_wait is None:
        return None
    size = MPI._sizeof(MPI.Request)
    handles = bytearray(b"".join(ctypes.string_at(MPI._addressof(r), size) for r in requests))
    return (handles, bytearray(MPI._sizeof(MPI.Status) * len(requests)), *own, SPIN_S)
