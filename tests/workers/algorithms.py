"""Rank-side code of the RPS / lossy-allreduce tests (run under mpirun by tests/test_algorithms.py)."""
import numpy as np
import torch
from mpi4py import MPI

from hvd_unreliable.algorithms import lossy_allreduce, rps_average
from hvd_unreliable.algorithms.fusion import pack
from hvd_unreliable.faults import Bernoulli
from hvd_unreliable.transport import Transport

NP_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def initial(rank, total, dtype):
    """Rank ``rank``'s replica: deterministic, different on every rank (also used by the reference)."""
    return np.random.default_rng([rank, total]).standard_normal(total).astype(NP_DTYPES[dtype])


def split(flat):
    """Cut a flat vector into tensors of several shapes, to exercise fusion."""
    t = torch.from_numpy(flat.copy())
    k = min(15, t.numel())
    parts = [t[:k].reshape(3, -1) if k == 15 else t[:k], t[k:k + 7], t[k + 7:]]
    return [p.clone() for p in parts]


def matrix_vs_reference(cases, steps=2):
    """Run every case ``(p, S, packet_bytes, dtype, total, op)`` for ``steps`` rounds; return bytes."""
    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    out = []
    for k, (p, servers, packet_bytes, dtype, total, op) in enumerate(cases):
        servers = n if servers == "n" else servers
        if servers > n:
            out.append(None)
            continue
        t = Transport(comm, Bernoulli(p), seed=5, packet_bytes=packet_bytes)
        tensors = split(initial(me, total, dtype))
        if k % 2:  # every other case fuses without copies, on tensors laid out by pack()
            pack(tensors)
        fn = rps_average if op == "rps" else lossy_allreduce
        for step in range(steps):
            t.set_step(step)
            fn(tensors, t, servers)
        flat = torch.cat([x.reshape(-1) for x in tensors]).numpy()
        out.append(flat.tobytes().hex())
        t.free()
    return out


def matches_allreduce_at_p0(sizes=(1, 3, 1000, 4099), backend="horovod"):
    """rps_average and lossy_allreduce at p = 0 against hvd.allreduce(Average) and MPI.Allreduce."""
    import hvd_unreliable as hu

    ctx = hu.init(backend=backend)
    comm = ctx.comm
    n, me = comm.Get_size(), comm.Get_rank()
    t = Transport(comm)
    res = {"backend": ctx.backend, "cases": []}
    for total in sizes:
        x = initial(me, total, "float32")
        mpi = np.empty_like(x)
        comm.Allreduce(x, mpi, op=MPI.SUM)
        mpi /= n
        a = [torch.from_numpy(x.copy())]
        b = [torch.from_numpy(x.copy())]
        rps_average(a, t)
        lossy_allreduce(b, t, num_servers=min(2, n))
        case = {"rps_vs_mpi": float(np.abs(a[0].numpy() - mpi).max()),
                "allreduce_vs_mpi": float(np.abs(b[0].numpy() - mpi).max())}
        if ctx.hvd is not None:
            h = ctx.hvd.allreduce(torch.from_numpy(x.copy()), op=ctx.hvd.Average).numpy()
            case["rps_vs_hvd"] = float(np.abs(a[0].numpy() - h).max())
            case["hvd_vs_mpi"] = float(np.abs(h - mpi).max())
        # bfloat16 (no NumPy type: averaged on torch views of the host buffers): the float32 mean
        # in rank order, rounded once to bfloat16.
        c = torch.from_numpy(x.copy()).to(torch.bfloat16)
        expected = sum(torch.from_numpy(v) for v in comm.allgather(c.float().numpy())) / n
        rps_average([c], t)
        case["bf16_vs_float32_mean"] = float((c.float() - expected.to(torch.bfloat16).float()).abs().max())
        res["cases"].append(case)
    hu.shutdown()
    return res


def inclusion_statistics(p=0.3, rounds=300, total=64):
    """Count how often each server averages each worker's block and each worker adopts averages.

    Rank i holds 0.0 in the block it serves and 1.0 elsewhere. Server j's average is k/(k+1)
    where k = other workers' blocks that arrived; a worker that adopts block j sees a value < 1,
    one that does not keeps its 1.0.
    """
    comm = MPI.COMM_WORLD
    n, me = comm.Get_size(), comm.Get_rank()
    t = Transport(comm, Bernoulli(p), seed=123)
    sizes = [total // n + (j < total % n) for j in range(n)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    included, adopted, kept_exact = 0, 0, True
    for step in range(rounds):
        t.set_step(step)
        x = np.ones(total, dtype=np.float32)
        x[offsets[me]:offsets[me + 1]] = 0.0
        flat = torch.from_numpy(x.copy())
        rps_average([flat], t)
        y = flat.numpy()
        avg = float(y[offsets[me]])
        included += int(round(avg / (1 - avg)))
        for j in range(n):
            if j != me:
                block = y[offsets[j]:offsets[j + 1]]
                adopted += int(block[0] < 1.0)
                kept_exact &= bool((block == block[0]).all())
    return {"included": included, "adopted": adopted, "trials": rounds * (n - 1), "blocks_uniform": kept_exact}


def mismatched_layouts(sizes, dtypes, packet_bytes=None):
    """Rank r averages one tensor of ``sizes[r]`` elements of ``dtypes[r]``: what each rank raises."""
    import hvd_unreliable as hu

    comm = MPI.COMM_WORLD
    me = comm.Get_rank()
    transport = Transport(comm, Bernoulli(0.0), packet_bytes=packet_bytes, timeout=3)
    try:
        rps_average([torch.ones(sizes[me], dtype=getattr(torch, dtypes[me]))], transport)
        return {"error": None}
    except (hu.ExchangeMismatch, hu.TransportTimeout) as e:
        return {"error": type(e).__name__, "message": str(e)}
