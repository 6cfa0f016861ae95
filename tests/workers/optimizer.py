"""Rank-side code of the DistributedOptimizer tests (run under mpirun by tests/test_optimizer.py)."""
import numpy as np
import torch
from mpi4py import MPI

import hvd_unreliable as hu
from hvd_unreliable.faults import Bernoulli
from hvd_unreliable.transport import Transport


def shard(rank, n_samples=200, dim=10):
    """Least-squares data whose local optimum differs per rank (zeta > 0)."""
    rng = np.random.default_rng([42, rank])
    w = np.linspace(-1, 1, dim) + 0.5 * rng.standard_normal(dim)
    X = rng.standard_normal((n_samples, dim))
    y = X @ w + 0.1 * rng.standard_normal(n_samples)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def drift(mode="rps", p=0.05, steps=300, lr=0.05, optimizer="sgd", backend="mpi4py", num_servers=None):
    ctx = hu.init(backend=backend)
    comm = ctx.comm
    me, n = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(me)  # different initial replicas: the broadcast must make them equal
    model = torch.nn.Linear(10, 1, bias=False)
    X, y = shard(me)
    opt = {"sgd": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.5),
           "adam": lambda ps: torch.optim.Adam(ps, lr=lr)}[optimizer](model.parameters())
    hu.broadcast_parameters(model.state_dict(), root_rank=0)
    hu.broadcast_optimizer_state(opt, root_rank=0)
    transport = Transport(comm, Bernoulli(p), seed=9)
    opt = hu.DistributedOptimizer(opt, named_parameters=model.named_parameters(), mode=mode,
                                  transport=transport, num_servers=num_servers)
    # a decaying step size, as in Paper A's analysis (and a check that schedulers accept the wrapper)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t / 30.0))
    start_distance = opt.consensus_distance()
    distances = []
    for step in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(X).squeeze(1) - y) ** 2)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 10 == 9:
            distances.append(opt.consensus_distance())
    distance = distances[-1]
    # global objective at the averaged model, and its optimum (least squares on all shards)
    w = model.weight.detach().numpy().astype(np.float64).ravel()
    w_avg = np.empty_like(w)
    comm.Allreduce(w, w_avg, op=MPI.SUM)
    w_avg /= n
    Xs, ys = zip(*(shard(r) for r in range(n)))
    Xa, ya = torch.cat(Xs).double().numpy(), torch.cat(ys).double().numpy()
    w_opt = np.linalg.lstsq(Xa, ya, rcond=None)[0]
    f = lambda v: float(np.mean((Xa @ v - ya) ** 2))
    out = {"start_distance": start_distance, "distance": distance, "distances": distances, "loss": f(w_avg), "optimum": f(w_opt),
           "is_optimizer": isinstance(opt, {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]),
           "weights": model.weight.detach().numpy().ravel().tolist(), "backend": ctx.backend}
    hu.shutdown()
    return out


def bad_arguments():
    hu.init(backend="mpi4py")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = {}
    class Half:  # a compressor of Horovod's shape: float16 on the wire
        compress = staticmethod(lambda t: (t.half(), t.dtype))
        decompress = staticmethod(lambda t, dtype: t.to(dtype))

    for name, kwargs in {"mode": {"mode": "gossip"}, "servers": {"num_servers": 99},
                         "bpps": {"backward_passes_per_step": 0},
                         "compression": {"mode": "reliable", "compression": Half}}.items():
        try:
            hu.DistributedOptimizer(opt, **kwargs)
            errors[name] = None
        except hu.ConfigError as e:
            errors[name] = str(e)
    hu.shutdown()
    return errors


def reliable_average(backend="mpi4py", device="cpu"):
    """One ``reliable`` step with the learning rate 0 on parameters of several shapes and every
    float dtype: the gradients it leaves must be the mean of every rank's gradients, to within a
    few roundings of the dtype (``max_ulps``: the error in units of the dtype's epsilon times
    the largest gradient entry it sums)."""
    ctx = hu.init(backend=backend)
    comm = ctx.comm
    me, n = comm.Get_rank(), comm.Get_size()
    if device == "cuda":  # a GPU per rank where there are enough
        device = torch.device("cuda", me % torch.cuda.device_count())
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(me)
    shapes = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 2, 2), torch.float32), ((7,), torch.float64),
              ((6,), torch.float16), ((2, 3), torch.bfloat16)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dt, device=device)) for s, dt in shapes]
    grads = [torch.randn(s, generator=gen).to(dt) for s, dt in shapes]
    for p, g in zip(params, grads):
        p.grad = g.to(device, copy=True)  # g keeps the local gradient
    opt = hu.DistributedOptimizer(torch.optim.SGD(params, lr=0.0), mode="reliable")
    opt.step()
    ulps = []
    for p, g in zip(params, grads):
        local = g.double().numpy().ravel()
        mean, scale = np.empty_like(local), np.empty_like(local)
        comm.Allreduce(local, mean, op=MPI.SUM)
        comm.Allreduce(np.abs(local), scale, op=MPI.MAX)
        err = np.abs(p.grad.cpu().double().numpy().ravel() - mean / n)
        ulps.append(float((err / (torch.finfo(g.dtype).eps * scale)).max()))
    out = {"backend": ctx.backend, "device": str(params[0].grad.device), "max_ulps": max(ulps),
           "dtypes": [str(p.grad.dtype) for p in params],
           "grads": [x for p in params for x in p.grad.cpu().double().numpy().ravel().tolist()]}
    hu.shutdown()
    return out


def mismatched_models(extra_layer=False):
    """Rank 1 builds another model (a wider first layer, or one layer more) and broadcasts."""
    hu.init(backend="mpi4py")
    me = hu.rank()
    wide = 3 + (me == 1 and not extra_layer)
    layers = [torch.nn.Linear(4, wide), torch.nn.Linear(wide, 1)] + ([torch.nn.Linear(1, 1)] if extra_layer and me == 1 else [])
    try:
        hu.broadcast_parameters(torch.nn.Sequential(*layers).state_dict(), root_rank=0)
        return {"error": None}
    except hu.ConfigError as e:
        return {"error": str(e)}
    finally:
        hu.shutdown()


def frozen_layer(modes=("reliable",), backend="mpi4py"):
    """For each mode, a model whose first layer is frozen, trained with weight decay and
    momentum: the frozen layer must not move; unfrozen after two steps it trains."""
    ctx = hu.init(backend=backend)
    me = ctx.comm.Get_rank()
    out = {}
    for mode in modes:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        for p in model[0].parameters():
            p.requires_grad_(False)
        frozen = [p.detach().clone() for p in model[0].parameters()]
        opt = hu.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
                                      named_parameters=model.named_parameters(), mode=mode,
                                      transport=Transport(ctx.comm, Bernoulli(0.0), seed=1))
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(me))  # other data on every rank

        def step():
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

        step(), step()
        r = out[mode] = {"frozen_moved": [float((p.detach() - f).abs().max()) for p, f in zip(model[0].parameters(), frozen)],
                         "frozen_grads": [p.grad is not None for p in model[0].parameters()]}
        for p in model[0].parameters():
            p.requires_grad_(True)
        step()
        for p in model.parameters():
            p.requires_grad_(False)
        opt.zero_grad()
        opt.step()  # nothing left to train or communicate
        r["unfrozen_moved"] = [float((p.detach() - f).abs().max()) for p, f in zip(model[0].parameters(), frozen)]
        r["weights"] = [x for p in model.parameters() for x in p.detach().reshape(-1).tolist()]
    hu.shutdown()
    return out


def clipped_step(cases=(("reliable", True),), backend="mpi4py"):
    """Horovod's gradient-clipping pattern, for each (mode, skip): ``synchronize()``, clip,
    ``step()`` (inside ``skip_synchronize()`` where ``skip``): the gradients are averaged once,
    before the clipping."""
    ctx = hu.init(backend=backend)
    comm = ctx.comm
    me, n = comm.Get_rank(), comm.Get_size()
    out = []
    for mode, skip in cases:
        param = torch.nn.Parameter(torch.zeros(6))
        transport = Transport(comm, Bernoulli(0.0), seed=1)
        opt = hu.DistributedOptimizer(torch.optim.SGD([param], lr=1.0), mode=mode, transport=transport)
        local = torch.randn(6, generator=torch.Generator().manual_seed(me)) * 10
        param.grad = local.clone()
        opt.synchronize()
        mean = np.empty(6)
        comm.Allreduce(local.double().numpy(), mean, op=MPI.SUM)
        mean /= n
        r = {"mode": mode, "skip": skip, "synchronized_error": float(np.abs(param.grad.double().numpy() - mean).max())}
        norm = float(torch.nn.utils.clip_grad_norm_([param], max_norm=1.0))
        r["norm_error"] = abs(norm - float(np.linalg.norm(mean)))
        if skip:
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        expected = -mean / np.linalg.norm(mean)  # lr 1, gradient clipped to norm 1
        r["step_error"] = float(np.abs(param.detach().double().numpy() - expected).max())
        r["exchanges"] = transport.stats.counters["exchanges"]
        out.append(r)
    hu.shutdown()
    return out


def sparse_embedding(cases=(("reliable", "sgd"),)):
    """For each (mode, optimizer), an ``nn.Embedding(sparse=True)`` whose rows are used
    differently on every rank: the step averages its sparse gradients (dense on the wire) and
    hands the optimizer sparse ones."""
    ctx = hu.init(backend="mpi4py")
    comm = ctx.comm
    me, n = comm.Get_rank(), comm.Get_size()
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1.0), "sparse_adam": lambda ps: torch.optim.SparseAdam(ps, lr=0.1)}
    out = []
    for mode, optimizer in cases:
        emb = torch.nn.Embedding(6, 2, sparse=True)
        torch.nn.init.zeros_(emb.weight)
        opt = hu.DistributedOptimizer(make[optimizer](emb.parameters()), mode=mode,
                                      transport=Transport(comm, Bernoulli(0.0), seed=1))
        rows = torch.tensor([me, me + 1, 5])  # rank r uses rows r, r + 1 and 5
        (emb(rows) * (me + 1)).sum().backward()
        local = emb.weight.grad.to_dense().double().numpy()
        opt.synchronize()
        mean = np.empty_like(local)
        comm.Allreduce(local, mean, op=MPI.SUM)
        mean /= n
        r = {"case": [mode, optimizer], "sparse": emb.weight.grad.is_sparse,
             "error": float(np.abs(emb.weight.grad.to_dense().numpy() - mean).max())}
        with opt.skip_synchronize():
            opt.step()
        r["weights"] = emb.weight.detach().reshape(-1).tolist()
        r["moved_rows"] = sorted({i for i, w in enumerate(emb.weight.detach().tolist()) if any(w)})
        out.append(r)
    hu.shutdown()
    return out


def horovod_arguments(cases=(("reliable", "fp16", 1.0),), errors=False):
    """Horovod's optimizer arguments: for each (mode, compression, gradient_predivide_factor) the
    error of the averaged gradients against the float64 mean and the bytes the transport sent;
    with ``errors`` the messages of the combinations that are refused."""
    import horovod.torch as hvd

    ctx = hu.init(backend="horovod")
    comm = ctx.comm
    me, n = comm.Get_rank(), comm.Get_size()
    local = torch.randn(1000, generator=torch.Generator().manual_seed(me)) * 100
    mean = np.empty(1000)
    comm.Allreduce(local.double().numpy(), mean, op=MPI.SUM)
    mean /= n
    out = []
    for mode, compression, factor in cases:
        param = torch.nn.Parameter(torch.zeros(1000))
        transport = Transport(comm, Bernoulli(0.0), seed=1)
        opt = hu.DistributedOptimizer(torch.optim.SGD([param], lr=0.1), mode=mode, transport=transport, op=hvd.Average,
                                      compression=getattr(hvd.Compression, compression),
                                      gradient_predivide_factor=factor,  # and the rest of Horovod's call:
                                      num_groups=2, groups=None, sparse_as_dense=True,
                                      process_set=hvd.global_process_set)
        param.grad = local.clone()
        opt.synchronize()
        out.append({"case": [mode, compression, factor], "dtype": str(param.grad.dtype),
                    "error": float(np.abs(param.grad.double().numpy() - mean).max() / np.abs(mean).max()),
                    "bytes_sent": transport.stats.counters["bytes_sent"]})
    refused = {}
    if errors:
        for name, kwargs in {"rps_fp16": {"mode": "rps", "compression": hvd.Compression.fp16},
                             "sum": {"mode": "reliable", "op": hvd.Sum},
                             "factor": {"mode": "allreduce", "gradient_predivide_factor": 0},
                             "not_a_compressor": {"mode": "allreduce", "compression": "fp16"},
                             "process_set": {"mode": "allreduce", "process_set": hvd.ProcessSet([0])}}.items():
            try:
                hu.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), **kwargs)
                refused[name] = None
            except hu.ConfigError as e:
                refused[name] = str(e)
    hu.shutdown()
    return {"cases": out, "refused": refused}
