"""RPS and lossy allreduce on real ranks against the NumPy reference and against allreduce (one
launch per world size, shared by the checks that run on it: rank start-up dominates)."""
import itertools
import math
import re

import numpy as np
import pytest

from hvd_unreliable.faults import Bernoulli
from tests.mpirun import HOROVOD, needs_horovod, run_mpi_calls
from tests.reference import blockwise_round, robust_average
from tests.workers.algorithms import NP_DTYPES, initial

W = "tests.workers.algorithms:"


@pytest.mark.parametrize("kind,dtype", [(k, d) for k in ("numpy", "torch") for d in ("float32", "float64", "float16")]
                         + [("torch", "bfloat16")])
@pytest.mark.parametrize("own,masks", [
    (0, "WPLWP"),  # the own row first: the sum runs in it from the start
    (3, "PLWWP"),  # a partial row before the first whole one: added after it, in rank order
    (4, "LLPPW"),  # only the own row arrived whole: it is the first row
    (1, "WWWWW"),  # five rows: a division, not a multiplication by the reciprocal
])
def test_robust_mean_in_place_gives_the_reference_bit_for_bit(kind, dtype, own, masks):
    """In place (in the received rows, then the own one) and in rank order from the first whole
    row: the same floats as the NumPy reference's separate accumulator, on NumPy arrays (host
    rows) and torch tensors (device rows; bfloat16, which NumPy lacks: the reference runs on its
    float32 values and rounds once). W whole, P partial, L lost."""
    import torch

    from hvd_unreliable.algorithms.blockwise import robust_mean

    rng = np.random.default_rng(own)
    blocks = [(rng.standard_normal(301) * 10 ** rng.uniform(-3, 3, 301)).astype(NP_DTYPES.get(dtype, np.float32))
              for _ in masks]
    if dtype == "bfloat16":
        blocks = [torch.from_numpy(b).to(torch.bfloat16).float().numpy() for b in blocks]
    arrived = [np.ones(301, bool) if c == "W" else np.zeros(301, bool) if c == "L" else rng.random(301) < 0.6
               for c in masks]
    rows = [b.copy() if kind == "numpy" else torch.from_numpy(b.copy()).to(getattr(torch, dtype)) for b in blocks]
    flags = [True if c == "W" else False if c == "L" else m for c, m in zip(masks, arrived)]
    out = robust_mean(rows, flags, out=rows[own])
    assert out is rows[own]
    expected = torch.from_numpy(robust_average(blocks, arrived, own)).to(getattr(torch, dtype))
    got = torch.from_numpy(out) if kind == "numpy" else out
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_rounds_on_the_same_memory_share_their_wiring():
    """A round of the same memory (and servers) gets the last one's layout and NumPy views, the
    same objects (the transport recognises a repeated exchange by them); other memory, another
    shape or dtype, other servers get their own."""
    import torch

    from hvd_unreliable.algorithms.blockwise import _wiring
    from hvd_unreliable.algorithms.fusion import fuse, pack

    params = [torch.randn(10), torch.randn(6)]
    pack(params)
    flat = fuse(params)[0].flat
    lay, buf, rows = first = _wiring(flat, None, 3, 1)
    assert buf.ctypes.data == flat.data_ptr() and rows.size == 2 * lay.mine and lay.mine == 5
    assert _wiring(flat[:], None, 3, 1) is first  # another tensor over the same memory
    assert _wiring(flat, 2, 3, 1)[0].mine == 8  # other servers: another layout
    other = torch.randn(16)
    moved = _wiring(other, None, 3, 1)[1]  # other memory: a new view, of that memory
    assert moved is not buf and moved.ctypes.data == other.data_ptr()
    assert _wiring(other[:8], None, 3, 1)[1].size == 8  # the same address, another shape
    assert _wiring(other.view(torch.int32), None, 3, 1)[1].dtype == np.int32  # ... another dtype
    other.set_(torch.randn(16).untyped_storage())  # the tensor object itself moves to other memory
    assert _wiring(other, None, 3, 1)[1].ctypes.data == other.data_ptr()


CASES = [list(c) for c in itertools.product([0.0, 0.1, 0.5, 1.0], [1, 2, "n"], [None, 64],
                                             ["float32"], [1003], ["rps"])]
CASES += [[0.3, "n", None, "float64", 2, "rps"],        # fewer elements than ranks
          [0.3, 2, 64, "float16", 777, "rps"],
          [0.2, "n", None, "float32", 1003, "allreduce"],
          [0.2, 1, 32, "float64", 500, "allreduce"]]


def reference(n, case, steps=2):
    p, servers, packet_bytes, dtype, total, _ = case
    servers = n if servers == "n" else servers
    xs = [initial(r, total, dtype) for r in range(n)]
    loss = Bernoulli(p)
    for step in range(steps):
        xs = blockwise_round(xs, servers, loss, seed=5, step=step, packet_bytes=packet_bytes)
    return xs


# at p = 0.1 a rank's reduce-scatter loses nothing in about two rounds of three: loss-free rounds
# follow each other (the transport then returns the Received of the last one, and the robust mean
# reuses the rows and masks found for it) and alternate with lossy ones
REPEATS = [[0.1, "n", None, "float32", 1003, "rps"], [0.1, "n", None, "float32", 1003, "allreduce"]]
REPEAT_STEPS = 12
MISMATCHED = {"2a": (2, [10, 12], ["float32", "float32"], None),
              "2b": (2, [6, 6], ["float32", "float64"], 8),
              "2c": (2, [8, 8], ["float16", "bfloat16"], None),  # the same bytes: only the dtype differs
              "3": (3, [10, 10, 12], ["float32"] * 3, None),
              "3b": (3, [8, 8, 8], ["float16", "float16", "bfloat16"], None)}


@pytest.fixture(scope="module")
def launches():
    """The calls of the tests below, one launch per world size: ``launches[n][name]``."""
    calls = {n: {"matrix": (W + "matrix_vs_reference", {"cases": CASES})} for n in (2, 3, 4)}
    calls[3]["repeats"] = (W + "matrix_vs_reference", {"cases": REPEATS, "steps": REPEAT_STEPS})
    calls[3]["p0-mpi4py"] = (W + "matches_allreduce_at_p0", {"backend": "mpi4py"})
    if HOROVOD:
        calls[4]["p0-horovod"] = (W + "matches_allreduce_at_p0", {"backend": "horovod"})
    for p in (0.1, 0.5):
        calls[4][f"inclusion-{p}"] = (W + "inclusion_statistics", {"p": p, "rounds": 300})
    for name, (n, sizes, dtypes, packet_bytes) in MISMATCHED.items():  # (last: their requests stay posted)
        calls[n][f"mismatched-{name}"] = (W + "mismatched_layouts", {"sizes": sizes, "dtypes": dtypes,
                                                                      "packet_bytes": packet_bytes})
    return {n: run_mpi_calls(n, c, timeout=180) for n, c in calls.items()}  # (together under pytest's 600 s)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpi_result_equals_numpy_reference_bit_for_bit(launches, n):
    res = launches[n]["matrix"]
    checked = 0
    for k, case in enumerate(CASES):
        servers = n if case[1] == "n" else case[1]
        if servers > n:
            continue
        expected = reference(n, case)
        for r in range(n):
            got = np.frombuffer(bytes.fromhex(res[r][k]), dtype=NP_DTYPES[case[3]])
            assert got.tobytes() == expected[r].tobytes(), (case, r)
            checked += 1
        if case[0] == 1.0:  # nothing arrives: every rank keeps its own model exactly
            for r in range(n):
                assert expected[r].tobytes() == initial(r, case[4], case[3]).tobytes()
        if case[0] == 0.0:  # everything arrives: all ranks agree
            assert all(expected[r].tobytes() == expected[0].tobytes() for r in range(n))
    assert checked >= n * 20


def test_rounds_that_lose_nothing_between_lossy_ones_equal_the_reference(launches):
    res = launches[3]["repeats"]
    for k, case in enumerate(REPEATS):  # the second case on tensors laid out by pack()
        expected = reference(3, case, REPEAT_STEPS)
        for r in range(3):
            assert bytes.fromhex(res[r][k]) == expected[r].tobytes(), (case, r)


@pytest.mark.parametrize("n,backend", [pytest.param(4, "horovod", marks=needs_horovod), (3, "mpi4py")])
def test_p0_equals_horovod_and_mpi_allreduce_average(launches, n, backend):
    res = launches[n][f"p0-{backend}"]
    for r in res:
        assert r["backend"] == backend
        for case in r["cases"]:
            for key, err in case.items():
                assert err < 1e-6, (key, err)
            if backend == "horovod":
                assert "rps_vs_hvd" in case


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_inclusion_and_adoption_happen_with_probability_one_minus_p(launches, p):
    res = launches[4][f"inclusion-{p}"]
    trials = sum(r["trials"] for r in res)
    for key in ("included", "adopted"):
        hits = sum(r[key] for r in res)
        bound = 4.5 * math.sqrt(trials * p * (1 - p))
        assert abs(hits - trials * (1 - p)) <= bound, (key, hits, trials)
    assert all(r["blocks_uniform"] for r in res)


@pytest.mark.parametrize("name", MISMATCHED)
def test_ranks_averaging_tensors_of_other_sizes_or_dtypes_fail_instead_of_mixing_blocks(launches, name):
    n, sizes, dtypes, _ = MISMATCHED[name]
    res = launches[n][f"mismatched-{name}"]
    mismatched = [r for r in res if r["error"] == "ExchangeMismatch"]
    for r in mismatched:
        assert "the same sizes and dtypes" in r["message"], r["message"]
        # the peer named is one whose tensor differs (not one whose message was merely still on its way)
        other_bytes = re.search(r"rank (\d+) received (more than )?(\d+) bytes from rank (\d+) where its layout "
                                r"expects (\d+)", r["message"])
        if other_bytes:
            me, more, got, peer, expected = other_bytes.groups()
            assert more or got != expected, r["message"]
        else:  # blocks of another dtype never match this rank's receives
            me, mine, peer, theirs = re.search(
                r"rank (\d+) waits for a block of (\w+).*? from rank (\d+), which sent (\w+)", r["message"]).groups()
            on_host = {"bfloat16": "int16"}  # (what fusion.wire hands the transport for a CPU bfloat16 tensor)
            expected = tuple(on_host.get(dtypes[int(k)], dtypes[int(k)]) for k in (me, peer))
            assert (mine, theirs) == expected, r["message"]
        assert (sizes[int(peer)], dtypes[int(peer)]) != (sizes[int(me)], dtypes[int(me)]), r["message"]
    # every rank whose own receives disagree says so; a rank whose receives happen to fit waits
    # for the others' all-gather and times out instead of going on with mixed blocks
    assert len(mismatched) >= 2 and all(r["error"] in ("ExchangeMismatch", "TransportTimeout") for r in res), res
    if len(set(sizes)) == 1:  # only dtypes differ: every rank is told at once, none waits for its timeout
        assert len(mismatched) == n, res
