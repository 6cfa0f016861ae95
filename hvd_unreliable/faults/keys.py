"""Counter-based randomness: every fault decision is a pure function of its coordinates.

Loss decisions: the uniform draw for packet ``k`` of link ``src -> dst`` in exchange ``call`` of
phase ``phase`` at step ``step`` is a hash of ``(seed, phase, step, call, src, dst, k)`` --
SplitMix64's finaliser chained over the coordinates, vectorised with NumPy over every packet of
every link of an exchange at once (whole messages: over many steps at once). Sender and receiver
hash the same coordinates, so they agree on every loss without exchanging a byte, and a run
replays from its seed alone.

Delays: :func:`stream` gives a NumPy Philox generator keyed by the coordinates, for sampling
distributions (one draw per learner and step).
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11, _S32 = (np.uint64(s) for s in (30, 27, 31, 11, 32))


def phase_code(phase: str) -> int:
    """A stable 32-bit code for a phase name (``"reduce_scatter"``, ``"pull"``, ...)."""
    return zlib.crc32(phase.encode("utf-8"))


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _mix_int(z: int) -> int:
    """:func:`_mix` on one Python int (cheaper than NumPy for a scalar)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@lru_cache(maxsize=1024)
def _phase_key(seed: int, phase: str) -> int:
    return (_mix_int((seed & _MASK64) ^ phase_code(phase)) + 0x9E3779B97F4A7C15) & _MASK64


def _exchange_key(seed: int, step: int, phase: str, call: int) -> int:
    base = (_mix_int(_phase_key(seed, phase) ^ (step & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
    return (_mix_int(base ^ (call & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64


@lru_cache(maxsize=65536)
def _link_code(src: int, dst: int) -> int:
    return _mix_int((((src << 32) | dst) + 0x9E3779B97F4A7C15) & _MASK64)


def link_keys(seed: int, step: int, phase: str, call: int, src: Sequence[int], dst: Sequence[int]) -> np.ndarray:
    """One 64-bit key per link ``src[i] -> dst[i]`` of one exchange."""
    base = _exchange_key(seed, step, phase, call)
    link = (np.asarray(src, dtype=np.uint64) << _S32) | np.asarray(dst, dtype=np.uint64)
    return _mix(np.uint64(base) ^ _mix(link + _GAMMA))


def message_uniforms_ahead(seed: int, first_step: int, steps: int, phase: str, call: int, src: Sequence[int],
                           dst: Sequence[int], stream: int = 0) -> np.ndarray:
    """One draw per link ``src[i] -> dst[i]`` (whole messages) for steps ``first_step ..
    first_step + steps - 1`` at once: a ``(steps, links)`` array whose row ``k`` holds
    ``uniforms(link_keys(seed, first_step + k, phase, call, src, dst), [1] * links, stream)``,
    the same values vectorised over the steps (training asks for them one step after another;
    one exchange's handful of links is too few to vectorise over)."""
    phase_key, call, links, salt = message_hash_inputs(seed, phase, call, src, dst, stream)
    step = np.arange(first_step, first_step + steps, dtype=np.uint64)
    base = _mix(np.uint64(phase_key) ^ step) + _GAMMA
    base = _mix(base ^ np.uint64(call)) + _GAMMA
    z = _mix(_mix(base[:, None] ^ np.frombuffer(links, dtype=np.uint64)[None, :]) + np.uint64(salt))
    return (z >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def message_hash_inputs(seed: int, phase: str, call: int, src: Sequence[int], dst: Sequence[int],
                        stream: int = 0) -> tuple:
    """What the whole-message draws of one phase, call and set of links hash besides the step:
    ``(phase key, call, link codes as native uint64 bytes, salt)``, as
    :func:`message_uniforms_ahead` and the C decider (``_decide.c``) use them."""
    links = np.array([_link_code(s, d) for s, d in zip(src, dst)], dtype=np.uint64).tobytes()
    return _phase_key(seed, phase), call & _MASK64, links, ((stream + 1) * 0x9E3779B97F4A7C15) & _MASK64


def uniforms(keys: np.ndarray, counts: Sequence[int], stream: int = 0) -> np.ndarray:
    """Uniform [0, 1) draws for packets ``0..counts[i]-1`` of every link, concatenated.

    ``stream`` selects an independent sequence (e.g. 0 for loss, 1 for a Markov transition).
    Draw ``k`` of a link depends only on its key, ``k`` and ``stream``.
    """
    salt = np.uint64(((stream + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    if all(c == 1 for c in counts):  # one packet per link: whole messages
        return (_mix(keys + salt) >> _S11).astype(np.float64) * (1.0 / (1 << 53))
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    k = (np.arange(int(offsets[-1] + counts[-1]), dtype=np.int64) - np.repeat(offsets, counts)).astype(np.uint64)
    z = _mix(np.repeat(keys, counts) + k * np.uint64(2) * _GAMMA + salt)
    return (z >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def stream(seed: int, step: int, phase: str, src: int, dst: int, call: int = 0) -> np.random.Generator:
    """A Philox generator keyed by the coordinates (for sampling delay distributions)."""
    key = np.array([seed & _MASK64, phase_code(phase)], dtype=np.uint64)
    counter = np.array([0, step & _MASK64, ((src << 32) | dst) & _MASK64, call & _MASK64], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))
