"""One rank's training run: data shard, model, lossy DistributedOptimizer, metrics, checkpoints.

Per step: (straggler delay) -> local forward/backward -> ``DistributedOptimizer.step()`` (the
algorithm's communication). Per evaluation (each epoch by default), all collective:
the averaged model's training loss and test accuracy (averaged over a reliable channel: a
measurement, not part of the algorithm), the mean of the local models' mini-batch losses, the
consensus distance, transport counters, compute and communication time.
Rank 0 writes ``metrics.csv`` and ``summary.json``; every rank checkpoints its own replica.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import hvd_unreliable as hu

from ..config import DATASETS, TrainConfig, build_loss, validate
from ..faults.delay import DelayModel
from ..transport import Transport
from . import checkpoint
from .data import load_cifar10, load_digits, make_synthetic, shard_indices
from .models import build_model

log = logging.getLogger(__name__)

# Columns that are pure functions of (config, seed): identical between runs and after a resume.
DETERMINISTIC = ["epoch", "step", "train_loss", "local_loss", "test_loss", "test_acc", "consensus",
                 "messages_sent", "messages_lost", "messages_delivered", "bytes_delivered", "loss_rate"]
COLUMNS = DETERMINISTIC + ["compute_s", "comm_s", "straggle_s", "wall_s"]


def load_data(cfg: TrainConfig):
    d = cfg.data
    if d.name == "digits":
        return load_digits(d.test_fraction, cfg.seed)
    if d.name == "cifar10":
        return load_cifar10(d.root)
    if d.name == "synthetic":
        return make_synthetic(d.num_samples, list(d.shape), d.num_classes, cfg.seed, d.test_fraction, d.noise)
    raise hu.ConfigError("data.name", d.name, "one of " + ", ".join(map(repr, DATASETS)))


def make_transport(cfg: TrainConfig, comm) -> Transport:
    """The lossy transport that ``cfg.network`` describes, on ``comm``."""
    net = cfg.network
    return Transport(comm, build_loss(cfg, comm.Get_size()), DelayModel(net.delay, cfg.seed), seed=cfg.seed,
                     packet_bytes=net.packet_bytes, timeout=net.timeout)


def _mean(comm, value: float) -> float:
    return comm.allreduce(float(value), op=MPI.SUM) / comm.Get_size()


def averaged_state(model: torch.nn.Module, comm) -> Dict[str, torch.Tensor]:
    """The average of all replicas' float state (parameters and BatchNorm statistics)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            buf = v.to(torch.float64).numpy().copy()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            state[k] = torch.from_numpy(buf / comm.Get_size()).to(v.dtype)
    return state


@torch.no_grad()
def _loss_acc(model, x, y, device, batch=1024):
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch].to(device))
        yy = y[i:i + batch].to(device)
        total_loss += float(F.cross_entropy(out, yy, reduction="sum"))
        correct += int((out.argmax(1) == yy).sum())
    return total_loss, correct


def train(cfg: TrainConfig, out_dir: Path, progress: Callable[[str], None] = lambda what: None) -> dict:
    """Train this rank; ``progress(what)`` is called at every step, evaluation and checkpoint
    (a :class:`~hvd_unreliable.integration.watchdog.Watchdog`'s, in the app)."""
    world = MPI.COMM_WORLD
    validate(cfg, world.Get_size())  # every rank, before any communication
    if cfg.cluster.device == "cuda" and not torch.cuda.is_available():  # here, not on the node that renders jobs
        raise hu.ConfigError("cluster.device", cfg.cluster.device, "'cpu' (torch sees no CUDA device on this node)")
    data = load_data(cfg)
    ctx = hu.init()
    comm, rank, n = ctx.comm, ctx.comm.Get_rank(), ctx.comm.Get_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hu.local_size()))
    device = torch.device("cpu")
    if cfg.cluster.device == "cuda":
        device = hu.cuda_device()
        torch.cuda.set_device(device)

    shards = shard_indices(data.y_train.numpy(), n, cfg.data.partition, cfg.data.skew_alpha, cfg.seed)
    x, y = data.x_train[shards[rank]], data.y_train[shards[rank]]
    test_slice = slice(rank * len(data.y_test) // n, (rank + 1) * len(data.y_test) // n)
    x_test, y_test = data.x_test[test_slice], data.y_test[test_slice]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, cfg.model.hidden).to(device)
    o = cfg.optim
    base = (torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
            if o.name == "sgd" else torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay))
    hu.broadcast_parameters(model.state_dict(), root_rank=0)
    hu.broadcast_optimizer_state(base, root_rank=0)
    net = cfg.network
    transport = make_transport(cfg, comm)
    opt = hu.DistributedOptimizer(base, named_parameters=model.named_parameters(), mode=cfg.algorithm.name,
                                  transport=transport, num_servers=cfg.algorithm.num_servers)
    eval_model = copy.deepcopy(model)

    steps_per_epoch = len(y) // o.batch_size
    if steps_per_epoch == 0:
        raise hu.ConfigError("optim.batch_size", o.batch_size, f"at most the shard size ({len(y)} samples per rank)")
    total_steps = o.epochs * steps_per_epoch
    eval_every = cfg.eval_every_steps or steps_per_epoch
    ckpt_dir = out_dir / checkpoint.DIRNAME

    history: List[dict] = []
    acc = {"loss": 0.0, "batches": 0, "compute_s": 0.0, "comm_s": 0.0, "straggle_s": 0.0}
    start, wall_offset = 0, 0.0
    checkpoint.check_resumable(cfg, out_dir)  # (the launcher has checked too, when there is one)
    if cfg.checkpoint.resume and (state := checkpoint.load(ckpt_dir, rank)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        transport.load_state_dict(state["transport"])
        torch.set_rng_state(state["torch_rng"])
        history, acc, start, wall_offset = state["history"], state["acc"], state["step"], state["wall_s"]
        log.info("rank %d resumed from step %d", rank, start)

    # With checkpoints on, SIGUSR1/SIGTERM (Slurm's warning) means: checkpoint the next step, stop.
    preempted = checkpoint.PreemptionFlag() if cfg.checkpoint.every_steps else None
    if rank == 0:
        (out_dir / "PREEMPTED").unlink(missing_ok=True)
    writer = _metrics_writer(out_dir, history) if rank == 0 else None
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"{cfg.algorithm.name} {net.name}", unit="step")
    t_start = time.perf_counter() - wall_offset
    perm = None
    for step in range(start, total_steps):
        progress(f"step {step}")
        epoch, i = divmod(step, steps_per_epoch)
        if perm is None or i == 0:
            perm = torch.from_numpy(np.random.default_rng([cfg.seed, rank, epoch]).permutation(len(y)))
        idx = perm[i * o.batch_size:(i + 1) * o.batch_size]
        t0 = time.perf_counter()
        if transport.delay is not None and net.delay.kind != "none":
            transport.straggle(step)
        t1 = time.perf_counter()
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        acc["loss"] += loss.item()
        acc["batches"] += 1
        acc["straggle_s"] += t1 - t0
        acc["compute_s"] += t2 - t1
        acc["comm_s"] += t3 - t2
        if bar is not None:
            bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            progress(f"the evaluation after step {step + 1}")
            row = _evaluate(model, eval_model, opt, transport, comm, device, x, y, x_test, y_test, acc)
            row.update(epoch=(step + 1) / steps_per_epoch, step=step + 1, wall_s=time.perf_counter() - t_start)
            history.append(row)
            acc = dict.fromkeys(acc, 0.0)
            if writer is not None:
                writer(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['test_acc']:.3f}")
        periodic = cfg.checkpoint.every_steps and (step + 1) % cfg.checkpoint.every_steps == 0
        stopping = preempted is not None and preempted.agreed(comm)
        if (periodic or stopping) and step + 1 < total_steps:
            progress(f"the checkpoint after step {step + 1}")
            checkpoint.save(ckpt_dir, rank, step + 1, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "transport": transport.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": history, "acc": acc,
                "wall_s": time.perf_counter() - t_start}, comm, checkpoint.run_identity(cfg))
        if stopping:
            if rank == 0:
                (out_dir / "PREEMPTED").write_text(str(step + 1))
                log.warning("preempted: checkpointed step %d; a requeued job resumes from it", step + 1)
            hu.shutdown()
            return {"final": {}, "preempted_at": step + 1}
    if bar is not None:
        bar.close()
    progress("the final statistics")
    # the loss model's long-run arrival rate over all links: network.arrival_rate for a uniform
    # Bernoulli network, what a bursty or per-link one amounts to otherwise
    arrival = 1.0 - transport.loss.mean_loss
    summary = {"config": {"algorithm": cfg.algorithm.name, "network": net.name, "arrival_rate": arrival,
                          "ranks": n, "servers": cfg.algorithm.num_servers or n, "model": cfg.model.name,
                          "data": cfg.data.name, "seed": cfg.seed},
               "final": history[-1] if history else {}, "transport": transport.total_stats().as_dict(),
               "backend": ctx.backend, "run": checkpoint.run_identity(cfg)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
    hu.shutdown()
    return summary


def _evaluate(model, eval_model, opt, transport, comm, device, x, y, x_test, y_test, acc) -> dict:
    eval_model.load_state_dict(averaged_state(model, comm))
    train_loss, _ = _loss_acc(eval_model, x, y, device)
    test_loss, correct = _loss_acc(eval_model, x_test, y_test, device)
    sums = comm.allreduce(np.array([train_loss, len(y), test_loss, correct, len(y_test)]), op=MPI.SUM)
    stats = transport.total_stats().as_dict()
    return {
        "train_loss": sums[0] / sums[1], "test_loss": sums[2] / max(sums[4], 1), "test_acc": sums[3] / max(sums[4], 1),
        "local_loss": _mean(comm, acc["loss"] / max(acc["batches"], 1)),
        "consensus": opt.consensus_distance(),
        **{k: stats[k] for k in ("messages_sent", "messages_lost", "messages_delivered", "bytes_delivered", "loss_rate")},
        "compute_s": _mean(comm, acc["compute_s"]), "comm_s": _mean(comm, acc["comm_s"]),
        "straggle_s": _mean(comm, acc["straggle_s"]),
    }


def _metrics_writer(out_dir: Path, history: List[dict]):
    """Rank 0's CSV (rewritten from the history on resume) and, when installed, TensorBoard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({k: r[k] for k in COLUMNS} for r in history)
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out_dir / "tensorboard"))
    except ImportError:
        tb = None

    def write(row: dict) -> None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row[k] for k in COLUMNS})
        if tb is not None:
            for k in COLUMNS[2:]:
                tb.add_scalar(k, row[k], row["step"])
            tb.flush()

    return write


def _print_summary(summary: dict) -> None:
    f, c, t = summary["final"], summary["config"], summary["transport"]
    print(f"\n== {c['algorithm']} over {c['network']} (arrival rate {c['arrival_rate']:.4g}) on {c['ranks']} ranks, "
          f"{c['model']} / {c['data']}, backend {summary['backend']}")
    if f:
        print(f"   epoch {f['epoch']:.0f}: train loss {f['train_loss']:.4f}  local loss {f['local_loss']:.4f}  "
              f"test acc {f['test_acc']:.4f}  consensus {f['consensus']:.3e}")
        print(f"   time: compute {f['compute_s']:.2f}s  communication {f['comm_s']:.2f}s  (last epoch, per rank)")
    print(f"   transport: {t['messages_sent']} messages sent, {t['messages_lost']} lost "
          f"({100 * t['loss_rate']:.2f}% of packets), {t['bytes_delivered'] / 2**20:.1f} MiB delivered", flush=True)
