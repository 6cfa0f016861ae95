"""Round times over a long run: the pauses that medians of short runs hide.

    python bench/bench_long_run.py [--np 4] [--steps 3000] [--mib 1] [--p 0.1] [--runs N] [--against REV]

RPS rounds (``rps_average`` of one float32 tensor of ``--mib`` MiB) at loss ``p``, steps 0 to
``--steps`` - 1 on one transport, one after another as training runs them (Bernoulli decides
messages in C one step at a time, or without the extension (``HVDU_NATIVE=0``) 1024 steps at a
time with NumPy: a long run crosses several of those windows). Rank 0 reports
its rounds' mean, median, 99th percentile and maximum (every rank waits for the slowest, so one
rank's pause is everyone's) and Python's full (generation 2) garbage collections during the
rounds: how many, and their pauses in total. ``--runs N`` launches it N times; ``--against REV``
runs the same with the package as it is at git revision REV in launches of their own, taking
turns with this tree's (one launch per package at a time: a collection in either would pause
the other in a shared process). Launches follow one another, so compare medians too: this
machine's state moves between launches. Prints a table, writes bench/results/long_run.json.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

from common import (add_against_arguments, load_reference, reference_rank_args, run_ranks, runs_count, save_rank_rows,
                    table, write)


def rank_main(out: str, steps: int, mib: int, p: float, reference=None) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    if reference is None:
        from hvd_unreliable.algorithms import rps_average
        from hvd_unreliable.faults import Bernoulli
        from hvd_unreliable.transport import Transport
    else:
        rps_average, Bernoulli, Transport = (reference.algorithms.rps_average, reference.faults.Bernoulli,
                                             reference.transport.Transport)
    comm = MPI.COMM_WORLD
    transport = Transport(comm, Bernoulli(p), seed=0)
    params = [torch.randn(mib * 2**18, generator=torch.Generator().manual_seed(comm.Get_rank()))]
    pauses, started = [], [0.0]

    def collected(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses.append(time.perf_counter() - started[0])

    times = np.empty(steps)
    comm.Barrier()
    gc.callbacks.append(collected)
    for step in range(steps):
        transport.set_step(step)
        t0 = time.perf_counter()
        rps_average(params, transport)
        times[step] = time.perf_counter() - t0
    gc.callbacks.remove(collected)
    save_rank_rows(out, {"mean_ms": 1e3 * times.mean(), "median_ms": 1e3 * float(np.median(times)),
                         "p99_ms": 1e3 * float(np.percentile(times, 99)), "max_ms": 1e3 * times.max(),
                         "slowest_step": int(times.argmax()), "full_gcs": len(pauses),
                         "full_gc_pause_ms": 1e3 * sum(pauses)}, comm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--mib", type=int, default=1)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--runs", type=runs_count, default=1, help="launches (per package)")
    add_against_arguments(ap)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank, args.steps, args.mib, args.p,
                  args.reference_dir and load_reference(args.reference_dir, ("algorithms", "faults", "transport")))
        return 0
    rank_args = ["--steps", str(args.steps), "--mib", str(args.mib), "--p", str(args.p)]
    rows = []
    with reference_rank_args(args.against) as reference:
        for run in range(1, args.runs + 1):
            rows.append(dict(run=run, package="this tree", **run_ranks(__file__, args.np, rank_args)))
            if args.against:
                rows.append(dict(run=run, package=args.against, **run_ranks(__file__, args.np, rank_args + reference)))
    cols = ["run", "package", "mean_ms", "median_ms", "p99_ms", "max_ms", "slowest_step", "full_gcs", "full_gc_pause_ms"]
    print(f"{args.np} ranks, {args.steps} RPS rounds of {args.mib} MiB at p = {args.p}:")
    print(table(rows, cols))
    path = write("long_run", {"command": "python bench/bench_long_run.py " + " ".join(sys.argv[1:]), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
