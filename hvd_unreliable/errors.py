"""Errors the plugin raises on bad input, each naming the key, the value and what is accepted."""
from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value, spec string or argument that cannot be used."""

    def __init__(self, key: str, value: Any, accepted: str):
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"{key}={value!r} is invalid: expected {accepted}")


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work (e.g. srun without PMIx)."""


class TransportTimeout(RuntimeError):
    """A collective did not complete in time (a peer died, or ranks called different collectives)."""


class ExchangeMismatch(RuntimeError):
    """A peer sent another number of bytes, or blocks of another dtype, than this rank's layout
    expects (tensors that differ in size or dtype across ranks)."""


def check_probability(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, value, "a probability in [0, 1]")
    return float(value)


def check_nonnegative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(key, value, "a finite number >= 0")
    return float(value)


def check_positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, value, "a finite number > 0")
    return float(value)


def check_packet_bytes(key: str, value: Any):
    """Packet size in bytes: ``None``/0 for whole messages (returned as ``None``), else > 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(key, value, "null/0 (whole messages) or a positive integer")
    return value or None


def check_choice(key: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_num_servers(value: Any, world_size: int, key: str = "num_servers", none: str = "None") -> int:
    """RPS's number of servers (``None``: every rank serves a block), validated against the world size."""
    if value is None:
        return world_size
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= world_size:
        raise ConfigError(key, value, f"an integer in [1, {world_size}] (the number of ranks), or {none}")
    return value
