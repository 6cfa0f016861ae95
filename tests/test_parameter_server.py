"""Paper B's parameter-server variants, run for real (5 ranks: 1 server, 4 learners), judged by
what the server recorded at every update."""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from hvd_unreliable.algorithms.parameter_server import staleness_lr
from hvd_unreliable.launch import kill_session, launcher_env, mpirun_command
from tests.mpirun import ROOT, run_mpi_calls
from tests.test_training import train

COMMON = ["network=stragglers", "network.delay.mean=0.01", "cluster.ranks_per_node=5", "model=logreg",
          "algorithm.updates=40", "progress=false"]


W = "tests.workers.training:"


def updates(run_dir):
    with open(run_dir / "updates.csv") as f:
        rows = list(csv.DictReader(f))
    return [([int(x) for x in r["learners"].split()], [int(x) for x in r["staleness"].split()]) for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four variants and a lossy one with the staleness rule, one after the other on the same
    5 ranks (the app's rank part on each config: starting ranks costs more than these runs; the
    tests below through ``python -m hvd_unreliable.train`` start the app itself)."""
    variants = {"k_sync": 2, "k_batch_sync": 3, "k_async": 2, "k_batch_async": 2, "lossy_staleness": 2}
    extra = {"lossy_staleness": ["algorithm=k_async", "algorithm.lr_rule=staleness", "algorithm.lr_c=0.0001",
                                 "network.loss.p=0.2"]}
    dirs = {v: tmp_path_factory.mktemp(v) for v in variants}
    calls = {v: (W + "parameter_server", {"overrides": extra.get(v, [f"algorithm={v}"]) + [f"algorithm.k={k}", *COMMON],
                                          "out_dir": str(dirs[v])}) for v, k in variants.items()}
    done = run_mpi_calls(5, calls, timeout=300)
    out = {}
    for v, k in variants.items():
        assert done[v][0] == 40, done[v]
        out[v] = (k, updates(dirs[v]), json.loads((dirs[v] / "summary.json").read_text()), dirs[v])
    return out


def test_k_sync_uses_k_fresh_gradients_from_k_distinct_learners(runs):
    k, ups, _, _ = runs["k_sync"]
    assert len(ups) == 40
    for learners, stale in ups:
        assert len(learners) == k and len(set(learners)) == k and stale == [0] * k


def test_k_batch_sync_uses_k_fresh_gradients_from_any_learners(runs):
    k, ups, _, _ = runs["k_batch_sync"]
    for learners, stale in ups:
        assert len(learners) == k and stale == [0] * k and set(learners) <= {1, 2, 3, 4}


def test_k_async_uses_k_distinct_learners_and_stale_gradients(runs):
    k, ups, summary, _ = runs["k_async"]
    for learners, _ in ups:
        assert len(learners) == k and len(set(learners)) == k
    assert max(s for _, stale in ups for s in stale) > 0
    assert sum(v for key, v in summary["ps"]["staleness_histogram"].items() if key != "0") > 0


def test_k_batch_async_uses_any_k_gradients_stale_ones_included(runs):
    k, ups, _, _ = runs["k_batch_async"]
    assert all(len(learners) == k for learners, _ in ups)
    assert max(s for _, stale in ups for s in stale) > 0


def test_lossy_pushes_are_not_counted_and_staleness_rates_stay_capped(runs):
    _, ups, summary, run_dir = runs["lossy_staleness"]
    assert summary["ps"]["lost_pushes"] > 0 and len(ups) == 40
    for learners, _ in ups:
        assert len(set(learners)) == 2
    with open(run_dir / "updates.csv") as f:
        lrs = [float(x) for r in csv.DictReader(f) for x in r["lrs"].split()]
    assert max(lrs) <= 0.1 and min(lrs) < 0.1  # capped at lr_max, smaller once the model moved


def test_every_variant_learns_and_reports_its_time_per_update_next_to_the_theory(runs):
    for variant, (_, _, summary, _) in runs.items():  # (lossy_staleness included)
        ps = summary["ps"]
        assert ps["updates"] == 40 and ps["final_loss"] < 2.3  # below chance level (ln 10)
        assert ps["theory_update_s"] > 0 and ps["mean_update_s"] > 0
        # every learner computed, and its compute is a part of the run's wall-clock time
        assert len(ps["learners"]) == 4
        assert all(c["draws"] > 0 and 0 < c["busy_s"] < ps["wall_s"] for c in ps["learners"]), ps["learners"]


def test_staleness_learning_rate_is_capped_and_shrinks_when_the_model_moved_far():
    w = torch.zeros(10)
    assert staleness_lr(w, w, c=0.01, lr_max=0.1) == 0.1
    near, far = staleness_lr(w, w + 0.01, 0.01, 0.1), staleness_lr(w, w + 1.0, 0.01, 0.1)
    assert near == 0.1 and far == pytest.approx(0.01 / 10) and far < near
    for scale in (1e-6, 1e-2, 1.0, 1e3):
        assert staleness_lr(w, w + scale, 0.01, 0.1) <= 0.1


@pytest.mark.parametrize("override,needle", [
    ("algorithm.k=5", "algorithm.k=5 is invalid: expected an integer in [1, 4]"),
    # settings the server would otherwise ignore without a word
    ("optim=adam", "optim.name='adam' is invalid: expected sgd with algorithm=k_sync"),
    ("optim.weight_decay=0.01", "optim.weight_decay=0.01 is invalid: expected 0 with algorithm=k_sync"),
    ("algorithm.num_servers=2", "algorithm.num_servers=2 is invalid: expected null with algorithm=k_sync"),
    ("eval_every_steps=5", "eval_every_steps=5 is invalid: expected 0 with algorithm=k_sync; set algorithm.eval_every"),
])
def test_ps_rejects_what_it_cannot_honour_before_any_rank_starts(override, needle, tmp_path):
    rc, out = train("algorithm=k_sync", override, *COMMON, f"hydra.run.dir={tmp_path}")
    assert rc == 2 and needle in out and "launching:" not in out, out[-3000:]


def test_adasync_grows_k_as_the_loss_falls(tmp_path):
    rc, out = train("algorithm=k_sync", "algorithm.k=1", "algorithm.adasync_interval=0.05", *COMMON[:-2],
                    "algorithm.updates=120", "optim.lr=0.5", "progress=false", f"hydra.run.dir={tmp_path}")
    assert rc == 0, out[-3000:]
    with open(tmp_path / "updates.csv") as f:
        ks = [int(r["k"]) for r in csv.DictReader(f)]
    assert ks[0] == 1 and ks[-1] >= 2 and max(ks) <= 4  # K0 * sqrt(F(w0)/F(wt)), capped at P


def test_report_tabulates_and_draws_parameter_server_runs(runs, tmp_path):
    from hvd_unreliable import report

    assert report.main([str(d) for *_, d in runs.values()] + ["--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| k_")]
    assert len(rows) == 5
    for variant, (k, _, summary, _) in runs.items():
        ps = summary["ps"]
        name = "k_async" if variant == "lossy_staleness" else variant
        rule, arrival = ("staleness", "0.80") if variant == "lossy_staleness" else ("fixed", "1.00")
        assert f"| {name} | {k} | 4 | {rule} | {arrival} | 40 | {ps['mean_update_s']:.4f} | {ps['theory_update_s']:.4f} |" in md
    assert (tmp_path / "figure_ps.png").stat().st_size > 10_000 and not (tmp_path / "figure.png").exists()


def test_slurms_warning_stops_the_server_which_writes_the_results_it_has(tmp_path):
    """Parameter-server runs keep no checkpoints: at SIGUSR1 (Slurm's warning before the time
    limit, forwarded by mpirun to every rank) the server stops after an update and writes."""
    run = tmp_path / "run"
    overrides = [o for o in COMMON if not o.startswith("algorithm.updates")]
    cmd = mpirun_command(5) + [sys.executable, "-m", "hvd_unreliable.train", "algorithm=k_async", "algorithm.k=2",
                               *overrides, "algorithm.updates=1000000", "checkpoint.every_steps=1", f"hydra.run.dir={run}"]
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120  # every rank has its handler once the server says it serves
        while time.time() < deadline and not any("parameter server serving" in p.read_text() for p in run.glob("*.log")):
            time.sleep(0.5)
        time.sleep(1.0)  # some updates
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    finally:
        kill_session(proc.pid)
    log = (tmp_path / "out.log").read_text()
    assert rc == 0, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())["ps"]
    assert summary["stopped_early"] and 0 < summary["updates"] < 1000000, summary
    assert len(updates(run)) == summary["updates"] and "stopped by SIGUSR1/SIGTERM" in log
