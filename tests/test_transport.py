"""The lossy transport on real mpirun ranks: agreement, determinism, exactness, stats, timeouts.

The checks that need no process of their own share one launch per world size (``launches``);
those that end a launch (timeouts, a hang) or compare launches have their own.
"""
import os
import signal
import subprocess
import threading

import pytest

from tests.mpirun import MpiRunError, run_mpi, run_mpi_calls

W = "tests.workers.transport:"
TRACE = W + "exchange_trace"
GE = {2: "float64", 4: "float16"}  # world size: dtype, of the Gilbert-Elliott packet checks
TENSORS = [("float32", None), ("bfloat16", 256), ("float64", 100)]
SEEDS = {"spec": "random 20%", "packet_bytes": 512, "steps": 3}
P0_DTYPES = ["float32", "float64", "float16", "bfloat16"]
REUSED = [("random 0%", 1), ("random 30%", 1), ("random 30%", 3)]
REUSED_STEPS = 10


@pytest.fixture(scope="module")
def launches():
    """The calls of the checks below, one launch per world size: ``launches[n][name]``."""
    calls = {n: {"agree": (TRACE, {"spec": "random 30%", "steps": 6})} for n in (2, 3, 4)}
    for n, dtype in GE.items():
        calls[n]["gilbert_elliott"] = (TRACE, {"spec": "gemodel 10% 30% 90% 1%", "packet_bytes": 256,
                                               "dtype": dtype, "count": 3000, "steps": 4})
    calls[2]["straggle"] = (W + "straggle_is_cancelled_by_a_message", {})
    calls[4]["p1"] = (TRACE, {"spec": "random 100%", "steps": 2})
    three = calls[3]
    for dtype, packet_bytes in TENSORS:
        args = {"spec": "random 30%", "packet_bytes": packet_bytes, "dtype": dtype, "count": 700, "steps": 4}
        three[f"arrays-{dtype}"] = (TRACE, args)
        three[f"tensors-{dtype}"] = (TRACE, dict(args, tensors=True))
    for seed in (1, 2):
        three[f"seed-{seed}"] = (TRACE, dict(SEEDS, seed=seed))
    for dtype in P0_DTYPES:
        three[f"p0-{dtype}"] = (TRACE, {"spec": "random 0%", "dtype": dtype, "packet_bytes": 1500, "steps": 2})
    three["p0-whole"] = (TRACE, {"spec": "random 0%", "count": 500, "steps": 2})
    for spec, buffers in REUSED:
        three[f"reused-{spec}-{buffers}"] = (TRACE, {"spec": spec, "steps": REUSED_STEPS, "buffers": buffers})
    for spec in dict.fromkeys(spec for spec, _ in REUSED):  # (in a fixed order)
        three[f"fresh-{spec}"] = (TRACE, {"spec": spec, "steps": REUSED_STEPS, "given_recv": False})
    three["in_place"] = (W + "repeats_see_changes_made_in_place", {})
    three["native"] = (W + "native_wait", {})
    three["bad_models"] = (W + "bad_models_rejected_on_every_rank", {})
    three["ahead"] = (W + "late_peer_while_another_runs_ahead_with_another_dtype", {})
    return {n: run_mpi_calls(n, c, timeout=180) for n, c in calls.items()}  # (together under pytest's 600 s)


def check_agreement(results, n):
    """Every loss the sender decided is exactly what the receiver saw, exchange by exchange."""
    for k in range(len(results[0]["trace"])):
        for src in range(n):
            for dst in range(n):
                if src == dst:
                    continue
                dropped = results[src]["trace"][k]["dropped_to"][dst]
                seen = results[dst]["trace"][k]["lost_from"][src]
                assert dropped == seen, (k, src, dst)
        for r in range(n):
            e = results[r]["trace"][k]
            assert all(e["exact"]), (k, r)
            assert all(e["untouched_where_lost"]), (k, r)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sender_and_receiver_agree_on_every_message_loss(launches, n):
    res = launches[n]["agree"]
    check_agreement(res, n)
    total = res[0]["total"]
    messages = 6 * 2 * n * (n - 1)
    assert total["messages_sent"] == messages
    assert 0 < total["messages_lost"] < messages
    assert total["messages_delivered"] == messages - total["messages_lost"]
    # rounds in which a rank's links lose nothing take the transport's short path: same counters
    assert total["packets_delivered"] == total["packets_sent"] - total["packets_lost"] == total["messages_delivered"]
    assert total["bytes_delivered"] == total["bytes_sent"] - total["bytes_lost"] > 0
    assert all(r["total"] == total for r in res)


@pytest.mark.parametrize("n", GE)
def test_sender_and_receiver_agree_per_packet_with_gilbert_elliott(launches, n):
    res = launches[n]["gilbert_elliott"]
    check_agreement(res, n)
    lost = [x for r in res for e in r["trace"] for x in e["lost_from"]]
    assert sum(lost) > 0 and any(0 < x for x in lost)
    total = res[0]["total"]
    assert total["packets_delivered"] == total["packets_sent"] - total["packets_lost"]


@pytest.mark.parametrize("dtype,packet_bytes", TENSORS)
def test_torch_tensor_buffers_move_exactly_what_numpy_buffers_move(launches, dtype, packet_bytes):
    """The path a CUDA-aware MPI takes (tensors handed to MPI as they are), run on CPU tensors:
    same losses, same bytes, same statistics as with NumPy buffers."""
    arrays, tensors = launches[3][f"arrays-{dtype}"], launches[3][f"tensors-{dtype}"]
    check_agreement(tensors, 3)
    assert tensors == arrays
    unit = "packets" if packet_bytes else "messages"
    total = tensors[0]["total"]
    assert 0 < total[unit + "_lost"] < total[unit + "_sent"]


def test_same_seed_same_trace_other_seed_other_trace(launches):
    a, c = launches[3]["seed-1"], launches[3]["seed-2"]
    b = run_mpi(3, TRACE, dict(SEEDS, seed=1))  # in processes of its own
    assert [r["digest"] for r in a] == [r["digest"] for r in b]
    assert [r["digest"] for r in a] != [r["digest"] for r in c]


@pytest.mark.parametrize("dtype", P0_DTYPES)
def test_p0_delivers_everything_bit_exactly(launches, dtype):
    res = launches[3][f"p0-{dtype}"]
    check_agreement(res, 3)
    for r in res:
        for e in r["trace"]:
            assert e["arrived"] == [True] * 3 and e["lost_from"] == [0, 0, 0]
    assert res[0]["total"]["packets_lost"] == 0


def test_p0_whole_messages_take_the_short_path_and_count_every_byte(launches):
    res = launches[3]["p0-whole"]
    check_agreement(res, 3)
    for me, r in enumerate(res):
        for e in r["trace"]:
            assert e["arrived"] == [True] * 3 and e["lost_from"] == [0, 0, 0]
        assert r["stats"]["link_packets_sent"][me] == [0 if d == me else 4 for d in range(3)]  # 2 steps x 2 phases
    t = res[0]["total"]
    assert t["messages_sent"] == t["messages_delivered"] == 2 * 2 * 3 * 2 and t["messages_lost"] == 0
    # rank s sends count + d float32 elements to rank d, 4 times
    assert t["bytes_sent"] == t["bytes_delivered"] == 4 * 4 * sum(500 + d for s in range(3) for d in range(3) if s != d)


@pytest.mark.parametrize("spec,buffers", REUSED)
def test_reused_buffers_deliver_exactly_in_loss_free_and_lossy_rounds(launches, spec, buffers):
    # one buffer pair: every exchange after a phase's first repeats its last one (no planning);
    # three pairs in turn: the persistent requests are set up per pair and replaced, and no
    # exchange repeats its phase's last; lossy rounds start only the links that lose nothing,
    # set up once per set of links lost on a buffer pair; receive buffers the transport
    # allocates (its general path: Isend/Irecv, no persistent requests) are the reference
    steps = REUSED_STEPS
    res = launches[3][f"reused-{spec}-{buffers}"]
    check_agreement(res, 3)
    assert [r["repeats"] for r in res] == [steps * 2 - 2 if buffers == 1 else 0] * 3
    lost = res[0]["total"]["messages_lost"]
    assert lost == 0 if spec == "random 0%" else 0 < lost < steps * 2 * 3 * 2
    if spec != "random 0%" and buffers == 1:  # some rank lost the same links again on its one pair
        seen = [[(tuple(e["lost_from"]), tuple(e["dropped_to"])) for e in r["trace"]] for r in res]
        lossy = [[x for x in rounds if any(x[0]) or any(x[1])] for rounds in seen]
        assert any(len(rounds) > len(set(rounds)) for rounds in lossy)
    fresh = launches[3][f"fresh-{spec}"]
    check_agreement(fresh, 3)
    assert [r["digest"] for r in res] == [r["digest"] for r in fresh]
    # rounds on kept buffers are counted per record and added when read: the same numbers
    counted = lambda r: {k: v for k, v in r["stats"].items() if k not in ("link_loss_rate", "delay_injected_s")}
    assert [counted(r) for r in res] == [counted(r) for r in fresh]


def test_exchanges_in_c_and_in_python_deliver_and_count_the_same(launches):
    # the suite's launches start and wait for persistent requests in C (the extension is built by
    # `make setup`); HVDU_NATIVE=0 makes the transport do it in Python: the same exchanges, bit for bit
    assert [r["native"] for r in launches[3]["native"]] == [True] * 3
    calls = {f"reused-{spec}-{buffers}": (TRACE, {"spec": spec, "steps": REUSED_STEPS, "buffers": buffers})
             for spec, buffers in REUSED}
    calls["tensors"] = (TRACE, {"spec": "random 30%", "count": 700, "steps": 4, "tensors": True})
    calls["native"] = (W + "native_wait", {})
    python = run_mpi_calls(3, calls, timeout=120, env={"HVDU_NATIVE": "0"})
    assert [r["native"] for r in python.pop("native")] == [False] * 3
    native = dict(launches[3], tensors=launches[3]["tensors-float32"])
    for name, res in python.items():
        check_agreement(res, 3)
        assert res == native[name], name


def test_repeated_exchanges_see_counts_and_buffers_changed_in_place(launches):
    res = launches[3]["in_place"]
    for r in res:
        assert r["exact"] == [True] * 8
        # repeats: the second even round on arrays, the second skewed one on lists, the last round
        assert r["repeats_after_arrays"] == 1 and r["repeats"] == 3
        assert r["errors"]["dtype"].startswith("ConfigError: recv='ndarray of (900,) x int32' is invalid")
        assert r["errors"]["shape"].startswith("ConfigError: recv='ndarray of (3, 300) x float32' is invalid")


def test_p1_delivers_nothing_and_does_not_hang(launches):
    res = launches[4]["p1"]
    for me, r in enumerate(res):
        for e in r["trace"]:
            assert e["arrived"] == [s == me for s in range(4)]
    t = res[0]["total"]
    assert t["messages_lost"] == t["messages_sent"] and t["bytes_delivered"] == 0


@pytest.mark.parametrize("args", [{}, {"recv": True}, {"repeat": True}, {"repeat": True, "native": "0"}])
def test_collective_with_an_absent_peer_times_out_naming_step_phase_and_peer(args):
    env = {"HVDU_NATIVE": args.pop("native")} if "native" in args else None
    rc, out = run_mpi(3, W + "timeout_names_step_phase_and_peer", args, timeout=60, env=env, expect_failure=True)
    assert "TransportTimeout" in out
    assert "step 7, phase 'reduce_scatter'" in out and "no message from rank(s) [1]" in out


def test_straggler_wait_is_interrupted_by_a_cancel_message(launches):
    r0, r1 = launches[2]["straggle"]
    assert r0["completed"] is True
    assert r1 == {"completed": False, "took_cancel": True, "second_cancel": False, "waited_less_than_delay": True}


def test_bad_loss_and_delay_models_are_rejected_on_every_rank_and_specs_accepted(launches):
    res = launches[3]["bad_models"]
    for r in res:
        e = r["errors"]
        assert "loss.matrix" in e["matrix"] and "3x3" in e["matrix"] and "2x2" in e["matrix"]
        assert e["loss_number"].startswith("loss=0.1 is invalid") and "'random 5%'" in e["loss_number"]
        assert e["delay_number"].startswith("delay=0.05 is invalid") and "'exponential 50ms'" in e["delay_number"]
        assert e["loss_spec"].startswith("loss='5' is invalid") and "5%" in e["loss_spec"]
        assert e["seed_text"] == "seed='7' is invalid: expected an integer"
        assert e["seed_float"] == "seed=0.5 is invalid: expected an integer"  # int() would have made it 0
        # p = 1%, r = 10%: pi_B = p / (p + r) = 1/11; loss 70% in B, 0.1% in G
        assert r["loss"] == "GilbertElliott" and abs(r["mean_loss"] - (0.7 / 11 + 0.001 * 10 / 11)) < 1e-12
        assert r["delay_mean"] == 0.05


def hung_ranks_left() -> str:
    """The processes (pids) of ``hang_forever`` launches still running."""
    return subprocess.run(["pgrep", "-f", "hang_forever"], capture_output=True, text=True).stdout


def test_harness_kills_a_hung_mpirun_and_every_rank():
    with pytest.raises(MpiRunError, match="killed its session"):
        run_mpi(2, W + "hang_forever", timeout=8)
    assert hung_ranks_left() == ""


def test_harness_kills_the_launch_when_its_wait_is_interrupted():
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):  # as Ctrl-C or pytest-timeout's limit would, mid-wait
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(Interrupted):
            run_mpi(2, W + "hang_forever", timeout=60)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert hung_ranks_left() == ""


def test_harness_names_the_call_that_raised_and_takes_every_rank_down():
    calls = {"first": (W + "fail_on", {"rank": -1}), "second": (W + "fail_on", {"rank": 1})}
    rc, out = run_mpi_calls(2, calls, timeout=60, expect_failure=True)  # rank 0 waits for rank 1 after "second"
    assert rc != 0 and "rank 1: call 'second' (tests.workers.transport:fail_on) failed" in out
    assert "ValueError: rank 1 fails on purpose" in out and "call 'first'" not in out


def test_stats_count_repeated_rounds_as_if_each_were_recorded():
    """Rounds are counted per record and added when the counters are read: clean and lossy
    rounds interleaved with records added at once (a parameter-server send) and with reads
    give the numbers of one record per round. A record is told apart by identity (as the
    transport keeps one per kind of round): another with the same contents counts on its own."""
    from hvd_unreliable.transport.stats import RoundRecord, TransportStats

    clean = RoundRecord((1, (0, 2), (1, 3), None, (40, 120), None, 2, 2, 160))
    lossy = RoundRecord((1, (0, 2), (1, 3), (1, 2), (40, 120), (40, 80), 1, 1, 40))
    folded, each = TransportStats(3), TransportStats(3)
    for rounds in ([clean] * 3, [lossy], [clean, RoundRecord(clean)] * 2 + [clean], [lossy, clean]):
        for r in rounds:
            each.record_exchange(*r)
            folded.record_round(r)
        for stats in (folded, each):
            stats.record_send(1, 0, 1, 1, 8, 8)  # recorded at once
        assert folded.counters == each.counters  # read mid-way, folded so far
    assert folded.link_sent.tolist() == each.link_sent.tolist() == [[0] * 3, [15, 0, 33], [0] * 3]
    assert folded.link_lost.tolist() == each.link_lost.tolist() == [[0] * 3, [6, 0, 4], [0] * 3]
    assert folded.counters["exchanges"] == 11 and folded.counters["bytes_sent"] == 11 * 160 + 4 * 8
    assert folded.counters["messages_lost"] == 2 * 1 + 4  # the lossy rounds lose one message of two
    folded.record_round(lossy)  # packed for the reduction across ranks: folded first
    each.record_exchange(*lossy)
    assert folded.pack().tolist() == each.pack().tolist()


def test_stats_keep_a_bounded_number_of_round_records_apart():
    # on many ranks nearly every lossy round loses other links and brings a record of its own:
    # past PENDING_MAX of them they are counted in, and the counts stay those of one record a round
    from hvd_unreliable.transport.stats import PENDING_MAX, RoundRecord, TransportStats

    folded, each = TransportStats(3), TransportStats(3)
    for i in range(3 * PENDING_MAX):
        r = RoundRecord((1, (0, 2), (1, 3), (i % 2, 0), (40, 120), (40 * (i % 2), 0), 2, 2, 160))
        each.record_exchange(*r)
        folded.record_round(r)
        assert len(folded._rounds) <= PENDING_MAX
    assert folded.counters == each.counters and folded.counters["exchanges"] == 3 * PENDING_MAX


def test_a_peer_ahead_in_an_exchange_of_another_dtype_is_no_mismatch(launches):
    """Rank 0 waits for a late rank 2 while rank 1, done with that exchange, has already sent its
    next, float16 block: the stalled wait looks for blocks of another dtype only from the peers it
    still waits for, and the first exchange's statuses survive that look (MPICH and Intel MPI
    empty a persistent request's status once asked)."""
    res = launches[3]["ahead"]
    count = 64
    assert res[0][0::2] == [[2.0] * count + [3.0] * count] * 2 and res[1][0::2] == [[1.0] * count] * 2
    for r in range(3):
        assert res[r][1] == res[r][3] == [1.0] * count + [2.0] * count + [3.0] * count


def test_exchange_tags_tell_dtypes_apart_and_agree_across_numpy_and_torch():
    """One tag per dtype, the same for a NumPy array and a torch tensor of it; bfloat16 tensors
    share int16's, the dtype host buffers carry them as (fusion.wire), so a rank that stages its
    tensors matches one that hands them to a CUDA-aware MPI; every tag within MPI's guaranteed
    range (32767)."""
    import numpy as np
    import torch

    from hvd_unreliable.algorithms.fusion import wire
    from hvd_unreliable.transport.transport import DTYPES, EXCHANGE_TAG, exchange_tag

    names = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "complex64"]
    tags = {name: exchange_tag(np.zeros(1, dtype=name)) for name in names}
    assert len(set(tags.values())) == len(names)
    assert all(exchange_tag(torch.zeros(1, dtype=getattr(torch, name))) == tag for name, tag in tags.items())
    bf16 = torch.zeros(4, dtype=torch.bfloat16)
    assert exchange_tag(bf16) == exchange_tag(wire(bf16)) == tags["int16"] != tags["float16"]
    assert exchange_tag(torch.zeros(1, dtype=torch.float8_e4m3fn)) == EXCHANGE_TAG not in tags.values()
    assert EXCHANGE_TAG + len(DTYPES) <= 32767


def test_native_wait_checks_its_buffers_before_it_calls_mpi():
    """The C hot path takes whole request handles and room for a status each, in bytearrays, or
    refuses them before any MPI call; with no requests it is done at once."""
    from hvd_unreliable.transport import native

    assert native.start_and_wait is not None, "the C extension is not built: `make setup` (pip install -e .) builds it"
    size = native.MPI._sizeof(native.MPI.Request)
    for handles, statuses in [(bytearray(size + 1), bytearray(1000)), (bytearray(2 * size), bytearray(1))]:
        with pytest.raises(ValueError, match="whole request handles"):
            native.start_and_wait(handles, statuses, 0, 0, 0, 0.05)
    with pytest.raises(TypeError, match="bytearrays"):
        native.start_and_wait(bytes(size), bytearray(1000), 0, 0, 0, 0.05)
    assert native.arguments([]) == (bytearray(), bytearray(), 0, 0, 0, native.SPIN_S)
    assert native.start_and_wait(*native.arguments([])) == 1


def test_native_wait_leaves_the_requests_of_lost_links_idle():
    # a round that loses links starts the others from the clean round's handles: here two
    # self-messages, A kept and B lost, complete A alone; B's receive started without its send
    # is pending after the spin (0), and an ill-sized loss mask is refused before any MPI call
    import numpy as np

    from hvd_unreliable.transport import native

    comm = native.MPI.COMM_SELF
    got, sent = np.zeros(2, dtype=np.int64), np.array([7, 9], dtype=np.int64)
    requests = [comm.Recv_init(got[0:1], source=0, tag=1), comm.Recv_init(got[1:2], source=0, tag=2),
                comm.Send_init(sent[0:1], dest=0, tag=1), comm.Send_init(sent[1:2], dest=0, tag=2)]
    args = native.arguments(requests)
    try:
        assert native.start_and_wait(*args, b"\0\1\0\1") == 1
        assert got.tolist() == [7, 0]
        assert native.start_and_wait(*args[:5], 0.01, b"\1\0\1\1") == 0  # B's receive, no send: pending
        requests[3].Start()
        native.MPI.Prequest.Waitall([requests[1], requests[3]])
        assert got.tolist() == [7, 9]
        for lost in (b"\0\0\0", bytearray(4)):
            with pytest.raises(ValueError, match="one per request handle"):
                native.start_and_wait(*args, lost)
        assert native.start_and_wait(*args, None) == 1  # None: every request, as without the argument
    finally:
        for r in requests:
            r.Free()


@pytest.mark.parametrize("nbytes", [1, 4 << 10, (256 << 10) - 4, 256 << 10, (256 << 10) + 4, (3 << 20) + 12])
def test_native_wait_copies_the_own_block_whole_in_its_pieces(nbytes):
    # the C hot path copies the own block in pieces of 256 KiB: sizes below, at and across the
    # piece's edges arrive whole, and nothing past the block is written
    import numpy as np

    from hvd_unreliable.transport import native

    src = np.random.default_rng(nbytes).integers(0, 256, nbytes + 8, dtype=np.uint8)
    dst = np.zeros(nbytes + 8, dtype=np.uint8)
    own = (dst.ctypes.data, src.ctypes.data, nbytes)
    assert native.start_and_wait(*native.arguments([], own)) == 1
    assert np.array_equal(dst[:nbytes], src[:nbytes]) and not dst[nbytes:].any()
