"""Rank-side code of the context tests."""
import os

import torch
from mpi4py import MPI

import hvd_unreliable as hu


def describe(backend=None):
    ctx = hu.init(backend=backend)
    out = {"rank": hu.rank(), "size": hu.size(), "local_rank": hu.local_rank(), "local_size": hu.local_size(),
           "backend": hu.backend(), "cuda_aware": ctx.cuda_aware,
           "yield_when_idle": os.environ.get("OMPI_MCA_mpi_yield_when_idle")}  # (Open MPI's --mca reach ranks so)
    try:
        out["cuda_device"] = str(hu.cuda_device())
    except RuntimeError as e:
        out["cuda_device"] = str(e)
    if ctx.hvd is not None:  # Horovod and mpi4py share one world
        hvd = ctx.hvd
        out["hvd_rank"], out["hvd_size"] = hvd.rank(), hvd.size()
        out["hvd_sum"] = hvd.allreduce(torch.tensor([float(hu.rank() + 1)]), op=hvd.Sum).item()
    hu.barrier()
    hu.shutdown()
    return out


def init_error(backend="mpi4py"):
    """The error ``init`` raises on this rank (e.g. for a bad environment variable), or None."""
    try:
        hu.init(backend=backend)
    except hu.ConfigError as e:
        return {"error": str(e)}
    hu.shutdown()
    return {"error": None}


def watchdog_mismatched_collectives(timeout, backend="mpi4py"):
    """Rank 0 waits in a collective the others never join (a barrier, or Horovod's allreduce);
    the others wait in a barrier. Only the watchdog ends this."""
    import time

    from hvd_unreliable.integration.watchdog import Watchdog

    ctx = hu.init(backend=backend)
    with Watchdog(timeout) as dog:
        dog.progress("step 3 (test)")
        if hu.rank() == 0 and ctx.hvd is not None:
            ctx.hvd.allreduce(torch.ones(4), name="only_rank_0")
        elif hu.rank() == 0:
            ctx.comm.allreduce(1)
        else:
            ctx.comm.Barrier()
        time.sleep(3600)
    return {}


def watchdog_quiet_while_progressing(timeout, seconds):
    """Collectives for ``seconds`` (several times the timeout), with progress after each one."""
    import time

    from hvd_unreliable.integration.watchdog import Watchdog

    hu.init(backend="mpi4py")
    end, steps = time.monotonic() + seconds, 0
    with Watchdog(timeout) as dog:
        while hu.context().comm.allreduce(time.monotonic() < end, op=MPI.LAND):
            dog.progress(f"step {steps}")
            time.sleep(timeout / 5)
            steps += 1
    hu.shutdown()
    return {"steps": steps}


def horovod_script(steps=30):
    """A Horovod training script whose only change is the optimizer: ``hvd.init()``, Horovod's
    broadcasts and metric allreduce, and ``hu.DistributedOptimizer(..., mode="rps")``."""
    import horovod.torch as hvd

    from hvd_unreliable.transport import Transport

    try:
        hu.rank()
        before_init = None
    except RuntimeError as e:
        before_init = str(e)
    hvd.init()
    torch.manual_seed(hvd.rank())
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hu.DistributedOptimizer(opt, named_parameters=model.named_parameters(), mode="rps",
                                  transport=Transport(MPI.COMM_WORLD, "random 20%", seed=1))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(hvd.rank()))
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        opt.step()
    metric = hvd.allreduce(loss.detach(), name="loss").item()
    out = {"before_init": before_init, "backend": hu.backend(), "rank": hu.rank(), "hvd_rank": hvd.rank(),
           "metric": metric, "consensus": opt.consensus_distance(), "lost": opt._transport.stats.counters["messages_lost"]}
    hu.shutdown()
    return out


def horovod_on_part_of_the_world():
    """Horovod initialised on a sub-communicator: the plugin refuses to guess its world."""
    import horovod.torch as hvd

    hvd.init(comm=MPI.COMM_WORLD.Split(int(MPI.COMM_WORLD.Get_rank() < 2)))
    try:
        hu.rank()
        return {"error": None}
    except hu.ConfigError as e:
        return {"error": str(e)}
    finally:
        hvd.shutdown()
