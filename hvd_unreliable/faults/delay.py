"""Straggler-delay models: how long does learner ``rank`` take at step ``step``?

Pure and seeded: ``sample(step, rank)`` is a function of ``(seed, step, rank)`` alone, so every
rank can compute any other rank's delay (the runtime theory and the parameter server use this)
and a run replays exactly. Delays are in seconds.

Distributions (Paper B models per-mini-batch runtimes X as i.i.d. random variables):
constant, exponential(mean), shifted exponential (shift + Exp(mean)), Pareto(scale, shape),
uniform jitter [low, high], log-normal(mean, sigma), and replay of a trace file.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError, check_choice, check_nonnegative, check_positive
from .keys import stream

_PHASE = "delay"


@dataclass
class DelayConfig:
    """Structured config for a delay model (the Hydra schema of ``network.delay``).

    ``kind``: none | constant | exponential | shifted_exponential | pareto | uniform | lognormal
    | trace. ``mean`` is the mean of the exponential part; ``shift`` the constant part;
    ``scale``/``shape`` for Pareto; ``low``/``high`` for uniform; ``mean``/``sigma`` for log-normal
    (``sigma`` of the underlying normal); ``trace`` a file of seconds, one row per step, one
    column per rank (a single column is shared by all ranks), replayed cyclically.
    """

    kind: str = "none"
    mean: float = 0.0
    shift: float = 0.0
    scale: float = 0.0
    shape: float = 2.0
    low: float = 0.0
    high: float = 0.0
    sigma: float = 0.5
    trace: Optional[str] = None


DELAY_KINDS = ("none", "constant", "exponential", "shifted_exponential", "pareto", "uniform",
               "lognormal", "trace")


class DelayModel:
    """Per-rank, per-step delays. ``mean`` is the theoretical mean (used by tests and theory)."""

    def __init__(self, cfg: DelayConfig, seed: int = 0, key: str = "network.delay"):
        check_choice(f"{key}.kind", cfg.kind, DELAY_KINDS)
        self.kind, self.seed, self.cfg = cfg.kind, seed, cfg
        for name in ("mean", "shift", "scale", "low", "high", "sigma"):
            check_nonnegative(f"{key}.{name}", getattr(cfg, name))
        if cfg.kind in ("exponential", "lognormal"):
            check_positive(f"{key}.mean", cfg.mean)
        if cfg.kind == "pareto":
            check_positive(f"{key}.scale", cfg.scale)
            if check_positive(f"{key}.shape", cfg.shape) <= 1:
                raise ConfigError(f"{key}.shape", cfg.shape, "a number > 1 (the mean is infinite otherwise)")
        if cfg.kind == "uniform" and cfg.high < cfg.low:
            raise ConfigError(f"{key}.high", cfg.high, f"a number >= low ({cfg.low})")
        self._trace = None
        if cfg.kind == "trace":
            self._trace = self._load_trace(cfg.trace, f"{key}.trace")

    @staticmethod
    def _load_trace(path, key) -> np.ndarray:
        if not path or not Path(path).is_file():
            raise ConfigError(key, path, "an existing text/CSV file of delays in seconds")
        try:
            data = np.loadtxt(path, delimiter=",", ndmin=2, dtype=float)
        except ValueError as e:
            raise ConfigError(key, path, f"numbers separated by commas, one row per step ({e})") from None
        if data.size == 0 or not np.all(np.isfinite(data)) or (data < 0).any():
            raise ConfigError(key, path, "a non-empty table of finite delays >= 0")
        return data

    @property
    def mean(self) -> float:
        c = self.cfg
        return {
            "none": 0.0, "constant": c.mean, "exponential": c.mean,
            "shifted_exponential": c.shift + c.mean,
            "pareto": c.shape * c.scale / (c.shape - 1) if self.kind == "pareto" else 0.0,
            "uniform": (c.low + c.high) / 2,
            "lognormal": c.mean,
            "trace": float(self._trace.mean()) if self._trace is not None else 0.0,
        }[self.kind]

    def sample(self, step: int, rank: int, count: int = 1) -> np.ndarray:
        """``count`` successive delays of ``rank`` at ``step`` (a learner may do several mini-batches)."""
        c, k = self.cfg, self.kind
        if k == "none":
            return np.zeros(count)
        if k == "constant":
            return np.full(count, c.mean)
        if k == "trace":
            t = self._trace
            col = rank % t.shape[1]
            return t[(step * count + np.arange(count)) % t.shape[0], col]
        rng = stream(self.seed, step, _PHASE, rank, rank)
        if k == "exponential":
            return rng.exponential(c.mean, count)
        if k == "shifted_exponential":
            return c.shift + (rng.exponential(c.mean, count) if c.mean > 0 else np.zeros(count))
        if k == "pareto":
            return c.scale * (1.0 + rng.pareto(c.shape, count))
        if k == "uniform":
            return rng.uniform(c.low, c.high, count)
        # log-normal parametrised by its mean: mu = log(mean) - sigma^2 / 2
        mu = math.log(c.mean) - c.sigma ** 2 / 2
        return rng.lognormal(mu, c.sigma, count)

    def __call__(self, step: int, rank: int) -> float:
        return float(self.sample(step, rank, 1)[0])


_DUR = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(us|ms|s)?")
_UNIT = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def _seconds(token: str, key: str) -> float:
    m = _DUR.fullmatch(token)
    if not m:
        raise ConfigError(key, token, "a duration such as 50ms, 0.05s or 0.05")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_delay_spec(spec: str, key: str = "network.delay.spec") -> DelayConfig:
    """Parse ``constant 10ms``, ``exponential 50ms``, ``shifted_exponential 10ms 40ms``,
    ``pareto 10ms 2.5``, ``uniform 0 20ms``, ``lognormal 50ms 0.5``, ``trace FILE`` or ``none``."""
    accepted = ("'none', 'constant D', 'exponential MEAN', 'shifted_exponential SHIFT MEAN', "
                "'pareto SCALE SHAPE', 'uniform LOW HIGH', 'lognormal MEAN SIGMA' or 'trace FILE'")
    words = spec.split() if isinstance(spec, str) else []
    if not words:
        raise ConfigError(key, spec, accepted)
    kind, args = words[0], words[1:]
    forms = {"none": [], "constant": ["mean"], "exponential": ["mean"],
             "shifted_exponential": ["shift", "mean"], "pareto": ["scale", "shape"],
             "uniform": ["low", "high"], "lognormal": ["mean", "sigma"], "trace": ["trace"]}
    if kind not in forms or len(args) != len(forms[kind]):
        raise ConfigError(key, spec, accepted)
    values = {}
    for name, tok in zip(forms[kind], args):
        if name == "trace":
            values[name] = tok
        elif name in ("shape", "sigma"):
            if not re.fullmatch(r"[0-9]*\.?[0-9]+", tok):
                raise ConfigError(f"{key} ({name})", tok, "a plain number such as 2.5")
            values[name] = float(tok)
        else:
            values[name] = _seconds(tok, f"{key} ({name})")
    return DelayConfig(kind=kind, **values)
