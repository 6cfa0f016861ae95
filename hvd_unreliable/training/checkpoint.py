"""Per-rank checkpoints: replicas differ under RPS, so every rank saves its own state.

Layout: ``<dir>/rank<r>.pt`` written atomically (temp file + rename), then ``<dir>/LATEST``
written by rank 0 once every rank has saved the same step: a run killed at any moment resumes
from the last step that all ranks completed.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import torch
from mpi4py import MPI


class PreemptionFlag:
    """Set by SIGUSR1 or SIGTERM (Slurm's warning before a time limit or preemption, e.g.
    ``#SBATCH --signal=USR1@120``). Ranks receive the signal at different moments, so the loop
    asks :meth:`agreed` (a one-integer allreduce) and all ranks checkpoint the same step."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.raised = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, comm) -> bool:
        return bool(comm.allreduce(int(self.raised), op=MPI.MAX))


def save(directory: Path, rank: int, step: int, state: dict, comm) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"rank{rank}.pt.tmp"
    torch.save(dict(state, step=step), tmp)
    os.replace(tmp, directory / f"rank{rank}.{step}.pt")
    comm.Barrier()
    if rank == 0:
        (directory / "LATEST.tmp").write_text(str(step))
        os.replace(directory / "LATEST.tmp", directory / "LATEST")
    comm.Barrier()
    old = [p for p in directory.glob(f"rank{rank}.*.pt") if p.name != f"rank{rank}.{step}.pt"]
    for p in old:
        p.unlink()


def load(directory: Path, rank: int) -> Optional[dict]:
    latest = directory / "LATEST"
    if not latest.is_file():
        return None
    step = int(latest.read_text())
    return torch.load(directory / f"rank{rank}.{step}.pt", weights_only=False)
