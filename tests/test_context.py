"""The communication context: backends, Horovod sharing the mpi4py world, launch mistakes."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_unreliable.errors import ConfigError, LaunchError
from hvd_unreliable.integration.context import check_launch
from hvd_unreliable.integration.watchdog import Watchdog
from hvd_unreliable.launch import launcher_env, mpirun_command, mpirun_flavour
from hvd_unreliable.transport.cuda import mpi_cuda_aware
from tests.mpirun import ROOT, needs_horovod, run, run_mpi, run_mpi_calls


@needs_horovod
def test_horovod_shares_the_mpi_world_with_mpi4py():
    res = run_mpi(4, "tests.workers.context:describe", {"backend": "horovod"})
    for r, out in enumerate(res):
        assert out["backend"] == "horovod"
        assert (out["rank"], out["size"], out["hvd_rank"], out["hvd_size"]) == (r, 4, r, 4)
        assert out["hvd_sum"] == 10.0  # 1 + 2 + 3 + 4
        assert (out["local_rank"], out["local_size"]) == (r, 4)


def test_mpi4py_backend_without_horovod():
    res = run_mpi(2, "tests.workers.context:describe", env={"HVDU_BACKEND": "mpi4py"})
    assert [(o["backend"], o["rank"], o["size"]) for o in res] == [("mpi4py", 0, 2), ("mpi4py", 1, 2)]
    assert [o["cuda_aware"] for o in res] == [mpi_cuda_aware({})] * 2
    gpus = torch.cuda.device_count()  # each rank's GPU: its local rank modulo the node's GPUs
    expected = [f"cuda:{r % gpus}" if gpus else f"rank {r}: torch sees no CUDA device on this node" for r in range(2)]
    assert [o["cuda_device"] for o in res] == expected
    if mpirun_flavour(shutil.which("mpirun")) == "openmpi":  # ranks yield their core while they wait
        assert [o["yield_when_idle"] for o in res] == ["1", "1"]


def test_a_users_yield_setting_is_left_to_open_mpi(monkeypatch):
    mine = ["--mca", "mpi_yield_when_idle", "0"]  # e.g. a cluster layout's mpirun_args
    assert mpirun_command(2, mine).count("mpi_yield_when_idle") == 1  # (Open MPI refuses it twice)
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "0")
    assert "mpi_yield_when_idle" not in mpirun_command(2)  # the environment's 0 reaches the ranks


@pytest.mark.skipif(shutil.which("ompi_info") is None, reason="not Open MPI")
def test_cuda_awareness_is_what_the_open_mpi_library_reports():
    """The run-time query agrees with the library's own CUDA-support parameter."""
    info = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True, timeout=60).stdout
    enabled = "mca:opal:base:param:opal_cuda_support:value:true" in info
    assert "opal_cuda_support:value:" in info
    assert mpi_cuda_aware({}) is enabled


def test_cuda_awareness_override_and_its_bad_values():
    assert mpi_cuda_aware({"HVDU_CUDA_AWARE": "1"}) is True
    assert mpi_cuda_aware({"HVDU_CUDA_AWARE": "0"}) is False
    with pytest.raises(ConfigError, match=r"HVDU_CUDA_AWARE='yes' .*'0', '1'"):
        mpi_cuda_aware({"HVDU_CUDA_AWARE": "yes"})
    res = run_mpi(2, "tests.workers.context:init_error", env={"HVDU_CUDA_AWARE": "true"})
    assert all("HVDU_CUDA_AWARE='true'" in r["error"] for r in res)


@pytest.mark.parametrize("var", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_launcher_says_n_but_mpi_sees_one_is_a_launch_error(var):
    with pytest.raises(LaunchError, match=rf"{var}=8 .*world of size 1.*srun --mpi=pmix"):
        check_launch(1, {var: "8"})
    check_launch(8, {var: "8"})
    check_launch(1, {var: "1"})


def test_torchrun_is_told_to_launch_with_mpi_and_a_stray_world_size_is_not_read():
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=2 .*world of size 1.*torchrun starts no MPI world.*mpirun -np 2"):
        check_launch(1, {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"})
    check_launch(1, {"WORLD_SIZE": "2"})  # not from torchrun: a singleton run with another tool's setting


@needs_horovod
def test_a_horovod_script_under_horovodrun_gloo_is_told_to_launch_with_mpi():
    """Horovod itself runs over Gloo there; the plugin's transport has no MPI world to use."""
    code = "import horovod.torch as hvd, hvd_unreliable as hu; hvd.init(); hu.context()"
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           sys.executable, "-c", code]
    rc, out = run(cmd, 120, dict(launcher_env(), PYTHONPATH=str(ROOT)))
    # (horovodrun ends the other rank once one fails, so one message may be all it shows)
    assert rc != 0 and "LaunchError: HOROVOD_SIZE=2 says 2 processes were launched" in out, out[-3000:]
    assert "horovodrun --mpi -np 2" in out


def test_srun_without_pmix_fails_at_init_with_the_fix():
    """A singleton process that the environment says is one of 4 tasks (srun without PMIx)."""
    code = "import hvd_unreliable as hu; hu.init(backend='mpi4py')"
    env = dict(launcher_env(), SLURM_NTASKS="4", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "LaunchError" in proc.stderr and "SLURM_NTASKS=4" in proc.stderr and "--mpi=pmix" in proc.stderr


def test_unknown_backend_is_rejected():
    code = "import hvd_unreliable as hu; hu.init(backend='nccl')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(launcher_env(), PYTHONPATH=str(ROOT)))
    assert "HVDU_BACKEND='nccl'" in proc.stderr and "'mpi4py'" in proc.stderr


@pytest.mark.parametrize("backend", ["mpi4py", pytest.param("horovod", marks=needs_horovod)])
def test_watchdog_ends_a_job_stuck_in_mismatched_collectives(backend):
    rc, out = run_mpi(3, "tests.workers.context:watchdog_mismatched_collectives", {"timeout": 2, "backend": backend},
                      timeout=90, expect_failure=True)
    assert rc == Watchdog.EXIT_CODE
    assert "made no progress" in out and "during step 3 (test)" in out and "limit 2s" in out


def test_watchdog_stays_quiet_while_ranks_make_progress():
    res = run_mpi(2, "tests.workers.context:watchdog_quiet_while_progressing", {"timeout": 1.0, "seconds": 4.0})
    assert res[0]["steps"] == res[1]["steps"] >= 10  # 4 s at one step per 0.2 s, well past the 1 s limit


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "5", True])
def test_watchdog_rejects_a_bad_timeout(bad):
    with pytest.raises(ConfigError, match="^timeout=.* is invalid"):
        Watchdog(bad)


@pytest.fixture(scope="module")
def horovod_scripts():
    """One launch of 3 ranks for the two Horovod scripts below."""
    return run_mpi_calls(3, {name: (f"tests.workers.context:{name}", {})
                             for name in ("horovod_script", "horovod_on_part_of_the_world")}, timeout=180)


@needs_horovod
def test_a_horovod_script_switches_by_changing_the_optimizer_only(horovod_scripts):
    res = horovod_scripts["horovod_script"]
    for me, r in enumerate(res):
        assert "hvd_unreliable.init() has not been called" in r["before_init"]
        assert r["backend"] == "horovod" and r["rank"] == r["hvd_rank"] == me
        assert r["lost"] > 0 and r["consensus"] < 1e-3, r  # RPS over 20% loss keeps the replicas together
        assert r["metric"] == res[0]["metric"]


@needs_horovod
def test_horovod_on_part_of_the_world_needs_an_explicit_communicator(horovod_scripts):
    res = horovod_scripts["horovod_on_part_of_the_world"]
    assert "2 of 3 ranks" in res[0]["error"] and "1 of 3 ranks" in res[2]["error"], res
    assert "hvd_unreliable.init(comm)" in res[0]["error"]
