"""Rank-side code of the transport tests (run under mpirun by tests/test_transport.py)."""
import hashlib
import time

import numpy as np
from mpi4py import MPI

from hvd_unreliable.faults import DelayConfig, DelayModel, parse_loss_spec
from hvd_unreliable.transport import Transport, native, packetize
from hvd_unreliable.transport.transport import _Repeat

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}


def payload(src, dst, count, dtype, step):
    """Deterministic bytes for block src -> dst, random bit patterns (NaNs and all)."""
    rng = np.random.default_rng([src, dst, step])
    raw = rng.integers(0, 256, size=count * np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype)


def as_tensor(array, dtype):
    """A torch tensor sharing ``array``'s memory (what a CUDA-aware MPI gets, here on the CPU)."""
    import torch

    t = torch.from_numpy(array.view(np.int16) if dtype == "bfloat16" else array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def exchange_trace(spec="random 10%", packet_bytes=None, dtype="float32", count=1000, steps=5, seed=0,
                   phases=("reduce_scatter", "all_gather"), tensors=False, buffers=0, given_recv=True):
    """Every rank sends a different block to every peer, for several steps and phases.

    Returns, per exchange, what this rank saw arrive (per source: lost packet count, and whether
    every arrived element is bit-exact) and what it dropped as sender (per destination). With
    ``tensors`` the buffers are handed to the transport as torch tensors instead of NumPy arrays;
    with ``buffers`` = k the exchanges take turns on k pairs of buffers refilled in place (as
    training reuses its buffers) instead of new ones each time; without ``given_recv`` the
    transport allocates the receive buffer (its general path: no persistent requests).
    """
    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    dt = DTYPES[dtype]
    t = Transport(comm, parse_loss_spec(spec), seed=seed, packet_bytes=packet_bytes, timeout=60)
    repeats = count_repeats()
    counts = np.array([count + d for d in range(n)])  # different sizes per link
    recv_counts = np.full(n, count + me)
    nbytes = int(recv_counts.sum()) * np.dtype(dt).itemsize
    pool = [(np.empty(int(counts.sum()), dt), np.empty(nbytes, np.uint8).view(dt)) for _ in range(buffers)]
    trace, digest = [], hashlib.sha256()
    for step in range(steps):
        t.set_step(step)
        for phase in phases:
            before = t.stats.link_lost[me].copy()
            send = np.concatenate([payload(me, d, counts[d], dt, step) for d in range(n)])
            recv = np.full(nbytes, 0xAB, np.uint8).view(dt)
            if pool:
                pair = pool[len(trace) % buffers]
                pair[0][:], pair[1][:] = send, recv
                send, recv = pair
            if tensors:
                got = t.exchange(as_tensor(send, dtype), counts, recv_counts, phase, recv=as_tensor(recv, dtype))
                assert got.data.data_ptr() == recv.ctypes.data
                got.data = recv  # the tensor shares recv's memory; checked below with NumPy
            elif given_recv:
                got = t.exchange(send, counts, recv_counts, phase, recv=recv)
            else:
                got = t.exchange(send, counts, recv_counts, phase)
            entry = {"lost_from": [], "exact": [], "untouched_where_lost": [], "dropped_to": (t.stats.link_lost[me] - before).tolist()}
            for s in range(n):
                expect = payload(s, me, count + me, dt, step)
                block = got.block(s)
                m = got.mask(s)
                mask = np.full(block.size, m) if isinstance(m, bool) else m
                npk, per = packetize(block.size, block.itemsize, packet_bytes)
                arrived_packets = int(mask[::per].sum()) if per else 0
                entry["lost_from"].append(npk - arrived_packets)
                entry["exact"].append(bool(np.array_equal(block[mask].view(np.uint8), expect[mask].view(np.uint8))))
                if given_recv:  # (a buffer the transport allocates holds garbage where nothing arrived)
                    entry["untouched_where_lost"].append(bool((block[~mask].view(np.uint8) == 0xAB).all()))
                digest.update(mask.tobytes())
            entry["arrived"] = got.arrived.tolist()
            trace.append(entry)
    total = t.total_stats().as_dict()
    return {"trace": trace, "digest": digest.hexdigest(), "stats": t.stats.as_dict(), "total": total,
            "repeats": repeats[0]}


def count_repeats() -> list:
    """``[k]``: how many exchanges from now on were recognised as repeats of their phase's last
    one (the path training takes every step: no planning), counted as they happen."""
    original = getattr(_Repeat.matches, "original", _Repeat.matches)
    taken = [0]

    def matches(self, *args):
        hit = original(self, *args)
        taken[0] += hit
        return hit

    matches.original = original
    _Repeat.matches = matches
    return taken


def repeats_see_changes_made_in_place(count=300):
    """Exchanges repeated on the same objects after those objects changed in place: counts
    (a NumPy array, then a list) split differently, a receive buffer given another dtype or
    shape. Returns per round whether every block arrived bit-exact, and the errors. (3 ranks
    or more: the split needs a next and a previous rank.)"""
    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    t = Transport(comm, seed=0, timeout=60)
    repeats = count_repeats()
    total = count * n
    send = np.empty(total, np.float32)
    recv = np.empty(total, np.float32)
    send_counts, recv_counts = np.full(n, count), np.full(n, count)

    def round_trip(step, split):
        """Rank s sends split(s)[d] elements to rank d; every rank checks what it got."""
        t.set_step(step)
        send_counts[:] = split(me)  # in place: the same objects as last time
        recv_counts[:] = [split(s)[me] for s in range(n)]
        send[:] = np.concatenate([payload(me, d, send_counts[d], np.float32, step) for d in range(n)])
        got = t.exchange(send, send_counts, recv_counts, "phase", recv=recv)
        return all(np.array_equal(got.block(s).view(np.uint8), payload(s, me, recv_counts[s], np.float32, step).view(np.uint8))
                   for s in range(n))

    even = lambda s: [count] * n
    # other sizes per link, the same totals: 7 more to the next rank, 7 fewer to the previous one
    skewed = lambda s: [count + 7 * ((d - s) % n == 1) - 7 * ((d - s) % n == n - 1) for d in range(n)]
    rounds = [round_trip(0, even), round_trip(1, even), round_trip(2, skewed), round_trip(3, even)]
    after_arrays = repeats[0]
    send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()  # lists, changed in place too
    rounds += [round_trip(4, even), round_trip(5, skewed), round_trip(6, skewed)]
    errors = {}
    for change in ("dtype", "shape"):
        if change == "dtype":
            recv.dtype = np.int32  # the same bytes, another dtype
        else:
            recv.shape = (n, count)
        try:
            t.exchange(send, send_counts, recv_counts, "phase", recv=recv)
        except Exception as e:  # noqa: BLE001 (the test reads the error)
            errors[change] = f"{type(e).__name__}: {e}"
        recv.dtype, recv.shape = np.float32, (total,)
    rounds.append(round_trip(7, skewed))
    return {"exact": rounds, "repeats_after_arrays": after_arrays, "repeats": repeats[0], "errors": errors}


def timeout_names_step_phase_and_peer(absent=1, recv=False, repeat=False):
    """With ``recv`` the exchange gets a receive buffer, as in training (persistent requests); with
    ``repeat`` every rank makes it once first, so the exchange that times out is a repeat (started
    and waited for in C, when the extension is built, before the Python wait takes over)."""
    comm = MPI.COMM_WORLD
    t = Transport(comm, seed=0, timeout=2.0)
    t.set_step(7)
    n = comm.Get_size()
    send, counts = np.ones(n, dtype=np.float32), (1,) * n
    out = np.empty_like(send) if recv or repeat else None
    if repeat:
        t.exchange(send, counts, counts, "reduce_scatter", recv=out)
    if comm.Get_rank() == absent:
        time.sleep(30)  # never joins: the others must give up after 2 s, not hang
        return {}
    t.exchange(send, counts, counts, "reduce_scatter", recv=out)
    return {}


def native_wait() -> dict:
    """Whether this rank's exchanges start and wait in C (``HVDU_NATIVE=0`` turns it off)."""
    return {"native": native.start_and_wait is not None}


def straggle_is_cancelled_by_a_message():
    comm = MPI.COMM_WORLD
    t = Transport(comm, delay=DelayModel(DelayConfig(kind="constant", mean=20.0)))
    if comm.Get_rank() == 0:
        time.sleep(0.2)
        t.cancel(1)
        full = t.straggle(seconds=0.05, cancellable=False)
        comm.Barrier()
        return {"completed": full}
    completed = t.straggle(step=0, cancellable=True)
    took = t.take_cancel()
    again = t.take_cancel()
    comm.Barrier()
    return {"completed": completed, "took_cancel": took, "second_cancel": again,
            "waited_less_than_delay": t.stats.delay_injected_s < 20.0}


def hang_forever():
    while True:
        time.sleep(1)


def fail_on(rank):
    """Raise on ``rank``; return its rank on the others."""
    if MPI.COMM_WORLD.Get_rank() == rank:
        raise ValueError(f"rank {rank} fails on purpose")
    return MPI.COMM_WORLD.Get_rank()


def bad_models_rejected_on_every_rank():
    """Transports built with a link matrix of the wrong shape and with values that are not
    models: the error of each; and the models that spec strings give."""
    from hvd_unreliable.errors import ConfigError
    from hvd_unreliable.faults import PerLink

    errors = {}
    for name, kwargs in {"matrix": {"loss": PerLink.from_matrix([[0.0, 0.1], [0.1, 0.0]])}, "loss_number": {"loss": 0.1},
                         "delay_number": {"delay": 0.05}, "loss_spec": {"loss": "random 5"},
                         "seed_text": {"seed": "7"}, "seed_float": {"seed": 0.5}}.items():
        try:
            Transport(MPI.COMM_WORLD, **kwargs)
            errors[name] = None
        except ConfigError as e:
            errors[name] = str(e)
    t = Transport(MPI.COMM_WORLD, "gemodel 1% 10% 70% 0.1%", "exponential 50ms", seed=3)
    return {"errors": errors, "loss": type(t.loss).__name__, "mean_loss": t.loss.mean_loss, "delay_mean": t.delay.mean}


def late_peer_while_another_runs_ahead_with_another_dtype(delay=0.3, count=64):
    """3 ranks, two exchanges of each kind: the first of float32, where rank 0 receives from
    ranks 1 and 2 and rank 1 from rank 0 only; the second of float16, every rank to every rank.
    Rank 2 joins each first exchange ``delay`` seconds late, so rank 1 is already in the second
    one, its float16 block to rank 0 sent, while rank 0 still waits for rank 2 in the first: what
    each rank received (as checksums)."""
    comm = MPI.COMM_WORLD
    me = comm.Get_rank()
    t = Transport(comm, timeout=20)
    first_send = {0: [0, count, 0], 1: [count, 0, 0], 2: [count, 0, 0]}[me]
    first_recv = {0: [0, count, count], 1: [count, 0, 0], 2: [0, 0, 0]}[me]
    out = []
    a = np.full(sum(first_send), me + 1, dtype=np.float32)
    ra = np.zeros(sum(first_recv), dtype=np.float32)
    b = np.full(3 * count, me + 1, dtype=np.float16)
    rb = np.zeros(3 * count, dtype=np.float16)
    for step in range(2):  # (the second round repeats the first on the same buffers: the persistent path)
        t.set_step(step)
        if me == 2:
            time.sleep(delay)
        got = t.exchange(a, first_send, first_recv, "first", recv=ra)
        out.append([float(x) for x in got.data])
        got = t.exchange(b, [count] * 3, [count] * 3, "second", recv=rb)
        out.append([float(x) for x in got.data])
    t.free()
    return out
