"""Starting ranks: the mpirun/srun command lines, and whether this process already is a rank."""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import List, Mapping, Sequence

from .errors import ConfigError, LaunchError

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "HOROVOD_RANK")  # (the last: horovodrun --gloo)
# Set by an MPI runtime in its processes (a singleton MPI_Init sets them too, at the C level,
# where a child started with env=None inherits them and takes itself for a rank).
MPI_RUNTIME_PREFIXES = ("OMPI_COMM_WORLD", "OMPI_UNIVERSE", "PMIX_", "PMI_", "OPAL_", "ORTE_")


def launcher_env(environ: Mapping[str, str] = os.environ) -> dict:
    """The environment for a new launch: ``environ`` (Python's copy, taken at start-up) without
    the variables of any MPI runtime this process belongs to. User settings (``OMPI_MCA_*``) stay."""
    return {k: v for k, v in environ.items() if not k.startswith(MPI_RUNTIME_PREFIXES)}


def running_as_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a process started by mpirun/horovodrun/srun/torchrun (not in a plain shell)."""
    return (any(v in environ for v in RANK_VARS) or "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ
            or "TORCHELASTIC_RUN_ID" in environ)


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
def mpirun_flavour(mpirun: str) -> str:
    """``"openmpi"``, ``"intel"`` or ``"other"`` (e.g. MPICH): whose launcher ``mpirun`` is."""
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    return "openmpi" if ("Open MPI" in out or "OpenRTE" in out) else "intel" if "Intel(R) MPI" in out else "other"


def mpirun_command(np: int, extra: Sequence[str] = ()) -> List[str]:
    """``mpirun -np N`` with what a laptop or CI box needs: oversubscription, no binding, root,
    and (Open MPI) ranks that yield their core while they wait for a message.

    Open MPI spins while it waits, and yields only when it starts more ranks than there are
    cores. But ranks that fill the cores still share them with threads: Horovod's background
    thread runs an MPI collective every cycle, and spinning there it took the core from its
    rank's own work (beside it RPS took up to 4x as long on 2 ranks on 2 cores: docs/benchmarks-history.md).
    A user's ``OMPI_MCA_mpi_yield_when_idle`` (e.g. 0), or the parameter in ``extra`` (e.g. the
    cluster layout's ``mpirun_args``), takes precedence.
    """
    if not isinstance(np, int) or np < 1:
        raise ConfigError("np", np, "an integer >= 1")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise LaunchError("mpirun is not on PATH: run `make setup` (installs Open MPI) or load your MPI module")
    flavour = mpirun_flavour(mpirun)
    if flavour == "intel":  # its mpirun is a sh script that does not pass signals (Slurm's SIGUSR1) on
        mpirun = shutil.which("mpiexec.hydra", path=os.path.dirname(mpirun)) or mpirun
    cmd = [mpirun, "-np", str(np)]
    if flavour == "openmpi":
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if "OMPI_MCA_mpi_yield_when_idle" not in os.environ and not any("mpi_yield_when_idle" in a for a in extra):
            cmd += ["--mca", "mpi_yield_when_idle", "1"]  # (Open MPI refuses a parameter given twice)
        if os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + list(extra)


def srun_command(np: int, extra: Sequence[str] = ()) -> List[str]:
    if shutil.which("srun") is None:
        raise LaunchError("cluster.launcher=srun but srun is not on PATH: run inside a Slurm allocation, "
                          "or use cluster.launcher=mpirun")
    return ["srun", "--mpi=pmix", "-n", str(np), *extra]


def kill_session(sid: int, sig: int = 9) -> int:
    """Signal every process of session ``sid`` (start launches with ``start_new_session=True``).

    Open MPI's mpirun puts each rank in a process group of its own, so killing mpirun's group
    leaves the ranks running until they notice; the session holds them all. Returns how many
    processes were signalled.
    """
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            try:
                os.kill(int(stat.parent.name), sig)
                count += 1
            except ProcessLookupError:
                pass
    return count
