"""Per-rank checkpoints: replicas differ under RPS, so every rank saves its own state.

Layout: ``<dir>/rank<r>.pt`` written atomically (temp file + rename), then ``<dir>/LATEST``
written by rank 0 once every rank has saved the same step: a run killed at any moment resumes
from the last step that all ranks completed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


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
