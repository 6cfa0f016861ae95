"""``DistributedOptimizer``: Horovod's call shape, with lossy modes.

Switching from Horovod is one import and one argument::

    opt = hvd_unreliable.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                              mode="rps", transport=transport)

Modes:

* ``reliable``  -- gradient averaging through Horovod's allreduce (mpi4py ``Allreduce`` when
  Horovod is absent), then the local step: the no-fault baseline.
* ``allreduce`` -- gradient averaging over the lossy transport, then the local step
  (:func:`~hvd_unreliable.algorithms.lossy_allreduce`, Paper A's vulnerable baseline).
* ``rps``       -- the local step first, then RPS model averaging of the parameters
  (:func:`~hvd_unreliable.algorithms.rps_average`, Paper A).

Optimizer state (momentum buffers, Adam moments) stays local to each rank and is never
averaged, as in Paper A; only its initial value is broadcast (``broadcast_optimizer_state``).
In ``rps`` mode the wrapper lays the parameters out back to back in one buffer per dtype
(:func:`~hvd_unreliable.algorithms.fusion.pack`: each parameter's ``.data`` becomes a slice of
it, values unchanged), so that averaging them needs no copy into a fusion buffer and back.
Frozen parameters (``requires_grad=False``) are left alone: no gradient, no communication,
so weight decay or momentum does not move them (a parameter unfrozen later takes part from then
on). Communication happens once per ``step()``: gradients accumulated over several backward passes
(``backward_passes_per_step``) are averaged together, as in Horovod. To clip averaged gradients,
Horovod's pattern works: ``opt.synchronize(); clip_grad_norm_(...); with opt.skip_synchronize():
opt.step()``. As in Horovod the wrapper
is an instance of the wrapped optimizer's class, so LR schedulers keep working.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from mpi4py import MPI

from ..algorithms import lossy_allreduce, rps_average
from ..algorithms.fusion import fuse, pack, wire
from ..errors import ConfigError, check_choice, check_num_servers, check_positive
from ..transport import Transport
from .context import context

MODES = ("reliable", "allreduce", "rps")
_NO_HVD_SUM = (torch.bfloat16,)  # dtypes the reliable mode's reduction cannot sum
_NO_MPI_SUM = (torch.float16, torch.bfloat16)


class _DistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, mode, transport, num_servers, backward_passes_per_step, compression=None,
                 predivide=1.0):
        super(self.__class__, self).__init__(params)
        self._mode = mode
        self._compression, self._predivide = compression, predivide
        self._transport = transport
        self._num_servers = num_servers
        self.backward_passes_per_step = backward_passes_per_step
        self._comm_step = 0
        self._hvd = context().hvd
        self._synchronized = False  # this step's gradients are averaged already (synchronize())
        self._should_synchronize = True  # False inside skip_synchronize()

    def _params(self):
        """The parameters that train: frozen ones (``requires_grad=False``) are neither
        communicated nor given a gradient, as in Horovod."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _reliable_average(self, grads) -> None:
        """Average ``grads`` with Horovod's allreduce (on the GPU for CUDA tensors), or else with
        MPI's, one fused buffer per dtype. A dtype the reduction cannot sum (Horovod 0.28 has no
        bfloat16, MPI no float16 or bfloat16) is summed in float32 and rounded once, as the
        lossy modes average it."""
        hvd, comm = self._hvd, context().comm
        for group in fuse(grads, "gradients", device_buffers=hvd is not None):
            unsummable = _NO_HVD_SUM if hvd is not None else _NO_MPI_SUM
            flat = group.flat.float() if group.dtype in unsummable else group.flat
            if hvd is not None:
                hvd.allreduce_(flat, op=hvd.Average, name=f"hvdu.grads.{group.dtype}")
            else:
                comm.Allreduce(MPI.IN_PLACE, wire(flat), op=MPI.SUM)
                flat /= comm.Get_size()
            if flat is not group.flat:
                group.flat.copy_(flat)
            group.store()

    def _next_round(self) -> None:
        """Loss decisions are keyed by the communication step: one per averaging round."""
        if self._transport is not None:
            self._transport.set_step(self._comm_step)
        self._comm_step += 1

    def synchronize(self) -> None:
        """Average the gradients now (``reliable``, ``allreduce``), as Horovod's ``synchronize``:
        e.g. to clip them before ``with opt.skip_synchronize(): opt.step()``. A ``step()`` after
        it does not average them again. In ``rps`` mode there is nothing to do before the step
        (the models are averaged after it)."""
        if self._mode == "rps" or self._synchronized:
            return
        self._next_round()
        params = self._params()
        for p in params:
            if p.grad is None:  # every rank must contribute the same layout
                p.grad = torch.zeros_like(p)
        # sparse gradients (nn.Embedding(sparse=True)) travel dense, as with Horovod's
        # sparse_as_dense, and are made sparse again for the optimizer (SparseAdam wants them so)
        sparse = {i: p.grad.sparse_dim() for i, p in enumerate(params) if p.grad.is_sparse}
        grads = [p.grad.to_dense() if i in sparse else p.grad for i, p in enumerate(params)]
        with torch.no_grad():
            if self._predivide != 1.0 and grads:  # Horovod's: scale by 1/f before the sum, by f after it
                torch._foreach_div_(grads, self._predivide)
            # Horovod's compression (e.g. fp16 on the wire), tensor by tensor
            packed = [self._compression.compress(g) for g in grads] if self._compression else [(g, None) for g in grads]
            sent = [c for c, _ in packed]
            if self._mode == "reliable":
                self._reliable_average(sent)
            else:
                lossy_allreduce(sent, self._transport, self._num_servers)
            for g, (c, how) in zip(grads, packed):
                if c is not g:
                    g.copy_(self._compression.decompress(c, how))
            if self._predivide != 1.0 and grads:
                torch._foreach_mul_(grads, self._predivide)
        for i, sparse_dim in sparse.items():
            params[i].grad = grads[i].to_sparse(sparse_dim)
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """Horovod's: ``step()`` inside it does not average the gradients (they were, by
        :meth:`synchronize`). ``rps`` mode still averages the models after the step."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._mode == "rps":
            self._next_round()
            loss = super(self.__class__, self).step(closure)
            with torch.no_grad():
                rps_average(self._params(), self._transport, self._num_servers)
            return loss
        if self._should_synchronize:
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def state_dict(self):
        """The wrapped optimizer's state plus the communication step (loss decisions are keyed by it)."""
        state = super(self.__class__, self).state_dict()
        state["hvdu_comm_step"] = self._comm_step
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self._comm_step = state_dict.pop("hvdu_comm_step", 0)
        super(self.__class__, self).load_state_dict(state_dict)

    def consensus_distance(self) -> float:
        """Mean squared distance of the replicas to their average, (1/n) sum_i ||x_i - xbar||^2.

        Measured over a reliable channel (it observes the drift, it does not repair it).
        Collective: every rank must call it.
        """
        comm = context().comm
        n = comm.Get_size()
        local = 0.0
        for group in fuse(self._params(), "parameters"):
            x = group.flat.to(torch.float64).numpy()
            mean = np.empty_like(x)
            comm.Allreduce(x, mean, op=MPI.SUM)
            mean /= n
            local += float(np.sum((x - mean) ** 2))
        return comm.allreduce(local, op=MPI.SUM) / n


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
                         mode: str = "rps", transport: Optional[Transport] = None,
                         num_servers: Optional[int] = None, backward_passes_per_step: int = 1,
                         compression=None, op=None, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups=None, sparse_as_dense: bool = False, process_set=None):
    """Wrap ``optimizer`` so that ``step()`` communicates as ``mode`` says (see module docs).

    ``transport`` carries the lossy traffic of ``allreduce`` and ``rps`` (default: a reliable
    transport on the context's communicator). The rest are Horovod's, so that a call written for
    ``hvd.DistributedOptimizer`` keeps working: ``compression`` (e.g. ``hvd.Compression.fp16``),
    ``op`` (``hvd.Average``) and ``gradient_predivide_factor`` for the gradient modes (``rps``
    averages models, which a gradient compressor would round every step); ``num_groups`` and
    ``groups`` are taken and change nothing (every mode fuses one buffer per dtype);
    ``sparse_as_dense`` is what every mode does anyway; ``process_set`` must be the global one
    (the transport spans the whole world). Everything is validated before any communication.
    """
    ctx = context()
    if process_set is not None and getattr(process_set, "process_set_id", None) != 0:
        raise ConfigError("process_set", getattr(process_set, "ranks", process_set),  # a ProcessSet's ranks
                          "hvd.global_process_set (the lossy transport spans every rank)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ConfigError("num_groups", num_groups, "an integer >= 0 (as Horovod's; every mode fuses one buffer per dtype)")
    check_choice("mode", mode, MODES)
    check_num_servers(num_servers, ctx.comm.Get_size())
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ConfigError("backward_passes_per_step", backward_passes_per_step, "an integer >= 1")
    if op is not None and (ctx.hvd is None or op != ctx.hvd.Average):
        raise ConfigError("op", op, "hvd.Average (the default): every mode averages")
    check_positive("gradient_predivide_factor", gradient_predivide_factor)
    if compression is not None:
        if not (callable(getattr(compression, "compress", None)) and callable(getattr(compression, "decompress", None))):
            raise ConfigError("compression", compression, "a Horovod compressor (compress/decompress), e.g. hvd.Compression.fp16")
        probe = torch.zeros(1)
        if compression.compress(probe)[0] is probe:  # changes nothing (hvd.Compression.none)
            compression = None
        elif mode == "rps":
            raise ConfigError("compression", getattr(compression, "__name__", compression),
                              "hvd.Compression.none in rps mode (it averages models, which compression would round)")
        elif mode == "reliable" and ctx.hvd is None:
            raise ConfigError("compression", getattr(compression, "__name__", compression),
                              "hvd.Compression.none without Horovod (MPI's Allreduce has no float16 sum)")
    if named_parameters is not None:
        named = list(named_parameters)
        names = [n for n, _ in named]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError("named_parameters", dup, "unique parameter names")
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in named if id(p) not in known]
        if missing:
            raise ConfigError("named_parameters", missing[:5], "parameters that the optimizer updates")
    if transport is None and mode != "reliable":
        transport = Transport(ctx.comm)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    if mode == "rps":
        pack(p for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
    wrapped = cls(optimizer.param_groups, mode, transport, num_servers, backward_passes_per_step, compression,
                  gradient_predivide_factor)
    wrapped.state = optimizer.state
    return wrapped
