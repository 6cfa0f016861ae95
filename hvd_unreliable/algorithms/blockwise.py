"""Lossy reduce-scatter + robust average + lossy all-gather of one flat buffer.

The communication pattern shared by RPS (Paper A, applied to models) and the lossy-allreduce
baseline (applied to gradients). With ``S`` servers (ranks ``0..S-1``) and ``n`` ranks:

1. Partition the flat vector ``v`` into ``S`` blocks, balanced to within one element; block ``j``
   is served by rank ``j``.
2. Reduce-scatter (lossy): every rank ``i`` sends block ``j`` of its ``v^(i)`` to server ``j``.
3. Robust average at server ``j`` over ``O^(j) = {j} U {i : block arrived}``:
   ``vbar^(j) = (1/|O^(j)|) sum_{i in O^(j)} v^(i,j)``, summed in rank order, never zero-filled.
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
    """Mean of the rows that arrived (``masks[s]`` True, or per element), summed in row order."""
    acc = torch.zeros(rows.shape[1], dtype=accumulate_dtype(rows.dtype))
    count: Union[int, torch.Tensor] = 0
    for row, m in zip(rows, masks):
        if m is False:
            continue
        if m is True:
            acc += row
            count = count + 1
        else:
            mt = torch.from_numpy(m)
            acc += torch.where(mt, row.to(acc.dtype), torch.zeros((), dtype=acc.dtype))
            count = count + mt.to(torch.int64)
    return (acc / count).to(rows.dtype)


def blockwise_average(flat: torch.Tensor, transport: Transport, num_servers: Optional[int] = None) -> torch.Tensor:
    """One lossy reduce-scatter / robust-average / all-gather round of 1-D CPU ``flat``.

    Returns a new tensor: the averaged blocks that reached this rank, its own values elsewhere.
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

    out = torch.empty_like(flat)
    ag = transport.exchange(avg, ag_counts, to_servers, ALL_GATHER, recv=wire(out),
                            send_offsets=np.zeros(n, dtype=np.int64))
    offset = 0
    for j in range(servers):
        block = slice(offset, offset + int(sizes[j]))
        offset += int(sizes[j])
        m = ag.mask(j)
        if m is False:
            out[block] = flat[block]
        elif m is not True:
            out[block] = torch.where(torch.from_numpy(m), out[block], flat[block])
    return out


def average_tensors(tensors: List[torch.Tensor], transport: Transport, num_servers: Optional[int],
                    what: str) -> List[torch.Tensor]:
    """Fuse ``tensors``, run :func:`blockwise_average` once per dtype group, write back in place."""
    for group in fuse(tensors, what):
        group.store(blockwise_average(group.flat, transport, num_servers))
    return tensors
