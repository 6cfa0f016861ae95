"""A per-rank watchdog: the MPI job ends when a rank makes no progress for ``timeout`` seconds.

The lossy transport's exchanges time out by themselves (:class:`~hvd_unreliable.TransportTimeout`).
The rest of a training run's communication is blocking MPI or Horovod: the ``reliable`` mode's
allreduce, broadcasts, metric reductions, checkpoint barriers. A rank stuck in one of those (the
ranks called different collectives, a peer hangs in I/O) would hold its allocation for ever.
The watchdog is a daemon thread; the training loop calls :meth:`Watchdog.progress` at every
step. When ``timeout`` seconds pass without a call it prints what the rank did last and calls
``MPI_Abort``, which takes every rank of the job down::

    with Watchdog(300) as dog:
        for step in range(steps):
            dog.progress(f"step {step}")
            ...
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from mpi4py import MPI

from ..errors import check_positive


class Watchdog:
    """Abort ``comm``'s job (``MPI_Abort``, exit code 70) when :meth:`progress` is not called for ``timeout`` s."""

    EXIT_CODE = 70  # EX_SOFTWARE: tells "stuck" apart from a crash in the job's exit status

    def __init__(self, timeout: float, comm: Optional[MPI.Comm] = None, key: str = "timeout"):
        self.timeout = check_positive(key, timeout)
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self._last = time.monotonic()
        self._what = "set-up"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def progress(self, what: str) -> None:
        """Say that the rank is alive and now does ``what`` (shown if it gets stuck there)."""
        self._what = what
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f"hvd_unreliable watchdog: rank {self.comm.Get_rank()} made no progress for {idle:.0f}s "
                    f"(limit {self.timeout:g}s) during {self._what}. A peer may be stuck or the ranks called "
                    f"different collectives; aborting the job.\n")
                sys.stderr.flush()
                self.comm.Abort(self.EXIT_CODE)

    def __enter__(self) -> "Watchdog":
        self.progress("set-up")
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="hvdu-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
