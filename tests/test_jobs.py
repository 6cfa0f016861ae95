"""Slurm job scripts rendered from cluster layouts: static checks, and the submission path end to
end with stand-ins for sbatch/srun/scontrol (tests/fake_slurm/) that run the job on this machine."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from hvd_unreliable.config import slurm_minutes
from hvd_unreliable.errors import ConfigError
from hvd_unreliable.jobs import render
from hvd_unreliable.launch import kill_session, launcher_env, mpirun_flavour
from tests.mpirun import ROOT
from tests.test_training import metrics

GPU_LAYOUT = ["cluster=slurm_gpu_16", "algorithm=rps", "network.arrival_rate=0.9"]
CPU_LAYOUT = ["cluster=slurm_gpu_16", "cluster.nodes=1", "cluster.ranks_per_node=2", "cluster.device=cpu",
              "cluster.gpus_per_node=0", "model=mlp", "optim.epochs=3", "progress=false"]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
@pytest.mark.parametrize("sweep", [False, True])
def test_rendered_scripts_pass_bash_and_shellcheck_and_hold_the_layout(launcher, sweep, tmp_path):
    overrides = GPU_LAYOUT + ["cluster.sbatch_args=['--qos=high','--constraint=a100|h100']"] + (
        ["algorithm=rps,allreduce", "network.arrival_rate=0.6,0.9"] if sweep else [])
    if sweep:
        overrides = [o for o in overrides if o not in ("algorithm=rps", "network.arrival_rate=0.9")]
    script = render(overrides, launcher)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (make test installs it with apt-get)")
    sc = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert sc.returncode == 0, sc.stdout
    for directive in ("--nodes=4", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=12:00:00",
                      "--requeue", "--signal=", "--qos=high", "--constraint=a100|h100"):
        assert f"#SBATCH {directive}" in script
    assert ("srun --mpi=pmix" in script) == (launcher == "srun")
    assert ("--bind-to none --map-by slot" in script) == (launcher == "mpirun")
    assert ("#SBATCH --array=0-3" in script) == sweep
    if sweep:
        assert "0) TASK_OVERRIDES=(algorithm=rps network.arrival_rate=0.6) ;;" in script


def test_render_rejects_bad_layouts_before_writing_anything():
    with pytest.raises(ConfigError, match="network.arrival_rate=2.0"):
        render(GPU_LAYOUT + ["network.arrival_rate=2.0"])
    with pytest.raises(ConfigError, match="--launcher"):
        render(GPU_LAYOUT, launcher="pbs")


def fake_slurm_env(job_id, tmp_path):
    env = launcher_env()
    env.update(PATH=f"{ROOT / 'tests' / 'fake_slurm'}:{env['PATH']}", FAKE_SLURM_JOB_ID=str(job_id),
               FAKE_SLURM_LOG=str(tmp_path / "slurm.log"))
    return env


def submit(overrides, job_id, tmp_path, background=False, launcher="srun"):
    cmd = [sys.executable, "-m", "hvd_unreliable.jobs", "render", "--submit", "--launcher", launcher,
           "--checkpoint-every", "5", "--out", str(tmp_path / f"job{job_id}.sbatch"), *overrides]
    kw = dict(cwd=ROOT, env=fake_slurm_env(job_id, tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=subprocess.STDOUT, text=True)
    if background:
        return subprocess.Popen(cmd, start_new_session=True, **kw)
    return subprocess.run(cmd, timeout=300, **kw)


@pytest.fixture
def job_ids():
    ids = [90000 + os.getpid() % 1000 * 10 + k for k in range(3)]
    yield ids
    for i in ids:
        shutil.rmtree(ROOT / "outputs" / "slurm" / str(i), ignore_errors=True)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_submission_runs_the_job_through_sbatch_and_the_launcher(launcher, job_ids, tmp_path):
    if launcher == "mpirun" and mpirun_flavour(shutil.which("mpirun")) != "openmpi":
        pytest.skip("jobs/mpirun.sbatch passes Open MPI's flags; this mpirun is another MPI's")
    proc = submit(CPU_LAYOUT, job_ids[0], tmp_path, launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"Submitted batch job {job_ids[0]}" in proc.stdout
    assert len(metrics(ROOT / "outputs" / "slurm" / str(job_ids[0]) / "0")) == 3


def test_a_preempted_job_checkpoints_requeues_and_resumes_to_the_same_metrics(job_ids, tmp_path):
    slow = CPU_LAYOUT + ["network=stragglers", "network.delay.kind=constant", "network.delay.mean=0.03"]
    whole = submit(slow, job_ids[0], tmp_path)
    assert whole.returncode == 0, whole.stdout[-3000:]
    run_dir = ROOT / "outputs" / "slurm" / str(job_ids[1]) / "0"
    proc = submit(slow, job_ids[1], tmp_path, background=True)
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.05)
    assert latest.is_file(), "the job never checkpointed"
    # Slurm's warning signal, as `#SBATCH --signal=USR1@120` delivers it to the job step's tasks
    subprocess.run(["pkill", "-USR1", "-f", f"hvd_unreliable.train .*hydra.run.dir={run_dir.relative_to(ROOT)}"])
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "slurm.log").read_text().strip() == f"requeue {job_ids[1]}"
    assert "resumed from step" in out and "preempted: checkpointed step" in out
    assert metrics(run_dir) == metrics(ROOT / "outputs" / "slurm" / str(job_ids[0]) / "0")


def test_submitit_launcher_config_takes_the_layout_from_the_cluster_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = subprocess.run([sys.executable, "-m", "hvd_unreliable.train", "hydra/launcher=submitit_pmix",
                           "cluster=slurm_gpu_16", "cluster.time=1-02:30", "cluster.sbatch_args=['--qos=high','--exclusive']",
                           "--cfg", "all", "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=launcher_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = proc.stdout.split("  launcher:\n", 1)[1]
    for line in ("nodes: 4", "tasks_per_node: 4", "gpus_per_node: 4", "partition: gpu",
                 "- export SLURM_MPI_TYPE=pmix", "SlurmLauncher",
                 "timeout_min: 1590",  # 1 day 2 h 30 min: the layout's limit, not a fixed one
                 "additional_parameters:\n      qos: high\n      exclusive: true"):
        assert line in launcher


@pytest.mark.parametrize("time,minutes", [("30", 30), ("30:30", 31), ("12:00:00", 720), ("1-0", 1440),
                                          ("1-02:30", 1590), ("2-00:00:01", 2881)])
def test_slurm_time_limits_in_every_format_become_minutes(time, minutes):
    assert slurm_minutes(time) == minutes


@pytest.mark.parametrize("overrides,needle", [
    (["optim.lrr=1"], "ConfigCompositionException: Could not override 'optim.lrr'"),
    (["cluster=nope"], "Could not find 'cluster/nope'"),
    (["network=gilbert_elliott", "network.arrival_rate=0.9"], "network.arrival_rate=0.9 is invalid: expected 1.0"),
    (["--launcher", "pbs"], "--launcher='pbs' is invalid: expected 'srun' or 'mpirun'"),
    (["cluster.time=12h"], "cluster.time='12h' is invalid: expected a Slurm time limit: MM, MM:SS, HH:MM:SS"),
    (["cluster.sbatch_args=['qos=high']"], "cluster.sbatch_args='qos=high' is invalid: expected sbatch long options"),
])
def test_render_command_names_a_bad_override_in_one_message_and_writes_nothing(overrides, needle, tmp_path):
    out = tmp_path / "job.sbatch"
    proc = subprocess.run([sys.executable, "-m", "hvd_unreliable.jobs", "render", "--out", str(out), *GPU_LAYOUT, *overrides],
                          cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_render_sweeps_in_hydra_grammar_and_each_array_task_gets_its_overrides_whole():
    script = render(GPU_LAYOUT + ["seed=range(0,3)", "network=netem", "network.arrival_rate=1.0",
                                  "network.loss.spec='random 5%','random 10%'"])
    assert "#SBATCH --array=0-5" in script
    case = script[script.index("case "):script.index("esac") + 4]
    for task, expected in ((0, ["seed=0", "network.loss.spec='random 5%'"]), (5, ["seed=2", "network.loss.spec='random 10%'"])):
        out = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID={task}\n{case}\nprintf '%s\\n' \"${{TASK_OVERRIDES[@]}}\""],
                             capture_output=True, text=True, check=True).stdout
        assert out.splitlines() == expected
