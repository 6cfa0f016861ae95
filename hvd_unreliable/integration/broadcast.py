"""Broadcast initial parameters and optimizer state from one rank (Horovod's API, over mpi4py).

Tensor data moves with buffer-based ``Bcast`` of one fused buffer per dtype; only small
structure is pickled: an optimizer's state (keys, shapes, scalars) and the shapes and dtypes
every rank compares with root's before any data moves.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Tuple, Union

import torch

from ..algorithms.fusion import fuse, wire
from ..errors import ConfigError
from .context import context


def _tensors(params: Union[Mapping[str, torch.Tensor], Iterable]) -> list:
    if isinstance(params, Mapping):
        items = list(params.values())
    else:
        items = [p[1] if isinstance(p, tuple) else p for p in params]
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"params[{i}]", type(t).__name__, "torch.Tensor values (a state_dict, named_parameters() or a list)")
    return [t for t in items if t.is_floating_point()], [t for t in items if not t.is_floating_point()]


def broadcast_tensors(tensors: list, root_rank: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with root's values (in place).

    First every rank learns every rank's shapes and dtypes (a small ``allgather``): where one
    rank's tensors differ from root's (another model), every rank raises :class:`ConfigError`
    naming the rank and the first tensor that differs, before any data moves.
    """
    comm = context().comm
    floats, others = _tensors(tensors)
    _check_same_tensors(comm, floats + others, root_rank)
    for group in fuse(floats):
        comm.Bcast(wire(group.flat).view("uint8"), root=root_rank)
        group.store()
    for t in others:  # integer buffers (e.g. BatchNorm's num_batches_tracked): few and small
        host = t.detach().cpu().contiguous().reshape(-1)
        comm.Bcast(host.numpy().view("uint8"), root=root_rank)
        t.copy_(host.view_as(t))


def _check_same_tensors(comm, tensors: list, root_rank: int) -> None:
    layouts = comm.allgather([(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in tensors])
    root = layouts[root_rank]
    for rank, mine in enumerate(layouts):
        if mine != root:
            first = next((i for i, (a, b) in enumerate(zip(mine, root)) if a != b), None)
            raise ConfigError(f"params on rank {rank}", _describe(mine, first),
                              f"rank {root_rank}'s {_describe(root, first)} (the same model on every rank, in the same order)")


def _describe(layout: list, i) -> str:
    return f"{len(layout)} tensors" if i is None else f"tensor {i} of shape {layout[i][0]}, {layout[i][1]}"


def broadcast_parameters(params: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]],
                         root_rank: int = 0) -> None:
    """Like ``hvd.broadcast_parameters``: ``model.state_dict()`` or ``model.named_parameters()``."""
    with torch.no_grad():
        broadcast_tensors(list(params.values()) if isinstance(params, Mapping) else list(params), root_rank)


def _strip(obj: Any, out: list) -> Any:
    """Replace tensors in ``obj`` by placeholders, appending them to ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("__tensor__", len(out) - 1, tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    if isinstance(obj, dict):
        return {k: _strip(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, out) for v in obj)
    return obj


def _fill(obj: Any, tensors: list) -> Any:
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__tensor__":
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Like ``hvd.broadcast_optimizer_state``: every rank ends with root's state and hyperparameters."""
    comm = context().comm
    found: list = []
    skeleton = _strip(optimizer.state_dict(), found) if comm.Get_rank() == root_rank else None
    skeleton = comm.bcast(skeleton, root=root_rank)
    specs: list = []
    _collect_specs(skeleton, specs)
    if comm.Get_rank() == root_rank:
        tensors = [t.detach().cpu().clone() for t in found]
    else:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for _, shape, dtype in sorted(specs)]
    broadcast_tensors(tensors, root_rank)
    optimizer.load_state_dict(_fill(skeleton, tensors))


def _collect_specs(obj: Any, specs: list) -> None:
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__tensor__":
        specs.append((obj[1], obj[2], obj[3]))
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_specs(v, specs)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_specs(v, specs)
