"""Run a worker function on N real MPI ranks and collect what every rank returned.

``run_mpi(4, "tests.workers.transport:exchange_roundtrip", {...})`` starts
``mpirun -np 4 python -m tests.worker ...``; each rank calls the function with the arguments and
writes its JSON-able return value to ``rank<r>.json``. The whole mpirun process group is killed
(mpirun and every rank: its session) when it outlives ``timeout`` and the failure shows the tail of its output.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from hvd_unreliable.launch import kill_session, launcher_env, mpirun_command

ROOT = Path(__file__).resolve().parent.parent
# For the tests of Horovod's side; `make setup` installs Horovod unless HVDU_SKIP_HOROVOD=1.
needs_horovod = pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="Horovod is not installed")


class MpiRunError(AssertionError):
    """mpirun failed, or was killed after its timeout."""


def run_mpi(np: int, target: str, args: Optional[dict] = None, timeout: float = 120,
            env: Optional[dict] = None, expect_failure: bool = False):
    """Run ``target`` ("module:function") on ``np`` ranks; return the list of per-rank results.

    With ``expect_failure`` a non-zero exit is returned as ``(returncode, output)`` instead.
    """
    outdir = tempfile.mkdtemp(prefix="hvdu-mpi-")
    cmd = mpirun_command(np) + [sys.executable, "-m", "tests.worker", target, json.dumps(args or {}), outdir]
    full_env = dict(launcher_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        shutil.rmtree(outdir, ignore_errors=True)
        raise MpiRunError(f"mpirun -np {np} {target} still running after {timeout}s; killed its "
                          f"session (mpirun and every rank). Last output:\n{out[-3000:]}") from None
    try:
        if expect_failure:
            if proc.returncode == 0:
                raise MpiRunError(f"mpirun -np {np} {target} was expected to fail but exited 0:\n{out[-3000:]}")
            return proc.returncode, out
        if proc.returncode != 0:
            raise MpiRunError(f"mpirun -np {np} {target} exited {proc.returncode}. Last output:\n{out[-3000:]}")
        results = []
        for r in range(np):
            path = Path(outdir, f"rank{r}.json")
            if not path.exists():
                raise MpiRunError(f"rank {r} of {target} wrote no result. Output:\n{out[-3000:]}")
            results.append(json.loads(path.read_text()))
        return results
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
