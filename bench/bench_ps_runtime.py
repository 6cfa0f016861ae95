"""Paper B on real MPI: time per update of every parameter-server variant against the theory,
and error vs wall-clock time.

    python bench/bench_ps_runtime.py [--learners 8] [--mean 0.05] [--budget 8] [--out docs/paper_b]

Runs ``python -m hvd_unreliable.train`` with P learners (P + 1 ranks, oversubscribed),
exponential straggler delays of mean ``--mean`` seconds per mini-batch on top of real compute
(logistic regression on digits, so compute is small against the delay), each variant for about
``--budget`` seconds of training. Prints measured vs expected E[T] per update (Paper B's
formulas, hvd_unreliable.theory) for runtimes = the injected delay, and for runtimes = the
learners' measured compute per mini-batch (the shift) + the delay, writes
bench/results/ps_runtime.json, and draws training loss vs wall-clock time for K-sync
(K = 2, 4, P) and Async (K-async, K = 1) to OUT/figure.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from common import ROOT, table, write

from hvd_unreliable.launch import launcher_env
from hvd_unreliable.report import ps_figure
from hvd_unreliable.theory import expected_time, simulate


def run(variant: str, k: int, P: int, mean: float, budget: float, out: Path) -> dict:
    expected = expected_time(variant, P, k, mean)
    updates = max(20, min(600, int(math.ceil(budget / expected))))
    run_dir = out / f"{variant}_k{k}"
    cmd = [sys.executable, "-m", "hvd_unreliable.train", f"algorithm={variant}", f"algorithm.k={k}",
           "network=stragglers", f"network.delay.mean={mean}", f"cluster.ranks_per_node={P + 1}", "model=logreg",
           f"algorithm.updates={updates}", f"algorithm.eval_every={max(1, updates // 40)}", "optim.lr=0.2",
           "progress=false", f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())["ps"]
    with open(run_dir / "evals.csv") as f:
        evals = [{k_: float(v) for k_, v in r.items()} for r in csv.DictReader(f)]
    learners = summary["learners"]
    compute = sum(c["busy_s"] for c in learners) / max(1, sum(c["draws"] for c in learners))
    with_compute = expected_time(variant, P, k, mean, shift=compute)
    if with_compute is None:  # no closed form with a shift: the queueing model's simulator
        with_compute = simulate(variant, P, k, mean, shift=compute)["mean"]
    return {"variant": variant, "K": k, "P": P, "updates": summary["updates"],
            "measured_s": summary["mean_update_s"], "theory_s": expected,
            "ratio": summary["mean_update_s"] / expected, "compute_ms": compute * 1e3,
            "theory_with_compute_s": with_compute, "ratio_with_compute": summary["mean_update_s"] / with_compute,
            "final_loss": summary["final_loss"],
            "staleness_mean": sum(int(s) * c for s, c in summary["staleness_histogram"].items())
            / max(1, sum(summary["staleness_histogram"].values())), "evals": evals}


def figure(rows, path: Path, P: int) -> None:
    """Paper B's figure: K-sync for every K run, and Async (K-async with K = 1)."""
    curves = [("Async (K-async, K=1)" if r["variant"] == "k_async" else
               f"fully sync (K={r['K']})" if r["K"] == P else f"K-sync, K={r['K']}", r["evals"])
              for r in rows if r["variant"] == "k_sync" or (r["variant"] == "k_async" and r["K"] == 1)]
    ps_figure(curves, path, f"{P} learners, exponential delays")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learners", type=int, default=8)
    ap.add_argument("--mean", type=float, default=0.05)
    ap.add_argument("--budget", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "paper_b")
    args = ap.parse_args()
    P = args.learners
    runs_dir = ROOT / "outputs" / "paper_b"
    configs = [("k_sync", 2), ("k_sync", P // 2), ("k_sync", P), ("k_batch_sync", P // 2),
               ("k_async", 1), ("k_async", P // 2), ("k_batch_async", P // 2)]
    rows = [run(v, k, P, args.mean, args.budget, runs_dir) for v, k in configs]
    print(table(rows, ["variant", "K", "P", "updates", "measured_s", "theory_s", "ratio", "compute_ms",
                       "theory_with_compute_s", "ratio_with_compute", "staleness_mean", "final_loss"]))
    path = write("ps_runtime", {"command": "python bench/bench_ps_runtime.py " + " ".join(sys.argv[1:]),
                                "rows": [{k: v for k, v in r.items() if k != "evals"} for r in rows]})
    args.out.mkdir(parents=True, exist_ok=True)
    figure(rows, args.out / "figure.png", P)
    print(f"\nwrote {path} and {args.out / 'figure.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
