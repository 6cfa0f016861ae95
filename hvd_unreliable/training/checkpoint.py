"""Per-rank checkpoints: replicas differ under RPS, so every rank saves its own state.

Layout, in ``<run dir>/checkpoints``: ``rank<r>.<step>.pt`` written atomically (temp file +
rename), then, by rank 0 once every rank has saved the same step, ``run.json`` (what the run
computes: :func:`run_identity`) and ``LATEST``: a run killed at any moment resumes from the last
step that all ranks completed, and only a run of the same config resumes from it.

Loads without torch and MPI (they are imported where used), so that the launching process can
check a run directory before it starts any rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

DIRNAME = "checkpoints"  # in the run directory

# Keys that may change between a run and its resumption: how it is watched, checkpointed,
# timed out and scheduled. Everything else decides what the run computes.
_MAY_CHANGE = ("checkpoint.", "progress", "network.timeout", "cluster.name", "cluster.launcher", "cluster.mpirun_args",
               "cluster.partition", "cluster.account", "cluster.time", "cluster.gpus_per_node", "cluster.cpus_per_task")


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
        from mpi4py import MPI

        return bool(comm.allreduce(int(self.raised), op=MPI.MAX))


def save(directory: Path, rank: int, step: int, state: dict, comm, run: dict) -> None:
    """Save this rank's ``state`` of ``step``; ``run`` is the run's :func:`run_identity`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"rank{rank}.pt.tmp"
    torch.save(dict(state, step=step), tmp)
    os.replace(tmp, directory / f"rank{rank}.{step}.pt")
    comm.Barrier()
    if rank == 0:
        (directory / "run.json.tmp").write_text(json.dumps(run, indent=1))
        os.replace(directory / "run.json.tmp", directory / "run.json")
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
    import torch

    return torch.load(directory / f"rank{rank}.{step}.pt", weights_only=False)


def run_identity(cfg) -> dict:
    """What a run computes, as flat keys (``"optim.lr": 0.05``): a checkpoint stores it, and only
    a run that computes the same resumes from it."""
    flat: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not (prefix + k).startswith(_MAY_CHANGE):
                flat[prefix + k] = v

    walk(dataclasses.asdict(cfg), "")
    return flat


def check_resumable(cfg, run_dir: Path) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` holds a checkpoint of a run that computed
    something else than ``cfg`` would: resuming would mix two runs in one set of metrics."""
    saved_path = run_dir / DIRNAME / "run.json"
    if not cfg.checkpoint.resume or not (run_dir / DIRNAME / "LATEST").is_file() or not saved_path.is_file():
        return  # nothing to resume (or a checkpoint written before checkpoints kept their run)
    saved, mine = json.loads(saved_path.read_text()), run_identity(cfg)
    diffs = [f"{k}: {saved.get(k)!r} then, {mine.get(k)!r} now" for k in sorted(set(saved) | set(mine))
             if saved.get(k) != mine.get(k)]
    if diffs:
        raise ConfigError("hydra.run.dir", str(run_dir), "a new directory, or the config of the run that checkpointed "
                          f"there ({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''})")
