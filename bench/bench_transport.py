"""Exchange throughput of the lossy transport against plain MPI.Alltoall, and the cost of deciding losses.

    python bench/bench_transport.py [--np 2 4] [--max-mib 64] [--runs N] [--against REV]

For each world size and per-peer message size (4 KiB .. 64 MiB): the time of
``Transport.exchange`` at p = 0 and of ``MPI.Alltoall`` on the same bytes (ratio = transport /
Alltoall; ``isend_irecv`` is a bare mpi4py Isend/Irecv loop on the same buffers, ``startall``
the same on persistent requests restarted with mpi4py's ``Startall`` and ``Waitall``: what the
exchange's point-to-point messages cost from Python; the exchange restarts its own in C where
its extension is built, ``HVDU_NATIVE=0`` in Python); at p = 0.1 its time relative to p = 0, also
per byte actually sent, beside MPI's floor: the same bare persistent requests and ``MPI.Alltoallv``
moving only what rounds at p = 0.1 send (links lost by coin flips drawn alike on every rank;
``startall_p0.1_vs_p0`` and ``alltoallv_p0.1_vs_p0`` = their time / their time moving everything,
the JSON's ``floor_sent_fraction_p0.1`` and ``floor_busiest_fraction_p0.1`` the share of all bytes
and of the busiest receiver's bytes that the 1024 sets of lost links the rounds take in turn
move); and the time spent
deciding losses (what the transport does to decide one exchange's losses: it asks the loss
decider it keeps for the layout, averaged over 1024 consecutive steps, so that each timing
round holds one of the NumPy decider's windows where the C one is not built) as a share of
the exchange at p = 0.1.
Prints a table and writes bench/results/transport.json; ``--runs N`` repeats the sweep and also
prints the ratios of every run side by side (this machine's timings move between runs).
``--against REV`` also times the exchange at p = 0 and 0.1 of the package as it is at git revision
REV (e.g. ``HEAD~1``), and its loss decisions, in the same rounds: ``vs_reference``,
``p0.1_vs_reference`` and ``decide_vs_reference`` = this tree's time / REV's time.
"""
from __future__ import annotations

import sys
from itertools import cycle

from common import interleaved_times, save_rank_rows, size_label, size_sweep_main


def rank_main(out: str, max_mib: int, reference=None) -> None:
    import numpy as np
    from mpi4py import MPI

    from hvd_unreliable.faults import Bernoulli
    from hvd_unreliable.faults.loss import AHEAD
    from hvd_unreliable.transport import Transport

    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    rows = []
    size = 4 * 2**10
    while size <= max_mib * 2**20:
        count = size // 4
        send = np.random.default_rng(me).random(count * n, dtype=np.float32)
        recv = np.empty_like(send)
        counts = (count,) * n  # a tuple, as RPS passes its layout: a repeat is recognised by its identity
        transports = {p: Transport(comm, Bernoulli(p), seed=1) for p in (0.0, 0.1)}
        # (the decisions are timed on a transport of their own: their steps leave the exchanges' alone)
        transports["decide"] = Transport(comm, Bernoulli(0.1), seed=1)
        if reference is not None:  # the same exchange from the package at another revision
            for key, p in (("reference", 0.0), ("reference_p0.1", 0.1), ("reference_decide", 0.1)):
                transports[key] = reference.transport.Transport(comm, reference.faults.Bernoulli(p), seed=1)

        def exchange(t):
            def run():
                t.set_step(t.step + 1)
                t.exchange(send, counts, counts, "bench", recv=recv)
            return run

        peers = [r for r in range(n) if r != me]
        lossy = transports[0.1]

        wire = comm.Dup()

        def isend_irecv():  # a point-to-point exchange from Python: a bare mpi4py loop (own block first)
            recv[me * count:(me + 1) * count] = send[me * count:(me + 1) * count]
            reqs = [wire.Irecv(recv[s * count:(s + 1) * count], source=s) for s in peers]
            reqs += [wire.Isend(send[d * count:(d + 1) * count], dest=d) for d in peers]
            MPI.Request.Waitall(reqs)

        persistent = [wire.Recv_init(recv[s * count:(s + 1) * count], source=s) for s in peers]
        persistent += [wire.Send_init(send[d * count:(d + 1) * count], dest=d) for d in peers]

        def startall():  # the same with persistent requests, as the exchange restarts them (in Python)
            recv[me * count:(me + 1) * count] = send[me * count:(me + 1) * count]
            MPI.Prequest.Startall(persistent)
            MPI.Request.Waitall(persistent)

        # MPI's floor at p = 0.1: the same persistent requests, and MPI's own Alltoallv, moving only
        # what a round at p = 0.1 sends. Each link is lost by a coin flip with p = 0.1, drawn alike on
        # every rank (both ends of a link agree) for 1024 rounds before timing, which take turns.
        lost = np.random.default_rng(2).random((1024, n, n)) < 0.1
        lost[:, range(n), range(n)] = False
        links = [(s, me) for s in peers] + [(me, d) for d in peers]  # persistent's order
        kept = cycle([[r for r, (s, d) in zip(persistent, links) if not x[s, d]] for x in lost])
        whole = [count] * n
        displs = [r * count for r in range(n)]
        vargs = cycle([([send, [0 if y else count for y in x[me]], displs, MPI.FLOAT],
                        [recv, [0 if y else count for y in x[:, me]], displs, MPI.FLOAT]) for x in lost])

        def startall_p01():
            requests = next(kept)
            recv[me * count:(me + 1) * count] = send[me * count:(me + 1) * count]
            MPI.Prequest.Startall(requests)
            MPI.Request.Waitall(requests)

        def decider(t):
            exchange(t)()  # (lays the exchange out)
            (plan,) = t._plans.values()
            firsts = iter(range(0, 2**62, AHEAD))  # each round goes on from the last one's steps, as training does

            def decide():  # the decisions of AHEAD exchanges (a NumPy window's cost once a round), as the transport
                first = next(firsts)  # makes them where it restarts requests kept (Transport._restart)
                for step in range(first, first + AHEAD):
                    t.step = step
                    (plan.deciders.get(("bench", 0)) or t._message_decider(plan, "bench", 0))(t.step)

            def decide_before():  # the same at revisions where the transport asked Transport._link_fates
                first = next(firsts)
                for step in range(first, first + AHEAD):
                    t.step = step
                    t._link_fates(plan, "bench", 0)
            return decide if hasattr(t, "_message_decider") else decide_before

        times = interleaved_times({"alltoall_s": lambda: comm.Alltoall(send, recv), "isend_irecv_s": isend_irecv,
                                   "startall_s": startall, "startall_p0.1_s": startall_p01,
                                   "alltoallv_s": lambda: comm.Alltoallv([send, whole, displs, MPI.FLOAT],
                                                                         [recv, whole, displs, MPI.FLOAT]),
                                   "alltoallv_p0.1_s": lambda: comm.Alltoallv(*next(vargs)),
                                   "exchange_p0_s": exchange(transports[0.0]),
                                   "exchange_p0.1_s": exchange(lossy), "decide_s": decider(transports["decide"]),
                                   **({"reference_p0_s": exchange(transports["reference"]),
                                       "reference_p0.1_s": exchange(transports["reference_p0.1"]),
                                       "reference_decide_s": decider(transports["reference_decide"])} if reference else {})},
                                  comm, 200 if size <= 2**20 else 15)
        c = lossy.stats.counters
        sent_fraction = comm.allreduce(c["bytes_sent"] - c["bytes_lost"], op=MPI.SUM) / comm.allreduce(c["bytes_sent"], op=MPI.SUM)
        times["decide_s"] /= AHEAD
        if reference is not None:
            times["reference_decide_s"] /= AHEAD
        row = {"ranks": n, "per_peer": size_label(size), "bytes": size, **times, "sent_fraction_p0.1": sent_fraction}
        row["isend_irecv_vs_alltoall"] = times["isend_irecv_s"] / times["alltoall_s"]
        row["startall_vs_alltoall"] = times["startall_s"] / times["alltoall_s"]
        row["ratio_p0_vs_alltoall"] = times["exchange_p0_s"] / times["alltoall_s"]
        row["p0.1_vs_p0"] = times["exchange_p0.1_s"] / times["exchange_p0_s"]
        row["p0.1_per_sent_byte_vs_p0"] = row["p0.1_vs_p0"] / sent_fraction
        row["startall_p0.1_vs_p0"] = times["startall_p0.1_s"] / times["startall_s"]
        row["alltoallv_p0.1_vs_p0"] = times["alltoallv_p0.1_s"] / times["alltoallv_s"]
        # (what those sets of lost links move: of all bytes, and of the bytes of the rank that receives the most)
        row["floor_sent_fraction_p0.1"] = 1 - float(lost.sum()) / (len(lost) * n * (n - 1))
        row["floor_busiest_fraction_p0.1"] = float(np.mean((n - 1 - lost.sum(axis=1)).max(axis=1))) / (n - 1)
        row["decide_share_p0.1"] = times["decide_s"] / times["exchange_p0.1_s"]
        if reference is not None:
            row["vs_reference"] = times["exchange_p0_s"] / times["reference_p0_s"]
            row["p0.1_vs_reference"] = times["exchange_p0.1_s"] / times["reference_p0.1_s"]
            row["decide_vs_reference"] = times["decide_s"] / times["reference_decide_s"]
        row["GBps_p0"] = n * (n - 1) * size / times["exchange_p0_s"] / 1e9
        rows.append(row)
        for t in transports.values():
            t.free()
        for r in persistent:
            r.Free()
        wire.Free()
        size *= 4
    save_rank_rows(out, rows, comm)


def main() -> int:
    cols = ["ranks", "per_peer", "alltoall_s", "isend_irecv_vs_alltoall", "startall_vs_alltoall", "exchange_p0_s", "ratio_p0_vs_alltoall", "GBps_p0",
            "exchange_p0.1_s", "p0.1_vs_p0", "startall_p0.1_vs_p0", "alltoallv_p0.1_vs_p0",
            "p0.1_per_sent_byte_vs_p0", "decide_share_p0.1"]
    return size_sweep_main(__doc__, __file__, "transport", rank_main, cols,
                           compared=["ratio_p0_vs_alltoall", "startall_vs_alltoall", "isend_irecv_vs_alltoall",
                                     "p0.1_vs_p0", "startall_p0.1_vs_p0", "alltoallv_p0.1_vs_p0",
                                     "p0.1_per_sent_byte_vs_p0"],
                           against=["vs_reference", "p0.1_vs_reference", "decide_vs_reference"])


if __name__ == "__main__":
    sys.exit(main())
