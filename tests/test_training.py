"""The Hydra training app end to end: sweeps, determinism, kill and resume, bad input, data loaders."""
import csv
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_unreliable.errors import ConfigError
from hvd_unreliable.launch import kill_session, launcher_env, mpirun_command
from hvd_unreliable.training.data import _digits_arrays, load_cifar10, load_digits, shard_indices
from hvd_unreliable.training.loop import DETERMINISTIC
from hvd_unreliable.training.models import build_model
from tests.mpirun import ROOT, needs_horovod, run

FAST = ["model=mlp", "optim.epochs=3", "progress=false"]
LAUNCH = Path(mpirun_command(1)[0]).name + " -np"  # how the app's launch line starts ("mpirun -np" with Open MPI)
# Runs that must start: 3 ranks (uneven blocks, two peers each) start in about 10 s here, 4 in 14.
FAST_RUN = [*FAST, "cluster.ranks_per_node=3"]


def train(*overrides, timeout=240, env=None):
    return run([sys.executable, "-m", "hvd_unreliable.train", *overrides], timeout, dict(launcher_env(), **(env or {})))


def metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: r[k] for k in DETERMINISTIC} for r in csv.DictReader(f)]


def test_sweep_runs_one_mpirun_per_job_and_report_draws_the_figure(tmp_path):
    sweep = tmp_path / "sweep"
    rc, out = train("-m", "algorithm=rps,allreduce", "network.arrival_rate=0.8", *FAST_RUN, f"hydra.sweep.dir={sweep}")
    assert rc == 0, out[-3000:]
    assert out.count(f"{LAUNCH} 3") == 2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for j in jobs:
        assert (j / ".hydra" / "config.yaml").is_file() and len(metrics(j)) == 3
        config = json.loads((j / "summary.json").read_text())
        assert config["config"]["servers"] == 3 and config["config"]["seed"] == 0 and config["run"]["optim.lr"] == 0.1
        assert not list(j.glob("rank*.json"))
    # a bursty network beside them: the report gives its chain's long-run arrival rate
    rc, out = train("network=gilbert_elliott", *FAST_RUN, "optim.epochs=1", f"hydra.run.dir={sweep / 'ge'}")
    assert rc == 0, out[-3000:]
    from hvd_unreliable import report

    assert report.main([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert "| rps | 0.80 | 3 | 3 |" in md and "| allreduce | 0.80 | 3 | 3 |" in md
    assert "| rps | 0.94 | 3 | 1 |" in md  # conf/network/gilbert_elliott.yaml: 1 - (10/11 * 0.001 + 1/11 * 0.7)
    assert (sweep / "figure.png").stat().st_size > 10_000


def fake_run(d: Path, seed: int, servers: int, losses, consensus: float, lr=0.1):
    """A finished run's files as the training app writes them, with the given numbers."""
    d.mkdir(parents=True)
    config = {"algorithm": "rps", "network": "bernoulli", "arrival_rate": 0.7, "ranks": 4, "servers": servers,
              "model": "logreg", "data": "digits", "seed": seed}
    identity = {"algorithm.num_servers": servers, "optim.lr": lr, "seed": seed}  # (the summary's "run" is longer)
    rows = [{"epoch": e + 1, "train_loss": x, "test_acc": 0.9, "consensus": consensus} for e, x in enumerate(losses)]
    (d / "summary.json").write_text(json.dumps({"config": config, "final": rows[-1], "run": identity}))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_report_gives_the_mean_over_seeds_and_a_servers_column_where_runs_differ_in_them(tmp_path):
    from hvd_unreliable import report

    fake_run(tmp_path / "a", 0, 4, [1.0, 0.5], 0.2)
    fake_run(tmp_path / "b", 1, 4, [1.0, 0.3], 0.4)
    fake_run(tmp_path / "c", 0, 1, [1.0, 0.6], 0.9)
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| algorithm | arrival rate | ranks | servers | seeds | epochs | final train loss (mean) |" in md
    assert "| rps | 0.70 | 4 | 1 | 1 | 2 | 0.6000 | 0.9000 | 9.00e-01 | 9.00e-01 - 9.00e-01 |" in md
    assert "| rps | 0.70 | 4 | 4 | 2 | 2 | 0.4000 | 0.9000 | 3.00e-01 | 2.00e-01 - 4.00e-01 |" in md
    fake_run(tmp_path / "d", 0, 4, [1.0, 0.8], 0.5, lr=0.01)  # another learning rate: not another seed
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| rps | 0.70 | 4 | 4 | 2 | 2 | 0.4000 |" in md and "| rps | 0.70 | 4 | 4 | 1 | 2 | 0.8000 |" in md
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    single = tmp_path / "single"
    fake_run(single / "a", 0, 4, [1.0, 0.5], 0.2)
    assert report.main([str(single)]) == 0  # one seed, servers = ranks: the usual columns
    assert "| rps | 0.70 | 4 | 2 | 0.5000 | 0.9000 | 2.00e-01 |" in (single / "report.md").read_text()


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        rc, out = train("network.arrival_rate=0.7", "network.packet_bytes=512", *FAST_RUN, f"hydra.run.dir={tmp_path / name}")
        assert rc == 0, out[-3000:]
        runs.append(metrics(tmp_path / name))
    assert runs[0] == runs[1]
    rc, out = train("network.arrival_rate=0.7", "network.packet_bytes=512", "seed=1", *FAST_RUN, f"hydra.run.dir={tmp_path / 'c'}")
    assert rc == 0 and metrics(tmp_path / "c") != runs[0]


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_metrics(tmp_path):
    common = ["network=stragglers", "network.delay.kind=constant", "network.delay.mean=0.03", "algorithm=rps",
              "network.loss.p=0.2", "checkpoint.every_steps=5", *FAST_RUN]
    rc, out = train(*common, f"hydra.run.dir={tmp_path / 'whole'}")
    assert rc == 0, out[-3000:]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hvd_unreliable.train", *common, f"hydra.run.dir={killed}"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 180
    while time.time() < deadline and not (latest.is_file() and int(latest.read_text() or 0) >= 10):
        time.sleep(0.05)
    kill_session(proc.pid)  # the launcher, mpirun and every rank, at once
    proc.wait()
    assert latest.is_file(), (tmp_path / "killed.log").read_text()[-3000:]
    step = int(latest.read_text())
    assert 10 <= step < int(metrics(tmp_path / "whole")[-1]["step"]), "the run must be killed mid-way"
    rc, out = train(*common, f"hydra.run.dir={killed}")
    assert rc == 0, out[-3000:]
    assert f"resumed from step {step}" in out
    assert metrics(killed) == metrics(tmp_path / "whole")
    # the same directory with another learning rate: not a resumption of that run
    rc, out = train(*common, "optim.lr=0.2", f"hydra.run.dir={killed}")
    assert rc == 2 and f"hydra.run.dir='{killed}' is invalid: expected a new directory" in out, out[-3000:]
    assert "optim.lr: 0.1 then, 0.2 now" in out and LAUNCH not in out  # checked before any rank starts


@pytest.mark.parametrize("override,needle", [
    ("network.arrival_rate=1.5", "network.arrival_rate=1.5 is invalid: expected a probability in [0, 1]"),
    ("network=gilbert_elliott network.arrival_rate=0.8",
     "network.arrival_rate=0.8 is invalid: expected 1.0 with this network: its loss model (network.loss.kind=gilbert_elliott) does not read it"),
    ("algorithm.num_servers=9", "algorithm.num_servers=9 is invalid: expected an integer in [1, 4]"),
    ("network.packet_bytes=-3", "network.packet_bytes=-3 is invalid: expected null/0 (whole messages) or a positive"),
    # found by the ranks only (or not at all) before these moved into the config's checks
    ("data.partition=skew", "data.partition='skew' is invalid: expected one of 'iid', 'label_skew'"),
    ("data.test_fraction=1.5", "data.test_fraction=1.5 is invalid: expected a fraction in (0, 1)"),
    ("optim.lr=-1", "optim.lr=-1.0 is invalid: expected a finite number > 0"),  # (it said >= 0, yet refused 0)
    ("eval_every_steps=-1", "eval_every_steps=-1 is invalid: expected 0 (once per epoch) or a number of steps"),
    ("data=synthetic data.num_classes=1", "data.num_classes=1 is invalid: expected an integer >= 2"),
    # a matrix typed with integers composes (0 and 1 failed Hydra's float type), and is checked
    ("network=per_link network.loss.matrix=[[0,1],[0,0]]", "network.loss.matrix='2x2' is invalid: expected a 4x4 matrix"),
    ("network.loss.arrival_rate=0.5", "network.loss.arrival_rate=0.5 is invalid: expected network.arrival_rate (0.9), "
                                      "which it copies: set network.arrival_rate alone"),
    ("algorithm=gossip", "Could not find 'algorithm/gossip'"),
    ("optim.lrr=0.1", "Key 'lrr' not in 'OptimConfig'"),
    ("network.loss.spec='random 5'", None),
])
def test_bad_config_fails_before_any_rank_starts(override, needle, tmp_path):
    if needle is None:  # a spec string is only read with loss.kind=spec
        override, needle = "network=netem", "network.loss.spec='drop 5%' is invalid"
        rc, out = train(override, "network.loss.spec=drop 5%", *FAST, f"hydra.run.dir={tmp_path}")
    else:
        rc, out = train(*override.split(), *FAST, f"hydra.run.dir={tmp_path}")
    assert rc != 0 and needle in out
    assert LAUNCH not in out
    if "is invalid" in needle:  # the plugin's own errors: one line, no traceback
        assert rc == 2 and "Traceback" not in out


def test_a_sweep_with_one_bad_job_fails_before_any_job_starts(tmp_path):
    rc, out = train("-m", "network.arrival_rate=0.5,1.5", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert rc == 2 and "network.arrival_rate=1.5 is invalid" in out and "sweep job #1" in out, out[-3000:]
    assert LAUNCH not in out and not (tmp_path / "0").exists()


def test_layout_asking_for_more_ranks_than_launched_fails_on_every_rank(tmp_path):
    cmd = mpirun_command(2) + [sys.executable, "-m", "hvd_unreliable.train", *FAST, f"hydra.run.dir={tmp_path}"]
    rc, out = run(cmd, 120, launcher_env())
    assert rc != 0
    assert out.count("1 nodes x 4 ranks = 4") == 2 and "the 2 ranks that were launched" in out


@needs_horovod
def test_horovodrun_with_gloo_fails_on_every_rank_naming_the_mpi_launch(tmp_path):
    """horovodrun --gloo starts processes without an MPI world: each must say so, not launch mpirun itself."""
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable,
           "-m", "hvd_unreliable.train", *FAST, "cluster.ranks_per_node=2", f"hydra.run.dir={tmp_path}"]
    rc, out = run(cmd, 120, launcher_env())
    assert rc != 0  # (horovodrun ends the other rank once one fails, so one message may be all it shows)
    assert "horovodrun --gloo starts no MPI world" in out and "launching:" not in out, out[-3000:]


def test_torchrun_fails_on_every_rank_naming_the_mpi_launch(tmp_path):
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m", "hvd_unreliable.train",
           *FAST, "cluster.ranks_per_node=2", f"hydra.run.dir={tmp_path}"]
    rc, out = run(cmd, 120, launcher_env())
    assert rc != 0  # (torchrun, too, ends the other rank once one fails)
    assert "torchrun starts no MPI world" in out and "launching:" not in out, out[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this node has a GPU")
def test_cuda_device_without_a_gpu_fails_on_every_rank_before_any_communication(tmp_path):
    cmd = mpirun_command(2) + [sys.executable, "-m", "hvd_unreliable.train", *FAST, "cluster.ranks_per_node=2",
                               "cluster.device=cuda", f"hydra.run.dir={tmp_path}"]
    rc, out = run(cmd, 120, launcher_env())
    assert rc != 0
    assert out.count("cluster.device='cuda' is invalid: expected 'cpu' (torch sees no CUDA device on this node)") == 2


def write_fake_cifar(root: Path, per_batch=16):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"batch_label": name.encode()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_loader_reads_the_python_pickle_format(tmp_path):
    write_fake_cifar(tmp_path / "cifar")
    d = load_cifar10(str(tmp_path / "cifar"))
    assert d.x_train.shape == (80, 3, 32, 32) and d.x_test.shape == (16, 3, 32, 32) and d.num_classes == 10
    assert d.x_train.dtype == torch.float32 and abs(float(d.x_train.mean())) < 1.0


def test_cifar10_loader_says_where_it_looked_and_what_it_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere.*does not exist"):
        load_cifar10(str(tmp_path / "nowhere"))
    write_fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(ConfigError, match="missing test_batch"):
        load_cifar10(str(tmp_path / "c"))
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="CIFAR-10 pickle"):
        load_cifar10(str(tmp_path / "c"))


def test_resnet20_trains_on_a_fake_cifar_directory_over_two_ranks(tmp_path):
    write_fake_cifar(tmp_path / "cifar")
    rc, out = train("data=cifar10", f"data.root={tmp_path / 'cifar'}", "model=resnet20", "cluster.ranks_per_node=2",
                    "optim.epochs=1", "optim.batch_size=8", "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 0, out[-3000:]
    assert len(metrics(tmp_path / "run")) == 1


# Parameter counts of He et al.'s CIFAR ResNets with option-A shortcuts: 0.27M, 0.85M, 1.7M.
@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet56", 853_018), ("resnet110", 1_727_962),
                                         ("cnn", None), ("mlp", None), ("logreg", 30_730)])
def test_models_build_and_run_without_torchvision(name, params):
    m = build_model(name, (3, 32, 32), 10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    if params:
        assert sum(p.numel() for p in m.parameters()) == params


def test_label_skew_makes_shards_different_and_equal_sized():
    labels = np.repeat(np.arange(10), 100)
    iid = shard_indices(labels, 4, "iid", 0.5, 0)
    skew = shard_indices(labels, 4, "label_skew", 0.1, 0)
    for shards in (iid, skew):
        assert len({len(s) for s in shards}) == 1
        assert len(np.unique(np.concatenate(shards))) == sum(len(s) for s in shards)
    # total-variation distance of a shard's label distribution from the global (uniform) one
    tv = lambda s: 0.5 * np.abs(np.bincount(labels[s], minlength=10) / len(s) - 0.1).sum()
    assert max(tv(s) for s in iid) < 0.1 and min(tv(s) for s in skew) > 0.25


def test_a_step_stuck_longer_than_the_timeout_ends_the_job_naming_the_step(tmp_path):
    start = time.monotonic()
    rc, out = train("network=stragglers", "network.delay.kind=constant", "network.delay.mean=600", "network.timeout=10",
                    *FAST_RUN, f"hydra.run.dir={tmp_path}", timeout=180)
    assert rc != 0
    assert "made no progress" in out and "during step 0" in out and "limit 10s" in out
    assert time.monotonic() - start < 120  # the watchdog, not the 600 s delay, ended it


def test_digits_are_scikit_learns_read_from_the_cache_after_the_first_load(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits as sk_digits

    monkeypatch.setenv("HVDU_CACHE", str(tmp_path))
    first = load_digits()
    cached = list((tmp_path / "data").glob("digits-scikit-learn-*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "data").glob("*.tmp"))
    data, target = _digits_arrays()
    assert np.array_equal(data, sk_digits().data) and np.array_equal(target, sk_digits().target)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # scikit-learn out of reach: the cache serves
    again = load_digits()
    assert all(torch.equal(getattr(again, k), getattr(first, k)) for k in ("x_train", "y_train", "x_test", "y_test"))
    monkeypatch.delitem(sys.modules, "sklearn.datasets")
    cached[0].write_bytes(b"not a NumPy file")  # damaged: loaded from scikit-learn and written again
    assert torch.equal(load_digits().x_train, first.x_train)
    with np.load(cached[0]) as f:
        assert np.array_equal(f["data"], data)
