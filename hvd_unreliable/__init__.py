"""hvd_unreliable: train with Horovod/MPI over an unreliable network and measure what it costs.

Layers (each imports only those before it): ``faults`` (loss and delay models, no MPI) ->
``transport`` (moves bytes, applies faults, counts) -> ``algorithms`` (RPS, lossy allreduce,
parameter server) -> ``integration`` (context, broadcasts, ``DistributedOptimizer``) ->
applications (``train``, ``report``, ``bench/``).

The Horovod-style API is importable from here; torch-dependent parts load on first use so that
the fault models load without MPI and the transport without torch (importing mpi4py's ``MPI``
initialises MPI, which a launcher process must not do).
"""
from .errors import ConfigError, ExchangeMismatch, LaunchError, TransportTimeout

__version__ = "0.1.0"

_CONTEXT = "hvd_unreliable.integration.context"
_LAZY = {
    **{name: _CONTEXT for name in ("init", "shutdown", "rank", "size", "local_rank", "local_size",
                                   "backend", "barrier", "is_root", "root_print", "context", "cuda_device")},
    "Transport": "hvd_unreliable.transport",
    "rps_average": "hvd_unreliable.algorithms",
    "lossy_allreduce": "hvd_unreliable.algorithms",
    "DistributedOptimizer": "hvd_unreliable.integration.optimizer",
    "broadcast_parameters": "hvd_unreliable.integration.broadcast",
    "broadcast_optimizer_state": "hvd_unreliable.integration.broadcast",
}

__all__ = ["ConfigError", "ExchangeMismatch", "LaunchError", "TransportTimeout", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvd_unreliable' has no attribute {name!r}")
