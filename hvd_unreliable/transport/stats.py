"""What the transport sent, lost, delivered and delayed: per rank, per link, and in total."""
from __future__ import annotations

from typing import Dict

import numpy as np

_COUNTERS = ("messages_sent", "messages_lost", "messages_delivered",
             "packets_sent", "packets_lost", "packets_delivered",
             "bytes_sent", "bytes_lost", "bytes_delivered", "exchanges")


PENDING_MAX = 1024  # records of repeated rounds kept apart before they are counted in


class RoundRecord(tuple):
    """:meth:`TransportStats.record_exchange`'s arguments for a round that repeats, hashed and
    compared by identity: the transport keeps one per kind of round and passes that object every
    time, so counting it does not hash its contents."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


class TransportStats:
    """Counters of one rank. "sent" counts what the sender offered to the network (lost
    included), "lost" what the fault model dropped, "delivered" what reached this rank.
    ``link_sent[s, d]``/``link_lost[s, d]`` count packets on links this rank sends on.

    Exchanges whose record repeats (a layout with the same links lost; most often none, the
    common round) are only counted per record by :meth:`record_round` (one dict update) and
    added to the counters when these are read.
    """

    def __init__(self, world_size: int):
        self.world_size = n = world_size
        self._counters: Dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._link_sent = np.zeros((n, n), dtype=np.int64)
        self._link_lost = np.zeros((n, n), dtype=np.int64)
        self._rounds: Dict[tuple, int] = {}  # record_exchange's arguments -> rounds not yet added
        self.delay_injected_s = 0.0

    @property
    def counters(self) -> Dict[str, int]:
        self._fold()
        return self._counters

    @counters.setter
    def counters(self, value: Dict[str, int]) -> None:
        self._fold()
        self._counters = value

    @property
    def link_sent(self) -> np.ndarray:
        self._fold()
        return self._link_sent

    @property
    def link_lost(self) -> np.ndarray:
        self._fold()
        return self._link_lost

    def record_round(self, exchange: tuple) -> None:
        """One exchange, given as the argument tuple ``(src, dsts, packets, lost_packets, nbytes,
        lost_bytes, got_messages, got_packets, got_bytes)`` of :meth:`record_exchange`
        (hashable: tuples, ``None`` for nothing lost), the same for every round of a layout that
        loses the same links. Counted in once more than ``PENDING_MAX`` records wait: on
        many ranks few rounds lose the same links, and the transport keeps only the latest of
        their records."""
        pending = self._rounds
        pending[exchange] = pending.get(exchange, 0) + 1
        if len(pending) > PENDING_MAX:
            self._fold()

    def _fold(self) -> None:
        pending, self._rounds = self._rounds, {}
        for exchange, rounds in pending.items():
            self.record_exchange(*exchange, rounds=rounds)

    def record_send(self, src: int, dst: int, packets: int, lost_packets: int, nbytes: int, lost_bytes: int):
        """One message offered on link ``src -> dst``."""
        self.record_exchange(src, [dst], [packets], [lost_packets], [nbytes], [lost_bytes], 0, 0, 0, exchanges=0)

    def record_receive(self, packets: int, nbytes: int):
        """One message (``packets`` > 0 of it) that reached this rank."""
        self.record_exchange(0, [], [], [], [], [], int(packets > 0), packets, nbytes, exchanges=0)

    def record_exchange(self, src: int, dsts, packets, lost_packets, nbytes, lost_bytes,
                        got_messages: int, got_packets: int, got_bytes: int, exchanges: int = 1,
                        rounds: int = 1):
        """One exchange (``rounds`` alike): per destination what was offered and lost (``None``:
        nothing lost); in total what arrived."""
        c = self._counters
        c["messages_sent"] += len(dsts) * rounds
        c["packets_sent"] += sum(packets) * rounds
        c["bytes_sent"] += sum(nbytes) * rounds
        c["messages_delivered"] += got_messages * rounds
        c["packets_delivered"] += got_packets * rounds
        c["bytes_delivered"] += got_bytes * rounds
        c["exchanges"] += exchanges * rounds
        sent = self._link_sent[src]
        for d, k in zip(dsts, packets):
            sent[d] += k * rounds
        if lost_packets is not None:
            c["messages_lost"] += sum(lost == k for lost, k in zip(lost_packets, packets)) * rounds
            c["packets_lost"] += sum(lost_packets) * rounds
            c["bytes_lost"] += sum(lost_bytes) * rounds
            lost = self._link_lost[src]
            for d, q in zip(dsts, lost_packets):
                lost[d] += q * rounds

    def as_dict(self) -> dict:
        d = dict(self.counters)
        d["delay_injected_s"] = self.delay_injected_s
        d["loss_rate"] = d["packets_lost"] / d["packets_sent"] if d["packets_sent"] else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(self.link_sent > 0, self.link_lost / np.maximum(self.link_sent, 1), np.nan)
        d["link_loss_rate"] = rate.tolist()
        d["link_packets_sent"] = self.link_sent.tolist()
        return d

    def pack(self) -> np.ndarray:
        """All numbers as one float64 vector (for a reduction across ranks)."""
        return np.concatenate([np.array([self.counters[k] for k in _COUNTERS], dtype=np.float64),
                               [self.delay_injected_s], self.link_sent.ravel(), self.link_lost.ravel()])

    @classmethod
    def unpack(cls, vec: np.ndarray, world_size: int) -> "TransportStats":
        s = cls(world_size)
        k = len(_COUNTERS)
        s.counters = {name: int(v) for name, v in zip(_COUNTERS, vec[:k])}
        s.delay_injected_s = float(vec[k])
        n2 = world_size * world_size
        s._link_sent = vec[k + 1:k + 1 + n2].astype(np.int64).reshape(world_size, world_size)
        s._link_lost = vec[k + 1 + n2:].astype(np.int64).reshape(world_size, world_size)
        return s

    def summary(self) -> str:
        d = self.as_dict()
        return (f"messages sent {d['messages_sent']} lost {d['messages_lost']} delivered "
                f"{d['messages_delivered']}; packets lost {d['packets_lost']}/{d['packets_sent']} "
                f"({100 * d['loss_rate']:.2f}%); bytes delivered {d['bytes_delivered']}; "
                f"injected delay {d['delay_injected_s']:.3f}s")
