"""Run worker functions on N real MPI ranks and collect what every rank returned.

``run_mpi(4, "tests.workers.transport:exchange_roundtrip", {...})`` starts
``mpirun -np 4 python -m tests.worker ...``; each rank calls the function with the arguments and
writes its JSON-able return value to ``rank<r>.json``. ``run_mpi_calls`` runs several such calls
in one launch: starting a rank (MPI_Init, importing torch and Horovod, which imports
``torch._dynamo`` when it builds an optimizer) takes seconds, longer than most checks, so the checks
of a module that need no process of their own share one launch (module-scoped fixtures), as
mpi4py's own suite runs under one mpiexec. The whole mpirun process group is killed (mpirun and
every rank: its session) when it outlives ``timeout`` and the failure shows the tail of its output.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from hvd_unreliable.launch import kill_session, launcher_env, mpirun_command

ROOT = Path(__file__).resolve().parent.parent
# For the tests of Horovod's side; `make setup` installs Horovod unless HVDU_SKIP_HOROVOD=1.
HOROVOD = importlib.util.find_spec("horovod") is not None
needs_horovod = pytest.mark.skipif(not HOROVOD, reason="Horovod is not installed")


class MpiRunError(AssertionError):
    """mpirun failed, or was killed after its timeout."""


def run(cmd: List[str], timeout: float, env: dict) -> Tuple[int, str]:
    """Run a launch (``cmd``) in a session of its own; ``(returncode, output)``. Past ``timeout``
    the whole session (the launcher, mpirun and every rank) is killed and the test fails; so is
    it when the wait is interrupted (Ctrl-C, pytest-timeout's limit per test)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise MpiRunError(f"{' '.join(cmd[:6])} ... still running after {timeout}s; killed its session "
                          f"(the launcher, mpirun and every rank). Last output:\n{out[-3000:]}") from None
    except BaseException:
        kill_session(proc.pid)
        proc.wait(timeout=30)  # (reaped: SIGKILL leaves it no choice)
        raise
    return proc.returncode, out


def run_mpi(np: int, target: str, args: Optional[dict] = None, timeout: float = 120,
            env: Optional[dict] = None, expect_failure: bool = False):
    """Run ``target`` ("module:function") on ``np`` ranks; return the list of per-rank results.

    With ``expect_failure`` a non-zero exit is returned as ``(returncode, output)`` instead.
    """
    got = run_mpi_calls(np, {target: (target, args or {})}, timeout, env, expect_failure)
    return got if expect_failure else got[target]


def run_mpi_calls(np: int, calls: Dict[str, Tuple[str, dict]], timeout: float = 120, env: Optional[dict] = None,
                  expect_failure: bool = False):
    """Run ``calls`` (name -> ("module:function", arguments)) one after the other in one launch of
    ``np`` ranks; return name -> the list of per-rank results (or, with ``expect_failure``,
    ``(returncode, output)``). A call that raises fails the launch, naming the call."""
    outdir = tempfile.mkdtemp(prefix="hvdu-mpi-")
    cmd = mpirun_command(np) + [sys.executable, "-m", "tests.worker", json.dumps(calls), outdir]
    what = f"mpirun -np {np} {' '.join(calls)}"
    full_env = dict(launcher_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    try:
        returncode, out = run(cmd, timeout, full_env)
    except MpiRunError:
        shutil.rmtree(outdir, ignore_errors=True)
        raise
    reports = sorted(Path(outdir).glob("error*.txt"))  # what failing ranks wrote, also where the launcher lost their output
    if reports:
        out += "\n-- the failing ranks' reports --\n" + "".join(p.read_text() for p in reports)
    try:
        if expect_failure:
            if returncode == 0:
                raise MpiRunError(f"{what} was expected to fail but exited 0:\n{out[-3000:]}")
            return returncode, out
        if returncode != 0:
            raise MpiRunError(f"{what} exited {returncode}. Last output:\n{out[-3000:]}")
        results = []
        for r in range(np):
            path = Path(outdir, f"rank{r}.json")
            if not path.exists():
                raise MpiRunError(f"rank {r} of {what} wrote no result. Output:\n{out[-3000:]}")
            results.append(json.loads(path.read_text()))
        return {name: [rank[name] for rank in results] for name in calls}
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
