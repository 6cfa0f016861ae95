"""Counter-based random streams: every fault decision is a pure function of its coordinates.

A decision about message or packet ``k`` of link ``src -> dst`` in exchange ``call`` of phase
``phase`` at training step ``step`` is drawn from a Philox stream whose key is ``(seed, phase)``
and whose counter starts at ``(0, step, src << 32 | dst, call)``. Sender and receiver build the
same stream from the same coordinates, so they agree on every loss without exchanging a byte,
and a run can be replayed from its seed alone.
"""
from __future__ import annotations

import zlib

import numpy as np

_MASK64 = (1 << 64) - 1


def phase_code(phase: str) -> int:
    """A stable 32-bit code for a phase name (``"reduce_scatter"``, ``"pull"``, ...)."""
    return zlib.crc32(phase.encode("utf-8"))


def stream(seed: int, step: int, phase: str, src: int, dst: int, call: int = 0) -> np.random.Generator:
    """The generator for one link in one exchange; draw ``k`` of it is the decision for packet ``k``."""
    key = np.array([seed & _MASK64, phase_code(phase)], dtype=np.uint64)
    counter = np.array([0, step & _MASK64, ((src << 32) | dst) & _MASK64, call & _MASK64], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))
