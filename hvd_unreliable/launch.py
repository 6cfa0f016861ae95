"""Starting ranks: the mpirun/srun command lines, and whether this process already is a rank."""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from typing import List, Mapping, Sequence

from .errors import ConfigError, LaunchError

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def running_as_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a process started by mpirun/horovodrun/srun (not in a plain shell)."""
    return any(v in environ for v in RANK_VARS) or "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ


def rank_from_env(environ: Mapping[str, str] = os.environ) -> int:
    for v in (*RANK_VARS, "SLURM_PROCID"):
        if environ.get(v, "").isdigit():
            return int(environ[v])
    return 0


def run_id(environ: Mapping[str, str] = os.environ) -> str:
    """The same name on every rank of one launch (so all ranks share one output directory)."""
    if "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ:
        return f"slurm-{environ['SLURM_JOB_ID']}.{environ['SLURM_STEP_ID']}"
    for v in ("PMIX_NAMESPACE", "OMPI_MCA_orte_ess_jobid"):
        if v in environ:
            return "job-" + "".join(c if c.isalnum() else "-" for c in environ[v])
    import datetime

    return datetime.datetime.now().strftime("%H-%M-%S-%f")


@lru_cache(maxsize=None)
def _mpirun_flavour(mpirun: str) -> str:
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    return "openmpi" if ("Open MPI" in out or "OpenRTE" in out) else "other"


def mpirun_command(np: int, extra: Sequence[str] = ()) -> List[str]:
    """``mpirun -np N`` with what a laptop or CI box needs: oversubscription, no binding, root."""
    if not isinstance(np, int) or np < 1:
        raise ConfigError("np", np, "an integer >= 1")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise LaunchError("mpirun is not on PATH: run `make setup` (installs Open MPI) or load your MPI module")
    cmd = [mpirun, "-np", str(np)]
    if _mpirun_flavour(mpirun) == "openmpi":
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + list(extra)


def srun_command(np: int, extra: Sequence[str] = ()) -> List[str]:
    if shutil.which("srun") is None:
        raise LaunchError("cluster.launcher=srun but srun is not on PATH: run inside a Slurm allocation, "
                          "or use cluster.launcher=mpirun")
    return ["srun", "--mpi=pmix", "-n", str(np), *extra]
