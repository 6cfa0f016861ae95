"""Parameter-server SGD with K-sync, K-batch-sync, K-async and K-batch-async (Paper B).

Dutta, Joshi, Ghosh, Dube, Nagpurkar. "Slow and Stale Gradients Can Win the Race: Error-Runtime
Trade-offs in Distributed SGD", AISTATS 2018 (arXiv 1803.01113); AdaSync from Dutta, Wang, Joshi,
IEEE JSAIT 2021 (arXiv 2003.10579).

Rank 0 is the parameter server (PS), ranks 1..P are learners. A learner computes a real
mini-batch gradient g(w_tau) at the model w_tau it last received, then waits its straggler delay
(the transport's delay model; the wait is interruptible), then pushes the gradient tagged with
tau. The PS applies

    w_{j+1} = w_j - (1/K) * sum_{l=1..K} eta_l * g(w_{tau(l,j)})          staleness_l = j - tau(l,j)

when its rule is met:

* ``k_sync``        the first K gradients from K distinct learners, all computed at w_j; the
                    other learners' work is cancelled and everyone restarts from w_{j+1}.
                    K = P is fully synchronous SGD.
* ``k_batch_sync``  the first K mini-batch gradients from any learners, all at w_j (a fast
                    learner pushes and keeps computing at w_j, so it may contribute several);
                    unfinished work is cancelled at the update.
* ``k_async``       K gradients from K distinct learners, stale ones included; nothing is
                    cancelled. A learner that pushed waits for the update; the others keep
                    computing and deliver their (stale) gradients later. K = 1 is Async SGD.
* ``k_batch_async`` any K gradients; a learner that pushed fetches the current model at once and
                    starts again; stale gradients are used.

A new model arriving while a learner computes is its cancellation (only sync variants send a
model to a computing learner). Learning rates: ``fixed`` (eta), ``staleness`` --
eta_l = min(C / ||w_j - w_tau||^2, eta_max), the PS keeping the models some learner still works
on (at most P + 1) -- or ``inverse`` (eta / (1 + staleness)). AdaSync (``adasync_interval`` > 0)
re-evaluates K = min(P, round(K0 * sqrt(F(w_0) / F(w_t)))) every interval of wall-clock seconds.

Message loss: every message has a reliable header (its kind and model version) and a lossy
payload. A lost push is not counted (the PS sends the learner the current model to restart);
a lost pull leaves the learner on its old model, which it keeps using (its gradients then carry
the old version and count as stale).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch
from mpi4py import MPI

from ..transport import Transport

if TYPE_CHECKING:  # the schema lives with the app's configs
    from ..config import AlgorithmConfig

VARIANTS = ("k_sync", "k_batch_sync", "k_async", "k_batch_async")
LR_RULES = ("fixed", "staleness", "inverse")
MODEL, GRAD, STOP = 1, 2, 3  # message kinds (header word 0)
TAG_TO_LEARNER, TAG_TO_SERVER = 101, 102
SYNC = ("k_sync", "k_batch_sync")
DISTINCT = ("k_sync", "k_async")


def staleness_lr(w_now: torch.Tensor, w_then: torch.Tensor, c: float, lr_max: float) -> float:
    """eta = min(C / ||w_now - w_then||^2, eta_max) (eta_max when the model has not moved)."""
    dist = float(torch.sum((w_now - w_then) ** 2))
    return lr_max if dist == 0.0 else min(c / dist, lr_max)


@dataclass
class UpdateRecord:
    """What the PS saw at one update: the basis of the semantics tests and the reports."""

    version: int
    time: float
    k: int
    learners: List[int]
    staleness: List[int]
    lrs: List[float]


@dataclass
class ServerResult:
    updates: List[UpdateRecord] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)
    weights: Optional[torch.Tensor] = None
    lost_pushes: int = 0
    discarded: int = 0
    stopped_early: bool = False  # ``should_stop`` said so before ``cfg.updates`` updates


def run_server(cfg: "AlgorithmConfig", lr: float, w: torch.Tensor, transport: Transport,
               evaluate: Callable[[torch.Tensor], Dict[str, float]],
               should_stop: Callable[[], bool] = lambda: False) -> ServerResult:
    """The PS loop on rank 0: apply ``cfg.updates`` updates (fewer where ``should_stop()`` turns
    true, e.g. at Slurm's warning before a time limit), then stop every learner."""
    P = transport.size - 1
    res = ServerResult()
    version, k = 0, cfg.k
    sent_version = {l: 0 for l in range(1, P + 1)}  # the model each learner works on
    history: Dict[int, torch.Tensor] = {0: w.clone()}
    grad = torch.empty_like(w)
    pending: List[tuple] = []  # (learner, grad, weights_version)
    waiting: List[int] = []  # learners that pushed and wait for the update (k_sync, k_async)
    t0 = time.perf_counter()
    res.evals.append({"update": 0, "time": 0.0, **evaluate(w)})
    f0 = res.evals[0]["loss"]
    last_adapt = t0
    in_flight: List[tuple] = []  # (request, buffer): models on their way, sent without blocking

    snapshots: Dict[int, np.ndarray] = {}  # one copy of each version, shared by all its sends

    def send_model(learner: int) -> None:
        # Non-blocking: a learner may be pushing to us at this very moment (no send/send deadlock).
        transport.set_step(version)
        if version not in snapshots:
            snapshots.clear()
            snapshots[version] = w.clone().numpy()
        snapshot = snapshots[version]
        went, req = transport.send_message([MODEL, version, version], snapshot, learner, TAG_TO_LEARNER,
                                           "pull", wait=False)
        if went:
            sent_version[learner] = version
            in_flight.append((req, snapshot))

    for learner in range(1, P + 1):
        send_model(learner)
    while version < cfg.updates:
        if should_stop():
            res.stopped_early = True
            if res.evals[-1]["update"] != version:  # the final loss is that of the last update
                res.evals.append({"update": version, "time": time.perf_counter() - t0, **evaluate(w)})
            break
        in_flight[:] = [(r, b) for r, b in in_flight if not r.Test()]
        src, head, delivered = transport.recv_message(MPI.ANY_SOURCE, TAG_TO_SERVER, grad.numpy(), "push")
        round_, tau = int(head[1]), int(head[2])
        if not delivered:  # the push was lost: not counted; the learner restarts from the current model
            res.lost_pushes += 1
            if cfg.name in SYNC and round_ < version:
                continue  # its cancellation (the new model) is already on its way
            send_model(src)
            continue
        if cfg.name in SYNC and round_ < version:
            res.discarded += 1  # cancelled work that crossed the update on the wire
            continue
        pending.append((src, grad.clone(), tau))
        if cfg.name == "k_batch_async":
            send_model(src)
        elif cfg.name in DISTINCT:
            waiting.append(src)
        contributors = len({l for l, _, _ in pending}) if cfg.name in DISTINCT else len(pending)
        if contributors < k:
            continue
        # The update: w_{j+1} = w_j - (1/K) sum_l eta_l g_l, summed in learner order, so that the
        # same gradients give the same bits whichever arrived first
        pending.sort(key=lambda item: item[0])
        lrs = []
        for _, g, tau_l in pending:
            if cfg.lr_rule == "staleness":
                eta = staleness_lr(w, history[tau_l], cfg.lr_c, cfg.lr_max)
            elif cfg.lr_rule == "inverse":
                eta = lr / (1 + version - tau_l)
            else:
                eta = lr
            lrs.append(eta)
            w -= (eta / len(pending)) * g
        res.updates.append(UpdateRecord(version, time.perf_counter() - t0, k, [l for l, _, _ in pending],
                                        [version - t for _, _, t in pending], lrs))
        version += 1
        pending = []
        if cfg.name in SYNC:  # cancel everyone: the new model restarts every learner
            for learner in range(1, P + 1):
                send_model(learner)
        elif cfg.name == "k_async":
            for learner in waiting:
                send_model(learner)
        waiting = []
        if cfg.lr_rule == "staleness":  # keep only the models some learner still works on
            history[version] = w.clone()
            for v in [v for v in history if v not in sent_version.values() and v != version]:
                del history[v]
        now = time.perf_counter()
        if version % cfg.eval_every == 0 or version == cfg.updates:
            res.evals.append({"update": version, "time": now - t0, **evaluate(w)})
        if cfg.adasync_interval > 0 and now - last_adapt >= cfg.adasync_interval:
            f = evaluate(w)["loss"]
            k = max(1, min(P, int(round(cfg.k * math.sqrt(f0 / max(f, 1e-12))))))
            last_adapt = now
    for learner in range(1, P + 1):
        transport.send_message([STOP, version, version], None, learner, TAG_TO_LEARNER, "pull")
    stopped = 0
    while stopped < P:  # drain pushes already under way until every learner has acknowledged
        _, head, _ = transport.recv_message(MPI.ANY_SOURCE, TAG_TO_SERVER, grad.numpy(), "push")
        stopped += int(head[0]) == STOP
    MPI.Request.Waitall([r for r, _ in in_flight])
    res.weights = w
    return res


def run_learner(cfg: "AlgorithmConfig", w: torch.Tensor, transport: Transport,
                gradient: Callable[[torch.Tensor, int], torch.Tensor]) -> Dict[str, int]:
    """A learner on ranks 1..P: compute, straggle (interruptibly), push, until the PS says stop.

    ``gradient(w, draw)`` returns the flat mini-batch gradient at ``w`` for this learner's
    ``draw``-th mini-batch. Returns counts, and ``busy_s``: the wall-clock time spent computing
    gradients and taking in the models that cancelled work (not waiting for an update), the part
    of a learner's runtime beyond the injected delay.
    """
    buf = torch.empty_like(w)
    round_ = tau = 0
    draws = pushed = cancelled = 0
    busy = 0.0

    def receive() -> bool:
        """Take the PS's next message, and any newer ones already queued (a learner that fell
        behind jumps to the newest model instead of computing on each stale one); False on STOP."""
        nonlocal round_, tau
        while True:
            _, head, delivered = transport.recv_message(0, TAG_TO_LEARNER, buf.numpy(), "pull")
            if int(head[0]) == STOP:
                return False
            round_ = int(head[1])
            if delivered:  # a lost pull leaves the learner on its old model
                w.copy_(buf)
                tau = round_
            if not transport.comm.Iprobe(source=0, tag=TAG_TO_LEARNER):
                return True

    def stop() -> Dict[str, int]:
        transport.send_message([STOP, round_, tau], None, 0, TAG_TO_SERVER, "push")
        return {"draws": draws, "pushed": pushed, "cancelled": cancelled, "busy_s": busy}

    if not receive():
        return stop()
    while True:
        start = time.perf_counter()
        g = gradient(w, draws)
        busy += time.perf_counter() - start
        finished = transport.straggle(step=draws, cancellable=True, cancel_tag=TAG_TO_LEARNER)
        draws += 1
        if not finished:  # a message from the PS while computing: new model (cancellation) or stop
            cancelled += 1
            start = time.perf_counter()
            if not receive():
                break
            busy += time.perf_counter() - start  # the message was there: taking it in is work
            continue
        transport.set_step(round_)
        transport.send_message([GRAD, round_, tau], g.numpy(), 0, TAG_TO_SERVER, "push")
        pushed += 1
        if cfg.name == "k_batch_sync" and not transport.comm.Iprobe(source=0, tag=TAG_TO_LEARNER):
            continue  # keep computing at w_j until the update cancels this work
        if not receive():
            break
    return stop()
