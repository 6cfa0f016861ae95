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

Data moves with buffer-based ``Isend``/``Irecv`` on contiguous byte views of NumPy arrays (any
dtype, bfloat16 included as raw 16-bit words), never pickled. Waits poll with a deadline:
a peer that never sends produces :class:`TransportTimeout` naming the step, the phase and the
peer instead of a hang.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from itertools import accumulate
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
from mpi4py import MPI

from ..errors import ConfigError, TransportTimeout
from ..faults.delay import DelayModel
from ..faults.loss import Bernoulli, LossModel
from .stats import TransportStats

log = logging.getLogger(__name__)

CANCEL_TAG = 32000  # tag of "stop computing" messages (parameter-server variants)


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

    ``data`` holds block ``s`` at ``offsets[s]:offsets[s] + counts[s]`` (untouched where nothing
    arrived: a caller's ``recv`` keeps its values there, a buffer allocated here holds garbage);
    ``arrived[s]`` says a message (at least one packet) came from ``s``;
    ``mask(s)`` is ``True``/``False`` for a whole block, or a per-element array with packets.
    """

    data: np.ndarray
    counts: List[int]
    offsets: List[int]
    arrived: np.ndarray
    _masks: dict

    def block(self, src: int) -> np.ndarray:
        return self.data[self.offsets[src]:self.offsets[src] + self.counts[src]]

    def mask(self, src: int) -> Union[bool, np.ndarray]:
        return self._masks.get(src, bool(self.arrived[src]))


class Transport:
    """Lossy, delaying point-to-point exchange between the ranks of ``comm``.

    Args:
        comm: the mpi4py communicator (duplicated, so its traffic never mixes with the user's).
        loss: the loss model (default: reliable).
        delay: straggler-delay model used by :meth:`straggle`.
        seed: the seed every decision is keyed by.
        packet_bytes: packet size in bytes, or ``None``/0 for message granularity.
        timeout: seconds an exchange may wait for a peer before raising :class:`TransportTimeout`.
    """

    def __init__(self, comm: MPI.Comm, loss: Optional[LossModel] = None, delay: Optional[DelayModel] = None,
                 seed: int = 0, packet_bytes: Optional[int] = None, timeout: float = 300.0):
        if packet_bytes is not None and (not isinstance(packet_bytes, int) or packet_bytes < 0):
            raise ConfigError("network.packet_bytes", packet_bytes, "null/0 (whole messages) or a positive integer")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError("network.timeout", timeout, "a number of seconds > 0")
        self.loss = loss if loss is not None else Bernoulli(0.0)
        self.loss.check_world(comm.Get_size())  # validated on every rank before any communication
        self.delay = delay
        self.seed, self.packet_bytes, self.timeout = int(seed), packet_bytes or None, float(timeout)
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.stats = TransportStats(self.size)
        self.step = 0
        self._calls: Counter = Counter()
        self._sent_to: Counter = Counter()
        self._tag = 0

    # ---- bookkeeping -----------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Start training step ``step``: decisions are keyed by it, call counters restart."""
        self.step = int(step)
        self._calls.clear()

    def _next_call(self, phase: str) -> int:
        call = self._calls[phase]
        self._calls[phase] += 1
        return call

    def decide(self, phase: str, call: int, srcs, dsts, counts, itemsize: int) -> list:
        """Per-packet loss decisions of links ``srcs[i] -> dsts[i]`` (the same on both ends);
        ``None`` for a link when the model never loses."""
        npk = [packetize(c, itemsize, self.packet_bytes)[0] for c in counts]
        if self.loss.never_loses:
            return [None] * len(npk)
        return self.loss.decide_links(self.step, phase, srcs, dsts, npk, self.seed, call)

    # ---- the exchange ----------------------------------------------------------------------
    def exchange(self, send: np.ndarray, send_counts: Sequence[int], recv_counts: Sequence[int],
                 phase: str, recv: Optional[np.ndarray] = None,
                 send_offsets: Optional[Sequence[int]] = None) -> Received:
        """Lossy all-to-all of 1-D ``send``.

        Block ``d`` (for rank ``d``) is ``send[send_offsets[d]:][:send_counts[d]]``; by default
        blocks are laid out back to back. Offsets may alias, e.g. all 0 to send one buffer to
        every rank (a lossy broadcast) without copying it.
        """
        n, me = self.size, self.rank
        sc, rc = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        if send.ndim != 1 or not send.flags.c_contiguous:
            raise ConfigError("send", f"shape {send.shape}", "a contiguous 1-D array")
        if len(sc) != n or len(rc) != n or min(sc) < 0 or min(rc) < 0:
            raise ConfigError("counts", (sc, rc), f"{n} non-negative counts each")
        if send_offsets is None:
            if sum(sc) != send.size:
                raise ConfigError("send_counts", sum(sc), f"the send buffer size {send.size}")
            sdisp = [e - c for c, e in zip(sc, accumulate(sc))]
        else:
            sdisp = [int(o) for o in send_offsets]
            if len(sdisp) != n or min(sdisp) < 0 or any(o + c > send.size for o, c in zip(sdisp, sc)):
                raise ConfigError("send_offsets", sdisp, f"{n} offsets keeping each block inside the send buffer")
        if recv is None:
            recv = np.empty(sum(rc), dtype=send.dtype)
        elif recv.size != sum(rc) or recv.dtype != send.dtype:
            raise ConfigError("recv", f"{recv.size} x {recv.dtype}", f"{sum(rc)} x {send.dtype}")
        rdisp = [e - c for c, e in zip(rc, accumulate(rc))]
        call = self._next_call(phase)
        self._tag = (self._tag + 1) % CANCEL_TAG
        item = send.itemsize
        arrived = np.zeros(n, dtype=bool)
        masks, unpack, requests, peers = {}, [], [], []
        srcs = [s for s in range(n) if s != me and rc[s]]
        dsts = [d for d in range(n) if d != me and sc[d]]
        decisions = self.decide(phase, call, srcs + [me] * len(dsts), [me] * len(srcs) + dsts,
                                [rc[s] for s in srcs] + [sc[d] for d in dsts], item)

        # Receives first, on surviving links only.
        for src, lost in zip(srcs, decisions):
            cnt = rc[src]
            view = recv[rdisp[src]:rdisp[src] + cnt]
            if lost is not None and lost.all():
                if self.packet_bytes:
                    masks[src] = np.zeros(cnt, dtype=bool)
                continue
            arrived[src] = True
            packets = packetize(cnt, item, self.packet_bytes)[0]
            if lost is not None and lost.any():
                keep = element_mask(lost, packetize(cnt, item, self.packet_bytes)[1], cnt)
                masks[src] = keep
                tmp = np.empty(int(keep.sum()), dtype=recv.dtype)
                unpack.append((view, keep, tmp))
                view = tmp
                packets -= int(lost.sum())
            elif self.packet_bytes:
                masks[src] = np.ones(cnt, dtype=bool)
            self.stats.record_receive(packets, view.nbytes)
            requests.append(self.comm.Irecv(view.view(np.uint8), source=src, tag=self._tag))
            peers.append(src)

        # Then sends; lost packets are never put on the wire.
        for dst, lost in zip(dsts, decisions[len(srcs):]):
            cnt = sc[dst]
            view = send[sdisp[dst]:sdisp[dst] + cnt]
            packets = packetize(cnt, item, self.packet_bytes)[0]
            if lost is not None and lost.all():
                self.stats.record_send(me, dst, packets, packets, view.nbytes, view.nbytes)
                continue
            nlost = 0
            if lost is not None and lost.any():
                view = view[element_mask(lost, packetize(cnt, item, self.packet_bytes)[1], cnt)]
                nlost = int(lost.sum())
            self.stats.record_send(me, dst, packets, nlost, cnt * item, cnt * item - view.nbytes)
            requests.append(self.comm.Isend(view.view(np.uint8), dest=dst, tag=self._tag))
            peers.append(None)

        # Own block: always delivered, copied locally.
        own = sc[me]
        if own != rc[me]:
            raise ConfigError("recv_counts", int(recv_counts[me]), f"send_counts[{me}] = {own} (own block)")
        recv[rdisp[me]:rdisp[me] + own] = send[sdisp[me]:sdisp[me] + own]
        arrived[me] = True
        if self.packet_bytes:
            masks[me] = np.ones(own, dtype=bool)

        self._wait(requests, peers, phase, call)
        for view, keep, tmp in unpack:
            view[keep] = tmp
        self.stats.counters["exchanges"] += 1
        return Received(recv, rc, rdisp, arrived, masks)

    def _wait(self, requests, peers, phase, call, status: Optional[MPI.Status] = None) -> None:
        """Wait for ``requests`` like ``Waitall``, but give up at the deadline.

        Polls ``Testall`` (which also drives MPI's progress), yielding the core between polls so
        that oversubscribed ranks still run; after 50 ms of waiting (a straggler, not a transfer)
        it sleeps between polls instead of spinning.
        """
        if not requests:
            return
        start = time.monotonic()
        deadline = start + self.timeout
        polls = 0
        test = (lambda: requests[0].Test(status)) if status is not None else (lambda: MPI.Request.Testall(requests))
        while not test():
            polls += 1
            if polls & 255:
                os.sched_yield()
                continue
            now = time.monotonic()
            if now > deadline:
                missing = sorted({p for r, p in zip(requests, peers) if p is not None and not r.Test()})
                what = (f"no message from rank(s) {missing}" if missing else
                        "no message from any rank" if status is not None else "sends not taken by the receiving rank(s)")
                raise TransportTimeout(
                    f"step {self.step}, phase {phase!r} (call {call}): rank {self.rank} timed out "
                    f"after {self.timeout:g}s: {what}. A peer may have died, or the ranks called "
                    f"different collectives.")
            if now - start > 0.05:
                time.sleep(2e-4)

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
        filled when ``delivered``.
        """
        head = np.empty(self.HEADER, dtype=np.int64)
        status = MPI.Status()
        req = self.comm.Irecv(head, source=source, tag=tag)
        self._wait([req], [None if source == MPI.ANY_SOURCE else source], phase, 0, status)
        src = status.Get_source()
        size = int(head[-1])
        if size > 0:
            if payload is None or payload.size != size:
                raise ConfigError("payload", None if payload is None else payload.size, f"a buffer of {size} elements")
            req = self.comm.Irecv(payload.view(np.uint8), source=src, tag=tag)
            self._wait([req], [src], phase, 0)
            self.stats.record_receive(1, payload.nbytes)
        return src, head, size > 0

    # ---- stragglers ------------------------------------------------------------------------
    def straggle(self, step: Optional[int] = None, seconds: Optional[float] = None,
                 cancellable: bool = False, cancel_tag: int = CANCEL_TAG) -> bool:
        """Wait this rank's straggler delay (from the delay model unless ``seconds`` is given).

        With ``cancellable``, a message with tag ``cancel_tag`` (default :data:`CANCEL_TAG`) from
        any rank ends the wait early (it is left for the caller to receive). Returns ``True`` if
        the full delay elapsed.
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
            time.sleep(min(end - now, 1e-3 if cancellable else end - now))
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
            self.comm.Free()
