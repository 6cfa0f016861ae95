"""Expected wall-clock time per parameter-server update for Paper B's variants.

Dutta, Joshi, Ghosh, Dube, Nagpurkar. "Slow and Stale Gradients Can Win the Race",
AISTATS 2018. P learners; a learner's mini-batch runtime X is i.i.d. (exponential with rate mu,
or shifted exponential Delta + Exp(mu)). H_n is the n-th harmonic number, X_{K:P} the K-th
smallest of P draws.

=============  ====================================  ======================  ===========================
variant        rule at the PS                        X ~ Exp(mu)             X ~ Delta + Exp(mu)
=============  ====================================  ======================  ===========================
k_sync         first K of P (all at w_j), cancel     (H_P - H_{P-K}) / mu    Delta + (H_P - H_{P-K}) / mu
k_batch_sync   first K mini-batches, any learners,   K / (P mu)              <= K (Delta + 1/(P mu))
               cancel at the update
k_async        K distinct learners, no cancelling    (H_P - H_{P-K}) / mu    (no closed form)
k_batch_async  any K gradients, no cancelling        K / (P mu)              K (Delta + 1/mu) / P
=============  ====================================  ======================  ===========================

Fully synchronous SGD is k_sync with K = P, Async SGD is k_async with K = 1; their ratio for
exponential runtimes is P * H_P. :func:`simulate` plays the same model forward with NumPy and is
the check on every formula, and the answer where no closed form exists.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import ConfigError, check_choice

VARIANTS = ("k_sync", "k_batch_sync", "k_async", "k_batch_async")
DISTRIBUTIONS = ("exponential", "shifted_exponential")


def harmonic(n: int) -> float:
    return float(sum(1.0 / i for i in range(1, n + 1)))


def _check(variant: str, P: int, K: int) -> None:
    check_choice("algorithm.name", variant, VARIANTS)
    if not isinstance(P, int) or P < 1:
        raise ConfigError("num_learners", P, "an integer >= 1")
    if not isinstance(K, int) or not 1 <= K <= P:
        raise ConfigError("algorithm.k", K, f"an integer in [1, {P}] (the number of learners)")


def expected_time(variant: str, P: int, K: int, mean: float, shift: float = 0.0,
                  exact_only: bool = True) -> Optional[float]:
    """E[T] per update for runtimes ``shift + Exp(mean)`` (``mean = 1/mu``).

    Returns ``None`` where no closed form exists; with ``exact_only=False`` the table's upper
    bound is returned instead for k_batch_sync with a shift.
    """
    _check(variant, P, K)
    if variant in ("k_sync", "k_async"):
        if variant == "k_async" and shift > 0:
            return None
        return shift + (harmonic(P) - harmonic(P - K)) * mean
    if variant == "k_batch_sync":
        if K == 1:  # 1-batch-sync is 1-sync: the minimum of P runtimes
            return shift + mean / P
        if shift > 0:
            return None if exact_only else K * (shift + mean / P)
        return K * mean / P
    return K * (shift + mean) / P  # k_batch_async: renewal theory, any distribution


def speedup_async_over_sync(P: int) -> float:
    """E[T_fully_sync] / E[T_async] for exponential runtimes: P * H_P."""
    return P * harmonic(P)


def _draw(rng, mean: float, shift: float, size):
    return shift + rng.exponential(mean, size) if mean > 0 else np.full(size, float(shift))


def simulate(variant: str, P: int, K: int, mean: float, shift: float = 0.0, updates: int = 20000,
             seed: int = 0) -> dict:
    """Monte-Carlo mean and standard error of the time per update (the same model as the table).

    k_sync / k_batch_sync restart every learner at each update (cancellation); k_async lets
    learners that have not pushed keep their residual work, and a learner that pushed waits for
    the update before restarting; k_batch_async superposes P renewal processes and updates at
    every K-th arrival.
    """
    _check(variant, P, K)
    rng = np.random.default_rng(seed)
    if variant == "k_sync":
        x = _draw(rng, mean, shift, (updates, P))
        times = np.partition(x, K - 1, axis=1)[:, K - 1]
    elif variant == "k_batch_sync":
        # learner i's j-th mini-batch ends at the j-th partial sum; the update waits for K of them
        batch = max(1, min(updates, 2_000_000 // (P * K)))
        parts = []
        for start in range(0, updates, batch):
            m = min(batch, updates - start)
            arrivals = np.cumsum(_draw(rng, mean, shift, (m, P, K)), axis=2).reshape(m, P * K)
            parts.append(np.partition(arrivals, K - 1, axis=1)[:, K - 1])
        times = np.concatenate(parts)
    elif variant == "k_async":
        residual = _draw(rng, mean, shift, P)
        times = np.empty(updates)
        for j in range(updates):
            order = np.argpartition(residual, K - 1)[:K]
            t = residual[order].max()
            residual -= t
            residual[order] = _draw(rng, mean, shift, K)
            times[j] = t
        times = times[min(100, updates // 10):]  # drop the start-up transient
    else:
        per_learner = int(math.ceil(updates * K / P * 1.2)) + 10
        arrivals = np.sort(np.cumsum(_draw(rng, mean, shift, (P, per_learner)), axis=1).ravel())
        horizon = arrivals[: (updates + 1) * K: K]  # every K-th arrival ends an update
        times = np.diff(horizon)
        times = times[min(100, len(times) // 10):]
    return {"mean": float(times.mean()), "stderr": float(times.std(ddof=1) / math.sqrt(len(times))),
            "updates": int(len(times))}
