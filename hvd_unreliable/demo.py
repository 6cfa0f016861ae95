"""``make demo``: a short training comparison over a lossy network, on 4 ranks of this machine.

Trains the small CNN on scikit-learn's digits three ways -- RPS and gradient allreduce over
links that drop 10% of messages, and the reliable baseline -- one ``mpirun -np 4`` per job via a
Hydra sweep, then prints the comparison table (``python -m hvd_unreliable.report``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from . import report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--np", type=int, default=4, help="ranks per job")
    ap.add_argument("--arrival-rate", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = ap.parse_args(argv)
    sweep = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [sys.executable, "-m", "hvd_unreliable.train", "-m", "algorithm=rps,allreduce,reliable",
           f"network.arrival_rate={args.arrival_rate}", f"optim.epochs={args.epochs}",
           f"cluster.ranks_per_node={args.np}", "progress=false", f"hydra.sweep.dir={sweep}"]
    print("$ python", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    if rc != 0:  # the training app has said why
        return rc
    print(f"\n== {args.np} ranks, digits, small CNN, {args.epochs} epochs, "
          f"{100 * args.arrival_rate:.0f}% arrival ({time.time() - t0:.0f}s)\n", flush=True)
    return report.main([str(sweep)])


if __name__ == "__main__":
    sys.exit(main())
