"""One rank's part of a parameter-server run (Paper B): rank 0 serves, ranks 1..P learn.

Learners compute real mini-batch gradients of the app's model on their shard; the transport's
delay model adds a straggler delay per mini-batch. Rank 0 writes ``updates.csv`` (one row per
update: wall-clock time, K, learners, staleness, learning rates), ``evals.csv`` (loss and
accuracy vs wall-clock time) and ``summary.json`` (mean time per update next to Paper B's
formula for the configured delay, staleness histogram). A run stopped early by Slurm's warning
(SIGUSR1/SIGTERM, with checkpoints on) writes them for the updates it made.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import hvd_unreliable as hu

from ..algorithms.parameter_server import run_learner, run_server
from ..config import TrainConfig, validate
from ..theory import expected_time
from . import checkpoint
from .data import shard_indices
from .loop import load_data, make_transport
from .models import build_model

log = logging.getLogger(__name__)


def train_ps(cfg: TrainConfig, out_dir: Path) -> dict:
    validate(cfg, MPI.COMM_WORLD.Get_size())
    # Parameter-server runs keep no checkpoints: with checkpoints on (the Slurm job scripts turn
    # them on), SIGUSR1/SIGTERM -- Slurm's warning before a time limit -- makes the server stop
    # after the current update and write the results it has. Installed on every rank before
    # the first collective, so no rank dies of the signal.
    preempted = checkpoint.PreemptionFlag() if cfg.checkpoint.every_steps else None
    data = load_data(cfg)
    ctx = hu.init(backend="mpi4py")  # no Horovod collective here: no background thread per rank
    comm, rank, n = ctx.comm, ctx.comm.Get_rank(), ctx.comm.Get_size()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, cfg.model.hidden)
    w = parameters_to_vector(model.parameters()).detach().clone()
    a = cfg.algorithm
    transport = make_transport(cfg, comm)
    if rank != 0:
        shard = shard_indices(data.y_train.numpy(), n - 1, cfg.data.partition, cfg.data.skew_alpha, cfg.seed)[rank - 1]
        x, y = data.x_train[shard], data.y_train[shard]
        per_epoch = max(1, len(y) // cfg.optim.batch_size)

        def gradient(weights: torch.Tensor, draw: int) -> torch.Tensor:
            epoch, i = divmod(draw, per_epoch)
            perm = np.random.default_rng([cfg.seed, rank, epoch]).permutation(len(y))
            idx = torch.from_numpy(perm[i * cfg.optim.batch_size:(i + 1) * cfg.optim.batch_size])
            vector_to_parameters(weights, model.parameters())
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

        counts = run_learner(a, w, transport, gradient)
        comm.gather(counts, root=0)
        hu.shutdown()
        return {}

    @torch.no_grad()
    def evaluate(weights: torch.Tensor) -> dict:
        vector_to_parameters(weights, model.parameters())
        out = model(data.x_train)
        test = model(data.x_test)
        return {"loss": float(F.cross_entropy(out, data.y_train)),
                "test_acc": float((test.argmax(1) == data.y_test).float().mean())}

    if preempted is not None:
        log.info("parameter server serving %d learners; SIGUSR1/SIGTERM stop it after the current update", n - 1)
    res = run_server(a, cfg.optim.lr, w, transport, evaluate, lambda: preempted is not None and preempted.raised)
    if res.stopped_early:
        log.warning("stopped by SIGUSR1/SIGTERM after %d of %d updates; results written so far",
                    len(res.updates), a.updates)
    learner_counts = comm.gather({}, root=0)[1:]
    hu.shutdown()
    return _write(cfg, out_dir, res, learner_counts, n - 1, 1.0 - transport.loss.mean_loss)


def _write(cfg: TrainConfig, out_dir: Path, res, learner_counts, P: int, arrival_rate: float) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "updates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["version", "time", "k", "learners", "staleness", "lrs"])
        for u in res.updates:
            w.writerow([u.version, u.time, u.k, " ".join(map(str, u.learners)), " ".join(map(str, u.staleness)),
                        " ".join(f"{x:.4g}" for x in u.lrs)])
    with open(out_dir / "evals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["update", "time", "loss", "test_acc"])
        w.writeheader()
        w.writerows(res.evals)
    times = np.diff([0.0] + [u.time for u in res.updates])
    d = cfg.network.delay
    theory = None
    if d.kind in ("exponential", "shifted_exponential"):
        theory = expected_time(cfg.algorithm.name, P, cfg.algorithm.k, d.mean,
                               d.shift if d.kind == "shifted_exponential" else 0.0)
    staleness = Counter(s for u in res.updates for s in u.staleness)
    summary = {
        "config": {"algorithm": cfg.algorithm.name, "k": cfg.algorithm.k, "learners": P, "lr_rule": cfg.algorithm.lr_rule,
                   "network": cfg.network.name, "delay": d.kind, "delay_mean": d.mean, "delay_shift": d.shift,
                   "arrival_rate": arrival_rate, "model": cfg.model.name, "data": cfg.data.name,
                   "ranks": P + 1},
        "ps": {"updates": len(res.updates), "mean_update_s": float(times[1:].mean()) if len(times) > 1 else None,
               "theory_update_s": theory, "staleness_histogram": {str(k): v for k, v in sorted(staleness.items())},
               "lost_pushes": res.lost_pushes, "discarded": res.discarded, "learners": learner_counts,
               "stopped_early": res.stopped_early,
               "final_loss": res.evals[-1]["loss"], "final_test_acc": res.evals[-1]["test_acc"],
               "wall_s": res.updates[-1].time if res.updates else 0.0},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    p = summary["ps"]
    theory_txt = f" (theory {theory:.4f}s)" if theory else ""
    print(f"\n== {cfg.algorithm.name} K={cfg.algorithm.k} with {P} learners, delay {d.kind} mean {d.mean}s: "
          f"{p['updates']} updates in {p['wall_s']:.1f}s, {p['mean_update_s']:.4f}s per update{theory_txt}; "
          f"final loss {p['final_loss']:.4f}, test acc {p['final_test_acc']:.4f}; "
          f"staleness {dict(staleness)}", flush=True)
    return summary
