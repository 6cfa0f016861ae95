"""The only code that moves bytes between ranks: a lossy, delaying exchange over mpi4py.

:meth:`Transport.exchange` is an all-to-all: rank ``me`` sends block ``d`` of its send buffer to
rank ``d`` and receives block ``s`` of its receive buffer from rank ``s``. For every directed link
both ends ask the loss model the same question with the same coordinates
``(seed, step, phase, src, dst, call, packet)`` and get the same answer, so a lost message is
simply never transmitted (loss saves bandwidth, as on a real network) and the receiver knows
without being told what did not arrive.

* Message granularity (default): a block is one message, delivered whole or not at all.
* Packet granularity (``packet_bytes``): a block is cut into packets of ``packet_bytes``
  (rounded down to whole elements); packets are lost independently, survivors travel packed
  together, and the receiver gets a per-element arrival mask.

Data moves with buffer-based ``Isend``/``Irecv`` on surviving links only, on byte views of the
buffers (any dtype, bfloat16 included as raw 16-bit words), never pickled; the layout of an
exchange of a given shape is computed once and cached, and whole messages between buffers the
caller keeps restart MPI persistent requests, set up once for that layout and pair of buffers,
on the links that lose nothing (what to start, once per set of links lost); an exchange that
repeats its phase's last one on the same NumPy objects (as training does every step) goes
straight to those requests. Restarting them and waiting for them (own block included) is one
call into C where the extension is built (:mod:`.native`), Python's ``Startall``/``Testall``
otherwise. Exchange messages carry one tag per dtype (:func:`exchange_tag`):
every rank posts its sends and receives of a link in the same order, which MPI's non-overtaking
rule matches message by message, and a block of another dtype never lands in a buffer (a wait
that stalls looks for one: :class:`ExchangeMismatch`). Buffers are NumPy arrays (host memory)
or torch tensors, which a CUDA-aware MPI (:mod:`.cuda`) reads and writes on the GPU directly.
(``Ialltoallv`` with zero counts on lost links is the obvious alternative; inside this exchange
it was no faster than the persistent requests: docs/benchmarks-history.md.) Waits poll with a
deadline: an exchange a peer never joins produces :class:`TransportTimeout` naming the step, the
phase and the peer instead of a hang.
"""
from __future__ import annotations

import functools
import logging
import operator
import os
import time
from collections import Counter
from itertools import accumulate, compress
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import numpy as np
from mpi4py import MPI

from ..errors import ConfigError, ExchangeMismatch, TransportTimeout, check_packet_bytes, check_positive
from ..faults.delay import DelayModel, parse_delay_spec
from ..faults.loss import Bernoulli, LossModel, parse_loss_spec
from .cuda import mpi_cuda_aware
from .native import SPIN_S, arguments as native_arguments, start_and_wait as _start_and_wait
from .stats import RoundRecord, TransportStats

log = logging.getLogger(__name__)

CANCEL_TAG = 32000  # tag of "stop computing" messages (parameter-server variants)
EXCHANGE_TAG = 32001  # exchange messages: this tag + 1 + the index of their dtype in DTYPES (+ 0: another dtype)
DTYPES = ("float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "bool", "complex64", "complex128")  # NumPy's and torch's names alike (bfloat16: as int16, see exchange_tag)
# How often a cancellable straggler wait looks for its cancel message. A synchronous update restarts
# every learner; a late-noticed cancel delays the restart (python bench/bench_ps_runtime.py).
CANCEL_POLL_S = 2e-4
# Requests a wait gave up on (timeout, mismatched layouts), with the buffers they hold: MPI may
# still write into those, so they are kept until the process exits (a freed receive buffer that
# a late message fills corrupts the heap).
_ABANDONED: List[List[MPI.Request]] = []
_NO_MASKS = MappingProxyType({})  # Received._masks of whole messages: none


def packetize(count: int, itemsize: int, packet_bytes: Optional[int]):
    """``(num_packets, elements_per_packet)`` for a block of ``count`` elements."""
    if count == 0:
        return 0, 0
    if not packet_bytes:
        return 1, count
    per = max(1, packet_bytes // itemsize)
    return -(-count // per), per


def element_mask(lost_packets: np.ndarray, per: int, count: int) -> np.ndarray:
    """Per-element arrival mask from per-packet loss decisions."""
    return np.repeat(~lost_packets, per)[:count]


@dataclass
class Received:
    """What one rank got from :meth:`Transport.exchange`.

    ``data`` (a NumPy array, or a tensor when the buffers were tensors) holds block ``s`` at
    ``offsets[s]:offsets[s] + counts[s]`` (untouched where nothing arrived: a caller's ``recv``
    keeps its values there, a buffer allocated here holds garbage);
    ``arrived[s]`` says a message (at least one packet) came from ``s`` (read-only: exchanges of
    the same shape on buffers the caller keeps share it when they lose the same links);
    ``mask(s)`` is ``True``/``False`` for a whole block, or a per-element array with packets.
    Read it, do not change it: an exchange that repeats its phase's last one and loses nothing
    returns the same object again.
    """

    __slots__ = ("data", "counts", "offsets", "arrived", "_masks")
    data: np.ndarray
    counts: List[int]
    offsets: List[int]
    arrived: np.ndarray
    _masks: dict

    def block(self, src: int) -> np.ndarray:
        return self.data[self.offsets[src]:self.offsets[src] + self.counts[src]]

    def mask(self, src: int) -> Union[bool, np.ndarray]:
        return self._masks.get(src, bool(self.arrived[src]))


def _describe(x):
    """``(1-D and contiguous, elements, bytes per element)`` of a NumPy array or a torch tensor."""
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.flags.c_contiguous, x.size, x.itemsize
    return x.dim() == 1 and x.is_contiguous(), x.numel(), x.element_size()


def _bytes(x):
    return x.view(np.uint8) if isinstance(x, np.ndarray) else x.view(_torch().uint8)


def _empty(like, count: int):
    if isinstance(like, np.ndarray):
        return np.empty(count, dtype=like.dtype)
    return _torch().empty(count, dtype=like.dtype, device=like.device)


def _selector(like, mask: np.ndarray):
    """An element mask that indexes ``like`` (moved to the tensor's device)."""
    return mask if isinstance(like, np.ndarray) else _torch().from_numpy(mask).to(like.device)


def _torch():
    import torch  # only for tensor buffers: the transport itself loads without torch

    return torch


def _key(values):
    """A hashable, cheap stand-in for a sequence of counts (NumPy arrays by their bytes)."""
    if isinstance(values, np.ndarray):
        return values.dtype.char, values.tobytes()
    return None if values is None else tuple(values)


@dataclass
class _Plan:
    """The layout of one exchange shape, from the point of view of one rank.

    Links are listed receives first (``srcs``, from peers with a non-empty block for this rank),
    then sends (``dsts``); ``link_src``/``link_dst``/``link_packets``/``per_packet`` are per link
    in that order, ready for the loss model."""

    sc: List[int]
    rc: List[int]
    sdisp: List[int]
    rdisp: List[int]
    recv_size: int
    srcs: List[int]
    dsts: List[int]
    link_src: List[int]
    link_dst: List[int]
    link_packets: List[int]
    per_packet: List[int]
    send_packets: List[int]  # per send: packets offered
    send_bytes: List[int]  # per send: bytes offered
    recv_bytes: int  # bytes that arrive when nothing is lost
    all_delivered: List[bool]
    recv_ranges: List[tuple]  # (src, first byte, end byte) of each receive
    send_ranges: List[tuple]  # (dst, first byte, end byte) of each send
    peers: List[Optional[int]]  # per link (receives, then sends): the source, None for a send
    arrived: np.ndarray  # read-only: who delivers when nothing is lost
    own_range: tuple  # (first recv byte, first send byte, bytes) of the own block
    wired: dict = field(default_factory=dict)  # (send address, recv address, tag) -> _Wired
    deciders: dict = field(default_factory=dict)  # (phase, call) -> the loss model's message_decider for the links
    checked: bool = False  # whether a receive of this layout was checked against what its peer sent
    sizes: List[Optional[int]] = None  # per link (receives, then sends): bytes received, None for a send

    @classmethod
    def build(cls, me: int, n: int, send_size: int, itemsize: int, packet_bytes: Optional[int],
              send_counts, recv_counts, send_offsets) -> "_Plan":
        sc, rc = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        if len(sc) != n or len(rc) != n or min(sc) < 0 or min(rc) < 0:
            raise ConfigError("counts", (sc, rc), f"{n} non-negative counts each")
        if send_offsets is None:
            if sum(sc) != send_size:
                raise ConfigError("send_counts", sum(sc), f"the send buffer size {send_size}")
            sdisp = [e - c for c, e in zip(sc, accumulate(sc))]
        else:
            sdisp = [int(o) for o in send_offsets]
            if len(sdisp) != n or min(sdisp) < 0 or any(o + c > send_size for o, c in zip(sdisp, sc)):
                raise ConfigError("send_offsets", sdisp, f"{n} offsets keeping each block inside the send buffer")
        if sc[me] != rc[me]:
            raise ConfigError("recv_counts", rc[me], f"send_counts[{me}] = {sc[me]} (own block)")
        rdisp = [e - c for c, e in zip(rc, accumulate(rc))]
        srcs = [s for s in range(n) if s != me and rc[s]]
        dsts = [d for d in range(n) if d != me and sc[d]]
        counts = [rc[s] for s in srcs] + [sc[d] for d in dsts]
        shapes = [packetize(c, itemsize, packet_bytes) for c in counts]
        arrived = np.zeros(n, dtype=bool)
        arrived[srcs + [me]] = True
        arrived.flags.writeable = False
        packets, nr = [k for k, _ in shapes], len(srcs)
        send_packets, send_bytes = packets[nr:], [c * itemsize for c in counts[nr:]]
        return cls(sc, rc, sdisp, rdisp, sum(rc), srcs, dsts,
                   srcs + [me] * len(dsts), [me] * len(srcs) + dsts, packets, [per for _, per in shapes],
                   send_packets, send_bytes, sum(counts[:nr]) * itemsize, [False] * len(counts),
                   [(s, rdisp[s] * itemsize, (rdisp[s] + rc[s]) * itemsize) for s in srcs],
                   [(d, sdisp[d] * itemsize, (sdisp[d] + sc[d]) * itemsize) for d in dsts],
                   srcs + [None] * len(dsts), arrived, (rdisp[me] * itemsize, sdisp[me] * itemsize, rc[me] * itemsize),
                   sizes=[rc[s] * itemsize for s in srcs] + [None] * len(dsts))

    def unwire(self) -> None:
        """Free the persistent requests of every pair of buffers cached for this layout."""
        for w in self.wired.values():
            w.free()
        self.wired.clear()


@dataclass
class _Wired:
    """The exchanges of one plan on one pair of buffers, set up once: an MPI persistent request
    per link (receives, then sends) and the own block's byte views (``None`` when it is already
    in place). The requests hold views of the buffers, which keeps their memory alive while cached."""

    requests: List[MPI.Prequest]
    own: Optional[tuple]
    tag: int  # of the buffers' dtype
    own_args: tuple = (0, 0, 0)  # (into, from, bytes) addresses of a NumPy own block, for native.start_and_wait
    clean: Optional["_Round"] = None  # the round that loses nothing
    rounds: dict = field(default_factory=dict)  # the links lost (a tuple of bools) -> _Round seen on these buffers

    def free(self) -> None:
        for r in self.requests:
            r.Free()


class _Round(NamedTuple):
    """A round of one plan on one pair of buffers, the same every time it loses the same links:
    the requests to start (and the peer and expected bytes of each), who delivers (read-only)
    and the round's :meth:`TransportStats.record_round` record; ``native``: the arguments of
    :data:`~.native.start_and_wait` that start and wait for it (own block included), if built:
    the clean round's, with the links lost for the others."""

    requests: List[MPI.Prequest]
    peers: List[Optional[int]]
    sizes: List[Optional[int]]
    arrived: np.ndarray
    record: tuple
    native: Optional[tuple]

    @classmethod
    def build(cls, plan: "_Plan", wired: _Wired, lost: tuple, me: int) -> "_Round":
        nr, clean = len(plan.srcs), wired.clean  # (clean: None while this is the clean round being built)
        arrived, got, got_bytes = plan.arrived, nr, plan.recv_bytes
        if any(lost[:nr]):
            arrived = arrived.copy()
            for (src, lo, hi), gone in zip(plan.recv_ranges, lost):
                if gone:
                    arrived[src], got, got_bytes = False, got - 1, got_bytes - (hi - lo)
            arrived.flags.writeable = False
        sends = lost[nr:]
        lost_packets = lost_bytes = None  # (None: nothing lost)
        if any(sends):
            lost_packets, lost_bytes = tuple(map(int, sends)), tuple(map(operator.mul, plan.send_bytes, sends))
        fixed = clean.record if clean is not None else (me, tuple(plan.dsts), tuple(plan.send_packets), None,
                                                        tuple(plan.send_bytes))
        record = RoundRecord((*fixed[:3], lost_packets, fixed[4], lost_bytes, got, got, got_bytes))  # (a message a packet)
        kept = list(map(operator.not_, lost))  # the lost links' requests stay idle: both ends know which
        native = (clean.native + (bytes(lost),) if clean is not None and clean.native is not None
                  else native_arguments(wired.requests, wired.own_args))  # C starts the kept ones of all
        return cls(list(compress(wired.requests, kept)), list(compress(plan.peers, kept)), list(compress(plan.sizes, kept)),
                   arrived, record, native)


@dataclass
class _Repeat:
    """The last exchange of a phase between NumPy buffers the caller keeps, and the plan and
    requests it took. Training repeats it every step with the same objects; :meth:`matches`
    recognises the repeat from the objects and what of them can change in place (the buffers'
    dtype and number of dimensions, the contents of counts that are not tuples; strides set by
    hand are not looked at), so that it skips describing, checking and looking up again what it
    just did. It is recorded once that exchange succeeded, its layout checked against the peers'."""

    args: tuple  # (send, recv, send_counts, recv_counts, send_offsets): the objects themselves
    buffers: tuple  # the dtypes of send and recv
    keys: tuple  # per counts argument: its _key if it can change in place, else None
    plan: _Plan
    wired: _Wired
    received: Received  # what a round that loses nothing returns: the same every time

    @classmethod
    def record(cls, args: tuple, plan: _Plan, wired: _Wired) -> "_Repeat":
        send, recv = args[:2]
        return cls(args, (send.dtype, recv.dtype),
                   tuple(_mutable_key(v) for v in args[2:]), plan, wired,
                   Received(recv, plan.rc, plan.rdisp, wired.clean.arrived, _NO_MASKS))

    def matches(self, send, recv, send_counts, recv_counts, send_offsets) -> bool:
        a, b, k = self.args, self.buffers, self.keys  # (compared in line: a called helper costs more than all this)
        return (send is a[0] and recv is a[1] and send_counts is a[2] and recv_counts is a[3] and send_offsets is a[4]
                and send.ndim == 1 and send.dtype is b[0] and recv.ndim == 1 and recv.dtype is b[1]
                and (k[0] is None or _key(send_counts) == k[0]) and (k[1] is None or _key(recv_counts) == k[1])
                and (k[2] is None or _key(send_offsets) == k[2]))


def _mutable_key(values):
    """:func:`_key` of counts that can change in place; ``None`` for a tuple (its identity suffices)."""
    return None if type(values) is tuple else _key(values)


def exchange_tag(x) -> int:
    """The tag of exchange messages of ``x``'s dtype (a NumPy array or a torch tensor): blocks of
    different dtypes never match each other's receives, whose bytes would be averaged as
    another type's (float16 and bfloat16 blocks of the same size, say). A bfloat16 tensor gets
    int16's tag: host buffers carry bfloat16 as int16 (:func:`~hvd_unreliable.algorithms.fusion.wire`),
    and a rank that hands its tensors to a CUDA-aware MPI must still match one that stages them."""
    return _tag_of(x.dtype)


@functools.lru_cache(maxsize=None)
def _tag_of(dtype) -> int:
    name = dtype.name if isinstance(dtype, np.dtype) else str(dtype).replace("torch.", "")
    name = "int16" if name == "bfloat16" else name
    return EXCHANGE_TAG + (DTYPES.index(name) + 1 if name in DTYPES else 0)


def _dtype_of(tag: int) -> str:
    name = DTYPES[tag - EXCHANGE_TAG - 1] if tag > EXCHANGE_TAG else "a dtype not in DTYPES"
    return name + " (or bfloat16, which travels as int16)" if name == "int16" else name


def _address(x) -> int:
    return MPI.Get_address(x) if isinstance(x, np.ndarray) else x.data_ptr()


def _own_block(plan: "_Plan", rbytes, sbytes) -> Optional[tuple]:
    """Byte views ``(into recv, from send)`` of the own block, or ``None`` when it is empty or
    already where it belongs (``recv`` and ``send`` share that memory)."""
    at, frm, nbytes = plan.own_range
    if not nbytes or _address(rbytes) + at == _address(sbytes) + frm:
        return None
    return rbytes[at:at + nbytes], sbytes[frm:frm + nbytes]


def _lost_elements(lost: np.ndarray, per: int, count: int) -> int:
    """Elements in the lost packets of a block of ``count`` elements (the last packet may be short)."""
    k = int(np.count_nonzero(lost))
    return k * per - (per * lost.size - count if lost[-1] else 0)


class Transport:
    """Lossy, delaying point-to-point exchange between the ranks of ``comm``.

    Args:
        comm: the mpi4py communicator (duplicated, so its traffic never mixes with the user's).
        loss: the loss model (default: reliable), or its netem spec (``"random 5%"``,
            ``"gemodel 1% 10% 70% 0.1%"``).
        delay: straggler-delay model used by :meth:`straggle`, or its spec (``"exponential 50ms"``).
        seed: the seed every decision is keyed by.
        packet_bytes: packet size in bytes, or ``None``/0 for message granularity.
        timeout: seconds an exchange may wait for a peer before raising :class:`TransportTimeout`.
        cuda_aware: whether callers may hand it CUDA tensors (default: asked of the MPI library,
            :func:`~hvd_unreliable.transport.cuda.mpi_cuda_aware`); otherwise they stage them.
    """

    def __init__(self, comm: MPI.Comm, loss: Union[LossModel, str, None] = None, delay: Union[DelayModel, str, None] = None,
                 seed: int = 0, packet_bytes: Optional[int] = None, timeout: float = 300.0,
                 cuda_aware: Optional[bool] = None):
        check_positive("timeout", timeout)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError("seed", seed, "an integer")
        if isinstance(loss, str):
            loss = parse_loss_spec(loss, "loss")
        if isinstance(delay, str):
            delay = DelayModel(parse_delay_spec(delay, "delay"), seed)
        if loss is not None and not isinstance(loss, LossModel):
            raise ConfigError("loss", loss, "a loss model of hvd_unreliable.faults (PerLink.from_matrix(m) for a matrix of loss "
                              "probabilities) or a netem spec such as 'random 5%'")
        if delay is not None and not isinstance(delay, DelayModel):
            raise ConfigError("delay", delay, "a DelayModel or a spec such as 'exponential 50ms'")
        self.loss = loss if loss is not None else Bernoulli(0.0)
        self.loss.check_world(comm.Get_size())  # validated on every rank before any communication
        self.delay = delay
        self.seed, self.timeout = int(seed), float(timeout)
        self.packet_bytes = check_packet_bytes("packet_bytes", packet_bytes)
        self.cuda_aware = mpi_cuda_aware() if cuda_aware is None else bool(cuda_aware)
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.stats = TransportStats(self.size)
        self.step = 0
        self._calls: dict = {}  # phase -> exchanges of it in this step
        self._sent_to: Counter = Counter()
        self._plans: dict = {}
        self._repeats: dict = {}  # phase -> _Repeat of its last exchange on kept NumPy buffers

    # ---- bookkeeping -----------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Start training step ``step``: decisions are keyed by it, call counters restart."""
        self.step = int(step)
        self._calls.clear()

    def _next_call(self, phase: str) -> int:
        call = self._calls[phase] = self._calls.get(phase, -1) + 1
        return call

    def _message_decider(self, plan: "_Plan", phase: str, call: int) -> Callable[[int], Sequence[bool]]:
        """The loss model's whole-message decider for ``plan``'s links in ``phase`` and ``call``, kept
        in ``plan.deciders``: what an exchange asks, as ``plan.deciders.get((phase, call)) or`` this."""
        if len(plan.deciders) >= 64:  # (a training step has a few phases and calls: a handful)
            plan.deciders.clear()
        decide = plan.deciders[phase, call] = self.loss.message_decider(phase, plan.link_src, plan.link_dst,
                                                                        self.seed, call)
        return decide

    def _link_fates(self, plan: "_Plan", phase: str, call: int) -> Sequence:
        """Per link of ``plan`` (receives, then sends): ``False`` delivered whole, ``True`` lost
        whole, or with packets partly lost the per-packet loss flags."""
        if self.loss.never_loses:
            return plan.all_delivered
        if not self.packet_bytes:
            return (plan.deciders.get((phase, call)) or self._message_decider(plan, phase, call))(self.step)
        fates = []
        for lost in self.loss.decide_links(self.step, phase, plan.link_src, plan.link_dst, plan.link_packets,
                                           self.seed, call):
            k = int(np.count_nonzero(lost))
            fates.append(False if k == 0 else True if k == lost.size else lost)
        return fates

    def _plan(self, size: int, itemsize: int, send_counts, recv_counts, send_offsets) -> "_Plan":
        """The validated layout of an exchange of this shape (cached: training repeats shapes)."""
        key = (size, itemsize, _key(send_counts), _key(recv_counts), _key(send_offsets))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 256:
                self._forget_plans()
            plan = self._plans[key] = _Plan.build(self.rank, self.size, size, itemsize, self.packet_bytes,
                                                  send_counts, recv_counts, send_offsets)
        return plan

    # ---- the exchange ----------------------------------------------------------------------
    def exchange(self, send: np.ndarray, send_counts: Sequence[int], recv_counts: Sequence[int],
                 phase: str, recv: Optional[np.ndarray] = None,
                 send_offsets: Optional[Sequence[int]] = None) -> Received:
        """Lossy all-to-all of 1-D ``send``.

        Block ``d`` (for rank ``d``) is ``send[send_offsets[d]:][:send_counts[d]]``; by default
        blocks are laid out back to back. Offsets may alias, e.g. all 0 to send one buffer to
        every rank (a lossy broadcast) without copying it; ``recv`` may be ``send`` itself (the
        own block is then not copied when it is already in place). ``send`` and ``recv`` are NumPy
        arrays, or torch tensors of one device (CUDA tensors need a CUDA-aware MPI). At message
        granularity, MPI persistent requests on ``send`` and a caller's ``recv`` are kept for the
        next exchange of this shape on the same buffers (holding a reference to both) until two
        other pairs of buffers take their place or the transport is freed. Repeating a phase's
        last exchange with the same NumPy objects is the cheapest call (counts as tuples the
        cheapest of all: they cannot change in place, so they are not compared).
        """
        repeat = self._repeats.get(phase)
        if repeat is not None and repeat.matches(send, recv, send_counts, recv_counts, send_offsets):
            call = self._next_call(phase)
            clean = repeat.wired.clean
            if self.loss.never_loses and clean.native is not None:  # the hot path of a loss-free run:
                done = _start_and_wait(*clean.native)  # :meth:`_restart` of the clean round, in C
                if done != 1:
                    self._wait_after_native(done, clean, phase, call, repeat.wired.tag)
                self.stats.record_round(clean.record)
                return repeat.received
            return self._restart(repeat.plan, repeat.wired, send, recv, phase, call, repeat.received)
        flat, size, item = _describe(send)
        if not flat:
            raise ConfigError("send", f"shape {tuple(send.shape)}", "a contiguous 1-D array")
        plan = self._plan(size, item, send_counts, recv_counts, send_offsets)
        callers_recv = recv is not None  # a buffer the caller keeps: worth persistent requests
        if recv is None:
            recv = _empty(send, plan.recv_size)
        elif (type(recv) is not type(send) or recv.dtype != send.dtype or _describe(recv) != (True, plan.recv_size, item)
              or (not isinstance(send, np.ndarray) and recv.device != send.device)):
            raise ConfigError("recv", f"{type(recv).__name__} of {tuple(recv.shape)} x {recv.dtype}",
                              f"a contiguous {type(send).__name__} of {plan.recv_size} x {send.dtype}, like send")
        call = self._next_call(phase)
        if callers_recv and not self.packet_bytes:  # whole messages between buffers kept: the common case
            key = (_address(send), _address(recv), exchange_tag(send))
            wired = plan.wired.get(key) or self._wire(plan, send, recv, key)
            received = self._restart(plan, wired, send, recv, phase, call)
            if type(send) is np.ndarray and type(recv) is np.ndarray:  # (a tensor's memory can change in place)
                self._repeats[phase] = _Repeat.record((send, recv, send_counts, recv_counts, send_offsets), plan, wired)
            return received
        fates = self._link_fates(plan, phase, call)
        nr = len(plan.srcs)

        me, packets = self.rank, bool(self.packet_bytes)
        rbytes, sbytes = _bytes(recv), _bytes(send)
        arrived = np.zeros(self.size, dtype=bool)
        masks, unpack, incoming, outgoing = {}, [], [], []
        got_messages = got_packets = got_bytes = 0

        # Receives, on surviving links only.
        for i, (src, lo, hi) in enumerate(plan.recv_ranges):
            fate, cnt = fates[i], plan.rc[src]
            if fate is True:
                if packets:
                    masks[src] = np.zeros(cnt, dtype=bool)
                continue
            arrived[src] = True
            if fate is False:
                view = rbytes[lo:hi]
                got_packets += plan.link_packets[i]
                if packets:
                    masks[src] = np.ones(cnt, dtype=bool)
            else:  # some packets lost: the survivors arrive packed, unpacked after the wait
                keep = masks[src] = element_mask(fate, plan.per_packet[i], cnt)
                tmp = _empty(recv, cnt - _lost_elements(fate, plan.per_packet[i], cnt))
                first = plan.rdisp[src]
                unpack.append((recv[first:first + cnt], _selector(recv, keep), tmp))
                view = _bytes(tmp)
                got_packets += fate.size - int(np.count_nonzero(fate))
            got_messages += 1
            got_bytes += view.nbytes
            incoming.append((view, src))

        # Sends; lost messages and packets are never put on the wire.
        lost_packets, lost_bytes = [], []
        for i, (dst, lo, hi) in enumerate(plan.send_ranges):
            fate, cnt = fates[nr + i], plan.sc[dst]
            if fate is False:
                outgoing.append((sbytes[lo:hi], dst))
            elif fate is not True:
                first = plan.sdisp[dst]
                kept = send[first:first + cnt][_selector(send, element_mask(fate, plan.per_packet[nr + i], cnt))]
                outgoing.append((_bytes(kept), dst))
            lost_packets.append(0 if fate is False else plan.link_packets[nr + i] if fate is True else
                                int(np.count_nonzero(fate)))
            lost_bytes.append(0 if fate is False else hi - lo if fate is True else
                              _lost_elements(fate, plan.per_packet[nr + i], cnt) * item)
        if packets:
            masks[me] = np.ones(plan.rc[me], dtype=bool)
        arrived[me] = True
        own = _own_block(plan, rbytes, sbytes)
        if own:
            own[0][:] = own[1]
        self._sync(send)
        tag = exchange_tag(send)
        requests = [self.comm.Irecv(view, source=src, tag=tag) for view, src in incoming]
        requests += [self.comm.Isend(view, dest=dst, tag=tag) for view, dst in outgoing]
        self._finish(requests, phase, call,
                     [src for _, src in incoming] + [None] * len(outgoing), plan, tag,
                     None if plan.checked else [view.nbytes for view, _ in incoming] + [None] * len(outgoing))
        for view, keep, tmp in unpack:
            view[keep] = tmp
        self.stats.record_exchange(me, plan.dsts, plan.send_packets, lost_packets, plan.send_bytes,
                                   lost_bytes, got_messages, got_packets, got_bytes)
        return Received(recv, plan.rc, plan.rdisp, arrived, masks)

    def _restart(self, plan: "_Plan", wired: _Wired, send, recv, phase: str, call: int,
                 received: Optional[Received] = None) -> Received:
        """Whole messages between buffers the caller keeps: restart the persistent requests of the
        links that lose nothing (``wired``: set up once per layout and pair of buffers; a round
        that loses some links, once per set of links lost). ``received``: what a round that loses
        nothing returns (a repeat's, kept with it), if known."""
        round_ = wired.clean  # the common round: every link delivers
        if not self.loss.never_loses:  # (nothing to ask otherwise: the hot path of a loss-free run)
            fates = (plan.deciders.get((phase, call)) or self._message_decider(plan, phase, call))(self.step)
            if any(fates):
                lost = tuple(fates)
                round_ = wired.rounds.get(lost)
                if round_ is None:
                    if len(wired.rounds) >= 64:
                        wired.rounds.clear()
                    round_ = wired.rounds[lost] = _Round.build(plan, wired, lost, self.rank)
        native = round_.native if plan.checked else None  # (a layout's first round checks statuses in Python)
        own = wired.own  # the own block is copied before the messages start, not while MPI copies
        if own and not (native and wired.own_args[2]):  # them (docs/benchmarks.md); C copies a NumPy one
            own[0][:] = own[1]
        if type(send) is not np.ndarray:
            self._sync(send)
        if native is None:
            MPI.Prequest.Startall(round_.requests)
            self._finish(round_.requests, phase, call, round_.peers, plan, wired.tag, round_.sizes)
        else:
            done = _start_and_wait(*native)
            if done != 1:
                self._wait_after_native(done, round_, phase, call, wired.tag)
        self.stats.record_round(round_.record)
        if received is not None and round_ is wired.clean:
            return received
        return Received(recv, plan.rc, plan.rdisp, round_.arrived, _NO_MASKS)

    def _finish(self, requests: list, phase: str, call: int, peers: List[Optional[int]],
                plan: "_Plan", tag: int, sizes: Optional[List[Optional[int]]]) -> None:
        """With the messages on their way (with ``tag``), wait for them. In the first exchange of
        each layout that receives anything, the bytes that arrived are compared with ``sizes`` (per
        request: the bytes expected, ``None`` for a send; only read until ``plan`` is checked, so
        callers may pass ``None`` after that): ranks whose layouts differ (tensors of other sizes or
        dtypes) fail here instead of averaging misaligned blocks."""
        if plan.checked or all(b is None for b in sizes):
            if not MPI.Request.Testall(requests):  # (most often already done: no wait to set up)
                self._wait(requests, phase, call, peers, tag=tag)
            return
        statuses, failed = [MPI.Status() for _ in requests], None
        try:
            self._wait(requests, phase, call, peers, statuses=statuses, tag=tag)
        except MPI.Exception as e:  # MPI_ERR_IN_STATUS, e.g. a message truncated: the statuses say which
            failed = e
        for st, size, src in zip(statuses, sizes, peers):
            # error fields are set only when the wait failed: then also MPI_ERR_PENDING (not done yet)
            error = MPI.Get_error_class(st.Get_error()) if failed is not None else MPI.SUCCESS
            got, truncated = st.Get_count(MPI.BYTE), error == MPI.ERR_TRUNCATE
            if size is not None and error != MPI.ERR_PENDING and (got != size or truncated):
                raise ExchangeMismatch(
                    f"step {self.step}, phase {phase!r} (call {call}): rank {self.rank} received "
                    f"{f'more than {size}' if truncated else got} bytes from rank {src} where its layout "
                    f"expects {size}. Every rank must pass tensors of the same sizes and dtypes, in the "
                    f"same order (the same model).") from failed
        if failed is not None:
            raise failed
        plan.checked = True

    def _wait_after_native(self, done: int, round_: _Round, phase: str, call: int, tag: int) -> None:
        """After :data:`~.native.start_and_wait` returned ``done``: an MPI error (< 0), or
        requests still pending after its spin, which :meth:`_wait` then waits for."""
        if done < 0:
            _ABANDONED.append(round_.requests)
            raise MPI.Exception(-done)
        self._wait(round_.requests, phase, call, round_.peers, spin=0.0, tag=tag)

    def _wire(self, plan: "_Plan", send, recv, key: tuple) -> _Wired:
        """Persistent requests for the exchanges of ``plan`` between these buffers (cached
        on the plan under ``key``: their addresses and the messages' tag; two buffer pairs at a
        time: training repeats the same ones)."""
        if len(plan.wired) >= 2:
            plan.unwire()
            self._repeats.clear()  # (they may hold the requests just freed)
        rbytes, sbytes = _bytes(recv), _bytes(send)
        tag = key[2]
        requests = [self.comm.Recv_init(rbytes[lo:hi], source=src, tag=tag) for src, lo, hi in plan.recv_ranges]
        requests += [self.comm.Send_init(sbytes[lo:hi], dest=dst, tag=tag) for dst, lo, hi in plan.send_ranges]
        own = _own_block(plan, rbytes, sbytes)
        host = own is not None and type(send) is np.ndarray and type(recv) is np.ndarray
        wired = plan.wired[key] = _Wired(requests, own, tag,
                                         (_address(own[0]), _address(own[1]), own[0].nbytes) if host else (0, 0, 0))
        wired.clean = _Round.build(plan, wired, tuple(plan.all_delivered), self.rank)
        return wired

    def _forget_plans(self) -> None:
        for plan in self._plans.values():
            plan.unwire()
        self._plans.clear()
        self._repeats.clear()

    @staticmethod
    def _sync(send) -> None:
        if not isinstance(send, np.ndarray) and send.is_cuda:  # MPI uses device memory: finish the kernels on it first
            _torch().cuda.current_stream(send.device).synchronize()

    def _wait(self, requests: List[MPI.Request], phase: str, call: int, peers: Sequence[Optional[int]],
              status: Optional[MPI.Status] = None, spin: float = SPIN_S, statuses: Optional[list] = None,
              tag: Optional[int] = None) -> None:
        """Wait for ``requests`` like ``Waitall``, but give up at the deadline.

        ``peers[i]`` is the rank request ``i`` receives from (``MPI.ANY_SOURCE`` for any, ``None``
        for a send); ``status`` (one request) or ``statuses`` (one per request) are filled in.
        Polls ``Testall`` (which also drives MPI's progress), yielding the core every 16 polls so
        that oversubscribed ranks still run (Open MPI also yields inside a poll when it
        oversubscribes the cores; a yield after every poll was slower: docs/benchmarks-history.md);
        after ``spin`` seconds of waiting (50 ms: longer than a transfer, so a straggler) it
        sleeps between polls instead of spinning, and the receives of an exchange (``tag``: its
        messages') look for a message of another dtype (:meth:`_check_dtypes`). At the deadline
        it raises :class:`TransportTimeout` naming the step, the phase and the peers that sent
        nothing; the requests stay posted (kept alive with their buffers), so the transport is not
        to be used after that (the job is ending).
        """
        if not requests:
            return
        if status is not None:  # one request, whose status the caller reads
            test, arg = requests[0].Test, status
        elif statuses is not None:
            test, arg = functools.partial(MPI.Request.Testall, requests), statuses
        else:
            test, arg = MPI.Request.Testall, requests
        try:
            if test(arg):  # already done
                return
            start = time.monotonic()
            deadline = start + self.timeout
            polls, seen = 0, {}  # seen: request index -> its status, if _check_dtypes found it complete
            while not test(arg):
                polls += 1
                if polls & 255:
                    if not polls & 15:
                        os.sched_yield()
                    continue
                now = time.monotonic()
                if now > deadline:
                    missing = sorted({p for r, p in zip(requests, peers) if p is not None and not r.Test()})
                    what = ("no message from any rank" if missing == [MPI.ANY_SOURCE] else
                            f"no message from rank(s) {missing}" if missing else
                            "sends not taken by the receiving rank(s)")
                    raise TransportTimeout(
                        f"step {self.step}, phase {phase!r} (call {call}): rank {self.rank} timed out "
                        f"after {self.timeout:g}s: {what}. A peer may have died, or the ranks called "
                        f"different collectives.")
                if now - start > spin:
                    if tag is not None:
                        self._check_dtypes(requests, peers, tag, phase, call, seen)
                    time.sleep(2e-4)
            if statuses is not None:
                for i, st in seen.items():
                    statuses[i] = st
        except BaseException:  # timed out, an MPI error, interrupted: MPI may still use the buffers
            _ABANDONED.append(requests)
            raise

    def _check_dtypes(self, requests: List[MPI.Request], peers: Sequence[Optional[int]], tag: int,
                      phase: str, call: int, seen: dict) -> None:
        """Raise :class:`ExchangeMismatch` when a peer whose message this exchange still waits for
        has sent an exchange message of another dtype instead. (Messages between two ranks arrive
        in the order they were sent, and matching a receive completes it or keeps its sender
        waiting: a later exchange's message cannot wait there ahead of this one's, so the receive
        is tested again after the probe, which may have delivered this exchange's message.) The
        status of a receive found complete goes into ``seen`` (its index -> status): MPICH and
        Intel MPI leave a later test of a persistent request an empty one."""
        probed = MPI.Status()
        for i, (r, src) in enumerate(zip(requests, peers)):
            if src is None or src == MPI.ANY_SOURCE or i in seen:
                continue
            status = MPI.Status()
            if r.Get_status(status):
                seen[i] = status
                continue
            if not self.comm.Iprobe(source=src, tag=MPI.ANY_TAG, status=probed):
                continue
            theirs = probed.Get_tag()
            if not EXCHANGE_TAG <= theirs <= EXCHANGE_TAG + len(DTYPES) or theirs == tag:
                continue
            if r.Get_status(status):
                seen[i] = status
            else:
                raise ExchangeMismatch(
                    f"step {self.step}, phase {phase!r} (call {call}): rank {self.rank} waits for a block of "
                    f"{_dtype_of(tag)} from rank {src}, which sent {_dtype_of(theirs)}. Every rank must pass "
                    f"tensors of the same sizes and dtypes, in the same order (the same model).")

    # ---- point to point (parameter server) ---------------------------------------------------
    HEADER = 4  # int64 words of a message header

    def send_message(self, header: Sequence[int], payload: Optional[np.ndarray], dst: int, tag: int,
                     phase: str, wait: bool = True):
        """Send a reliable ``header`` and a lossy ``payload`` to ``dst``; returns whether the payload
        went out, or with ``wait=False`` ``(went_out, request)``: the payload is then sent without
        blocking and must stay untouched until ``request`` completes.

        The header (a few int64 words: what the message is, which model version) always arrives:
        it stands for the control traffic a real protocol retries. The payload is dropped by the
        loss model, keyed by this rank's running message count to ``dst``, so a receiver learns
        from the header that a payload was lost instead of waiting for it.
        """
        call = self._sent_to[dst]  # this rank's running message count to dst: never repeats
        self._sent_to[dst] += 1
        lost = False
        if payload is not None and payload.size and not self.loss.never_loses:
            npk = packetize(payload.size, payload.itemsize, self.packet_bytes)[0]
            lost = bool(self.loss.decide(self.step, phase, self.rank, dst, npk, self.seed, call).any())
        head = np.zeros(self.HEADER, dtype=np.int64)
        head[:len(header)] = header
        head[-1] = -1 if payload is None else (0 if lost else payload.size)
        self.comm.Send(head, dest=dst, tag=tag)
        request = None
        if payload is not None:
            nbytes = payload.nbytes
            self.stats.record_send(self.rank, dst, 1, int(lost), nbytes, nbytes if lost else 0)
            if not lost:
                if wait:
                    self.comm.Send(payload.view(np.uint8), dest=dst, tag=tag)
                else:
                    request = self.comm.Isend(payload.view(np.uint8), dest=dst, tag=tag)
        return not lost if wait else (not lost, request)

    def recv_message(self, source: int, tag: int, payload: Optional[np.ndarray], phase: str):
        """Receive one message from ``source`` (or ``MPI.ANY_SOURCE``) with ``tag``, within the timeout.

        Returns ``(src, header, delivered)``; ``payload`` (a buffer of the expected size) is
        filled when ``delivered``. Waiting for the header is waiting for a peer to finish its
        work, not for a transfer: after 1 ms it sleeps between polls, leaving the cores to the
        ranks that compute.
        """
        head = np.empty(self.HEADER, dtype=np.int64)
        status = MPI.Status()
        req = self.comm.Irecv(head, source=source, tag=tag)
        self._wait([req], phase, 0, [source], status, spin=1e-3)
        src = status.Get_source()
        size = int(head[-1])
        if size > 0:
            if payload is None or payload.size != size:
                raise ConfigError("payload", None if payload is None else payload.size, f"a buffer of {size} elements")
            req = self.comm.Irecv(payload.view(np.uint8), source=src, tag=tag)
            self._wait([req], phase, 0, [src])
            self.stats.record_receive(1, payload.nbytes)
        return src, head, size > 0

    # ---- stragglers ------------------------------------------------------------------------
    def straggle(self, step: Optional[int] = None, seconds: Optional[float] = None,
                 cancellable: bool = False, cancel_tag: int = CANCEL_TAG) -> bool:
        """Wait this rank's straggler delay (from the delay model unless ``seconds`` is given).

        With ``cancellable``, a message with tag ``cancel_tag`` (default :data:`CANCEL_TAG`) from
        any rank ends the wait early (it is left for the caller to receive); the wait polls for it
        every :data:`CANCEL_POLL_S` seconds. Returns ``True`` if the full delay elapsed.
        """
        if seconds is None:
            seconds = self.delay(self.step if step is None else step, self.rank) if self.delay else 0.0
        start = time.monotonic()
        end = start + seconds
        completed = True
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if cancellable and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=cancel_tag):
                completed = False
                break
            time.sleep(min(end - now, CANCEL_POLL_S if cancellable else end - now))
        self.stats.delay_injected_s += time.monotonic() - start
        return completed

    def cancel(self, dst: int) -> None:
        """Tell rank ``dst`` to stop its current straggler wait (reliable control message)."""
        self.comm.Send(np.zeros(1, dtype=np.uint8), dest=dst, tag=CANCEL_TAG)

    def take_cancel(self) -> bool:
        """Consume one pending cancel message, if any."""
        if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=CANCEL_TAG):
            self.comm.Recv(np.zeros(1, dtype=np.uint8), source=MPI.ANY_SOURCE, tag=CANCEL_TAG)
            return True
        return False

    # ---- statistics -------------------------------------------------------------------------
    def total_stats(self) -> TransportStats:
        """Counters summed over all ranks (collective)."""
        vec = self.stats.pack()
        out = np.empty_like(vec)
        self.comm.Allreduce(vec, out, op=MPI.SUM)
        return TransportStats.unpack(out, self.size)

    def log_stats(self) -> None:
        log.info("rank %d transport: %s", self.rank, self.stats.summary())

    def state_dict(self) -> dict:
        """Fault-model state, step and counters: what a checkpoint needs to resume exactly."""
        return {"loss": self.loss.state_dict(), "step": self.step, "stats": self.stats.pack()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state.get("loss", {}))
        self.set_step(state.get("step", 0))
        if "stats" in state:
            self.stats = TransportStats.unpack(state["stats"], self.size)

    def free(self) -> None:
        if self.comm != MPI.COMM_NULL:
            self._forget_plans()
            self.comm.Free()
