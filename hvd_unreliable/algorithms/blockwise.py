"""Lossy reduce-scatter + robust average + lossy all-gather of one flat buffer.

The communication pattern shared by RPS (Paper A, applied to models) and the lossy-allreduce
baseline (applied to gradients). With ``S`` servers (ranks ``0..S-1``) and ``n`` ranks:

1. Partition the flat vector ``v`` into ``S`` blocks, balanced to within one element; block ``j``
   is served by rank ``j``.
2. Reduce-scatter (lossy): every rank ``i`` sends block ``j`` of its ``v^(i)`` to server ``j``.
3. Robust average at server ``j`` over ``O^(j) = {j} U {i : block arrived}``:
   ``vbar^(j) = (1/|O^(j)|) sum_{i in O^(j)} v^(i,j)``, summed in rank order (from the first
   block that arrived whole), never zero-filled.
   With packet granularity the same rule holds per element.
4. All-gather (lossy): server ``j`` sends ``vbar^(j)`` to every rank; rank ``i`` takes it where
   it arrived and keeps its own ``v^(i,j)`` where it did not.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError
from ..transport import Transport
from .fusion import from_wire, fuse, wire

REDUCE_SCATTER = "reduce_scatter"
ALL_GATHER = "all_gather"


def check_num_servers(num_servers: Optional[int], world_size: int) -> int:
    """``num_servers`` (None = every rank serves a block) validated against the world size."""
    if num_servers is None:
        return world_size
    if isinstance(num_servers, bool) or not isinstance(num_servers, int) or not 1 <= num_servers <= world_size:
        raise ConfigError("algorithm.num_servers", num_servers, f"an integer in [1, {world_size}] (the number of ranks), or null")
    return num_servers


def partition(total: int, num_servers: int) -> np.ndarray:
    """Block sizes: ``total`` elements split into ``num_servers`` blocks within one element."""
    base, extra = divmod(total, num_servers)
    return np.array([base + (j < extra) for j in range(num_servers)], dtype=np.int64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def robust_mean(rows: torch.Tensor, masks: Sequence[Union[bool, np.ndarray]]) -> torch.Tensor:
    """Mean of the rows that arrived (``masks[s]`` True, or per element).

    Summed in row order, starting from the first row that arrived whole, in float32 (float64 for
    float64 data); divided by the number of arrivals per element (never zero: the server's own
    row always arrives).
    """
    acc_dtype = accumulate_dtype(rows.dtype)
    first = next(s for s, m in enumerate(masks) if m is True or (m is not False and m.all()))
    acc = rows[first].to(acc_dtype, copy=True)
    count: Union[int, torch.Tensor] = 1
    for s, (row, m) in enumerate(zip(rows, masks)):
        if m is False or s == first:
            continue
        if m is True:
            acc += row
            count = count + 1
        else:
            mt = torch.from_numpy(m).to(rows.device)
            acc += torch.where(mt, row.to(acc.dtype), torch.zeros((), dtype=acc.dtype))
            count = count + mt.to(torch.int64)
    acc /= count
    return acc.to(rows.dtype)


def blockwise_average(flat: torch.Tensor, transport: Transport, num_servers: Optional[int] = None) -> torch.Tensor:
    """One lossy reduce-scatter / robust-average / all-gather round of 1-D ``flat``, in place
    (a CPU tensor, or a CUDA tensor when the transport's MPI is CUDA-aware).

    The all-gather writes straight into ``flat``: an averaged block (or packet) that arrives
    replaces the rank's own values, one that is lost leaves them as they were. Returns ``flat``.
    """
    n, me = transport.size, transport.rank
    servers = check_num_servers(num_servers, n)
    sizes = partition(flat.numel(), servers)
    to_servers = np.zeros(n, dtype=np.int64)
    to_servers[:servers] = sizes
    mine = int(sizes[me]) if me < servers else 0

    rs = transport.exchange(wire(flat), to_servers, np.full(n, mine), REDUCE_SCATTER)
    if me < servers:
        rows = from_wire(rs.data, flat.dtype).view(n, mine)
        avg = wire(robust_mean(rows, [rs.mask(s) for s in range(n)]))
        ag_counts = np.full(n, mine)
    else:
        avg, ag_counts = wire(flat)[:0], np.zeros(n, dtype=np.int64)
    transport.exchange(avg, ag_counts, to_servers, ALL_GATHER, recv=wire(flat),
                       send_offsets=np.zeros(n, dtype=np.int64))
    return flat


def average_tensors(tensors: List[torch.Tensor], transport: Transport, num_servers: Optional[int],
                    what: str) -> List[torch.Tensor]:
    """Fuse ``tensors``, run :func:`blockwise_average` once per dtype group, write back in place."""
    for group in fuse(tensors, what, device_buffers=transport.cuda_aware):
        group.store(blockwise_average(group.flat, transport, num_servers))
    return tensors
