"""RPS averaging and lossy allreduce against Horovod's allreduce and plain MPI.Allreduce.

    python bench/bench_ops.py [--np 2 4] [--max-mib 64] [--device cpu|cuda] [--runs N] [--warmup ROUNDS] [--against REV]

Float32 tensors from 1 KiB to 64 MiB, and the parameter list of a ResNet-110 (about 330
tensors, 1.7 M parameters: tensor fusion), as separate tensors (copied into a fusion buffer and
back) and laid out by ``fusion.pack`` as ``DistributedOptimizer(mode="rps")`` does (no copy),
at 2 and 4 ranks, in two runs per world size:

* with Horovod initialised: ``hvd.grouped_allreduce(op=Average)`` and ``rps_average`` at p = 0
  (Horovod's background thread runs in every rank, as it does for a Horovod user);
* on mpi4py alone: ``MPI.Allreduce`` (sum + divide, in place on a NumPy view of the same
  memory ``rps_average`` works on), for separate tensors also with the copies around it that
  ``rps_average`` makes (``mpi_fused``: ``fusion.fuse`` copies them into the fusion buffer and
  back out; where the tensors are one buffer already it is ``MPI.Allreduce`` itself),
  ``rps_average`` at p = 0 and p = 0.1 and ``lossy_allreduce`` at p = 0, without that thread
  competing for the cores.

Within each run the operations are measured in turn in every round (after ``--warmup`` untimed
rounds, 1 by default), and each ratio compares operations of the same run. The first time a
rank's exchange loses a given set of links it sets that round up, in Python (the transport's
``_Round.build``). On 4 ranks (6 links an exchange) at p = 0.1, the sets lost with probability
above 1e-3 (one or two links) have almost all occurred within a thousand rounds, so
``--warmup 1000`` times p = 0.1 as a long training run sees it, and the default as its first
rounds do; on many ranks few rounds lose the same links, and most are set up anew.

Algorithm bandwidth = bytes / time. ``p0.1 per sent byte`` = the p = 0.1 / p = 0 time ratio
divided by the share of RPS's bytes that p = 0.1 actually sent (1.0: time in proportion to the
bytes on the wire). ``p0.1 per busiest byte`` divides it instead by
the share left of what the busiest rank receives (from the loss decisions of the timed rounds:
in each of RPS's two exchanges the rank that receives the most bytes, summed over both, relative
to a round that loses nothing): a synchronous exchange ends when its busiest rank is done.
``--runs N`` repeats everything and also prints the ratios (and MPI's time in ms) of every run
side by side. With ``--device cuda`` the tensors live on each rank's GPU (local rank): Horovod
averages them where it was built to (NCCL), RPS stages them through pinned host memory or hands
them to a CUDA-aware MPI, and ``MPI.Allreduce`` runs on the host copy RPS stages into (plain MPI
without the copies); every timed call ends with ``torch.cuda.synchronize()``. NCCL wants a GPU
per rank: where ranks share a GPU, measure with ``--no-hvd`` (the mpi4py run alone; automatic
where Horovod is not importable). ``--against REV`` also times ``rps_average`` at p = 0 and 0.1
of the package as it is at git revision REV in the mpi4py run, in the same rounds:
``rps_vs_reference`` and ``rps_p0.1_vs_reference`` = this tree's time / REV's time. Prints a table, writes bench/results/ops.json.
"""
from __future__ import annotations

import sys

from common import (add_against_arguments, interleaved_times, load_reference, reference_rank_args, report_runs,
                    run_ranks, runs_count, save_rank_rows, size_label, warm_up, whole_number)


def rank_main(out: str, max_mib: int, backend: str, device_kind: str, warmup: int, reference=None) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    import hvd_unreliable as hu
    from hvd_unreliable.algorithms import lossy_allreduce, rps_average
    from hvd_unreliable.algorithms.fusion import fuse, pack
    from hvd_unreliable.faults import Bernoulli
    from hvd_unreliable.training.models import build_model
    from hvd_unreliable.transport import Transport

    ctx = hu.init(backend=backend)
    hvd, comm = ctx.hvd, ctx.comm
    n = comm.Get_size()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = hu.cuda_device()
        torch.cuda.set_device(device)
    cases = []
    size = 2**10
    while size <= max_mib * 2**20:
        cases.append((size_label(size), [torch.rand(size // 4, device=device)]))
        size *= 4
    resnet = build_model("resnet110", (3, 32, 32), 10).to(device)
    cases.append(("resnet110 params", [p.detach().clone() for p in resnet.parameters()]))
    packed = [p.detach().clone() for p in resnet.parameters()]
    pack(packed)  # as DistributedOptimizer(mode="rps") lays out a model's parameters
    cases.append(("resnet110 packed", packed))
    t0, t1 = Transport(comm, Bernoulli(0.0), seed=1), Transport(comm, Bernoulli(0.1), seed=1)
    if reference is not None and backend != "horovod":  # rps_average of the package at another revision
        ref_rps = reference.algorithms.rps_average
        ref_t0, ref_t1 = (reference.transport.Transport(comm, reference.faults.Bernoulli(p), seed=1) for p in (0.0, 0.1))
    rows = []
    for label, tensors in cases:
        nbytes = sum(t.numel() * 4 for t in tensors)
        # In place on the memory RPS works on: the tensors themselves where they form one buffer,
        # else the fusion buffer RPS copies them into.
        groups = fuse(tensors)
        flat = groups[0].flat.numpy()
        copied = not all(group.aliased for group in groups)  # separate tensors: RPS copies them in and out

        def mpi_allreduce():
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            np.divide(flat, n, out=flat)

        def mpi_allreduce_fused():  # the same on the tensors as RPS takes them: copied into the fusion buffer and out
            for group in fuse(tensors):
                buf = group.flat.numpy()
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
                np.divide(buf, n, out=buf)
                group.store()

        def stepped(fn, t):
            def run():
                t.set_step(t.step + 1)
                fn(tensors, t)
            return run

        if backend == "horovod":
            fns = {"hvd_allreduce_s": lambda: hvd.grouped_allreduce(tensors, op=hvd.Average),
                   "rps_p0_beside_hvd_s": stepped(rps_average, t0)}
        else:
            fns = {"mpi_allreduce_s": mpi_allreduce, **({"mpi_fused_s": mpi_allreduce_fused} if copied else {}),
                   "rps_p0_s": stepped(rps_average, t0),
                   "rps_p0.1_s": stepped(rps_average, t1), "lossy_allreduce_p0_s": stepped(lossy_allreduce, t0)}
            if reference is not None:
                fns.update({"rps_p0_reference_s": stepped(ref_rps, ref_t0), "rps_p0.1_reference_s": stepped(ref_rps, ref_t1)})
        if device.type == "cuda":  # time the work, not its launch
            fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
        warm_up(fns, warmup)  # (before the loss counts of the timed rounds start)
        before, first_step = dict(t1.stats.counters), t1.step + 1
        times = interleaved_times(fns, comm, 30 if nbytes <= 2**22 else 11, warmup=0)
        if backend != "horovod":  # the share of RPS's bytes that p = 0.1 put on the wire
            if not copied:  # one buffer already: MPI.Allreduce on it is all there is to do
                times["mpi_fused_s"] = times["mpi_allreduce_s"]
            sent, lost = (comm.allreduce(t1.stats.counters[k] - before[k]) for k in ("bytes_sent", "bytes_lost"))
            times["sent_fraction_p0.1"] = (sent - lost) / sent
            times["busiest_fraction_p0.1"] = busiest_fraction(t1, range(first_step, t1.step + 1), nbytes)
        rows.append({"ranks": n, "device": device.type, "size": label, "bytes": nbytes, "tensors": len(tensors), **times})
    save_rank_rows(out, rows, comm)
    hu.shutdown()


def busiest_fraction(transport, steps, nbytes: int) -> float:
    """The mean over ``steps`` of the bytes the busiest rank receives in an RPS round (the most any
    rank receives in the reduce-scatter plus the most in the all-gather) with ``transport``'s loss
    decisions, over the same with no loss. Every server serves one block (``num_servers`` = n)."""
    from hvd_unreliable.algorithms.blockwise import ALL_GATHER, REDUCE_SCATTER, partition

    n = transport.size
    block = 4 * partition(nbytes // 4, n)  # bytes of server j's block (float32)
    links = [(i, j) for i in range(n) for j in range(n) if i != j]  # i sends to j
    srcs, dsts = [i for i, _ in links], [j for _, j in links]

    def busiest(step, phase, lossless=False):
        lost = ([False] * len(links) if lossless
                else transport.loss.lost_messages(step, phase, srcs, dsts, transport.seed, 0))
        got = [0] * n
        for (i, j), gone in zip(links, lost):  # reduce-scatter: j's block; all-gather: i's block
            got[j] += 0 if gone else int(block[j] if phase == REDUCE_SCATTER else block[i])
        return max(got)

    full = busiest(0, REDUCE_SCATTER, True) + busiest(0, ALL_GATHER, True)
    return sum(busiest(s, REDUCE_SCATTER) + busiest(s, ALL_GATHER) for s in steps) / (len(steps) * full)


def main() -> int:
    import argparse
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--np", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-mib", type=whole_number("--max-mib"), default=64)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--runs", type=runs_count, default=1, help="repeat everything; prints the ratios of every run side by side")
    ap.add_argument("--warmup", type=whole_number("--warmup"), default=1, metavar="ROUNDS",
                    help="untimed rounds of every operation before the timed ones (default 1)")
    ap.add_argument("--no-hvd", action="store_true",
                    help="skip the run with Horovod (automatic where Horovod is not importable)")
    add_against_arguments(ap)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank[0], args.max_mib, args.rank[1], args.device, args.warmup,
                  args.reference_dir and load_reference(args.reference_dir, ("algorithms", "faults", "transport")))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device on this machine")
    with_hvd = not args.no_hvd
    if with_hvd and importlib.util.find_spec("horovod") is None:
        print("Horovod is not importable here: measuring without it (as with --no-hvd)")
        with_hvd = False
    with reference_rank_args(args.against) as reference:
        runs = measure(args, with_hvd, reference)
    hvd_cols = ["hvd_allreduce_s", "rps_p0_beside_hvd_s", "rps_p0_vs_hvd", "hvd_GBps"]
    cols = ["ranks", "device", "size", "hvd_allreduce_s", "rps_p0_beside_hvd_s", "rps_p0_vs_hvd", "mpi_allreduce_s", "rps_p0_s",
            "rps_p0_vs_mpi", "rps_p0_vs_mpi_fused", "rps_p0.1_s", "rps_p0.1_vs_p0", "p0.1_per_sent_byte_vs_p0", "p0.1_per_busiest_byte_vs_p0", "lossy_allreduce_p0_s", "rps_p0_GBps", "hvd_GBps"]
    compared = ["rps_p0_vs_mpi", "rps_p0_vs_mpi_fused", "rps_p0_vs_hvd", "p0.1_per_sent_byte_vs_p0", "p0.1_per_busiest_byte_vs_p0", "mpi_ms"]
    if not with_hvd:
        cols, compared = ([c for c in cs if c not in hvd_cols] for cs in (cols, compared))
    if args.against:
        cols, compared = cols + ["rps_vs_reference", "rps_p0.1_vs_reference"], compared + ["rps_vs_reference", "rps_p0.1_vs_reference"]
    return report_runs(__file__, "ops", runs, cols, ["ranks", "size"], compared)


def measure(args, with_hvd: bool, reference: list) -> list:
    """The rows of every run: per world size, the mpi4py run beside the Horovod one."""
    runs = []
    for _ in range(args.runs):
        rows = []
        for np_ in args.np:
            rank_args = ["--max-mib", str(args.max_mib), "--device", args.device, "--warmup", str(args.warmup)]
            alone = run_ranks(__file__, np_, ["mpi4py", *rank_args, *reference])
            beside = run_ranks(__file__, np_, ["horovod", *rank_args]) if with_hvd else [{}] * len(alone)
            for h, m in zip(beside, alone):
                row = {**m, **h}
                row["rps_p0_vs_mpi"] = m["rps_p0_s"] / m["mpi_allreduce_s"]
                row["rps_p0_vs_mpi_fused"] = m["rps_p0_s"] / m["mpi_fused_s"]
                row["rps_p0.1_vs_p0"] = m["rps_p0.1_s"] / m["rps_p0_s"]
                row["p0.1_per_sent_byte_vs_p0"] = row["rps_p0.1_vs_p0"] / m["sent_fraction_p0.1"]
                row["p0.1_per_busiest_byte_vs_p0"] = row["rps_p0.1_vs_p0"] / m["busiest_fraction_p0.1"]
                row["rps_p0_GBps"] = m["bytes"] / m["rps_p0_s"] / 1e9
                row["mpi_ms"] = m["mpi_allreduce_s"] * 1e3
                if h:
                    row["rps_p0_vs_hvd"] = h["rps_p0_beside_hvd_s"] / h["hvd_allreduce_s"]
                    row["hvd_GBps"] = h["bytes"] / h["hvd_allreduce_s"] / 1e9
                if "rps_p0_reference_s" in m:
                    row["rps_vs_reference"] = m["rps_p0_s"] / m["rps_p0_reference_s"]
                    row["rps_p0.1_vs_reference"] = m["rps_p0.1_s"] / m["rps_p0.1_reference_s"]
                rows.append(row)
        runs.append(rows)
    return runs


if __name__ == "__main__":
    sys.exit(main())
