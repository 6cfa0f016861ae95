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

import functools
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import check_num_servers
from ..transport import Transport
from .fusion import fuse, numeric, wire, workspace

Array = Union[np.ndarray, torch.Tensor]

REDUCE_SCATTER = "reduce_scatter"
ALL_GATHER = "all_gather"


def partition(total: int, num_servers: int) -> np.ndarray:
    """Block sizes: ``total`` elements split into ``num_servers`` blocks within one element."""
    base, extra = divmod(total, num_servers)
    return np.array([base + (j < extra) for j in range(num_servers)], dtype=np.int64)


def robust_mean(rows: Sequence[Array], masks: Sequence[Union[bool, np.ndarray]], out: Array) -> Array:
    """Mean of the rows that arrived (``masks[s]`` True, or per element), written to ``out``.

    Rows are NumPy arrays (host memory: a NumPy ufunc costs a fraction of a torch op's
    per-call time, which is most of a small round's) or torch tensors (GPU memory, or bfloat16,
    which NumPy lacks); the same operations serve both. ``out`` is one of the rows, one that
    arrived whole (a server's own block); the other rows are scratch and may be overwritten.
    Summed in row order, starting from the first row that arrived whole, in float32 (float64
    for float64 data); divided by the number of arrivals per element (never zero). For float32
    and float64 data the sum runs in place, in the first row and from the own row on in
    ``out``: ``acc + row`` and ``row + acc`` are the same float, so the result is the one of a
    separate accumulator, with one pass less over memory.
    """
    host = isinstance(out, np.ndarray)
    xp = np if host else torch
    first = next(s for s, m in enumerate(masks) if m is True or (m is not False and m.all()))
    if out.dtype in ((np.float32, np.float64) if host else (torch.float32, torch.float64)):
        acc = rows[first]
    else:  # half precision: accumulate in float32
        acc = workspace("robust_mean", len(out), torch.float32, "cpu" if host else out.device)
        acc = acc.numpy() if host else acc
        acc[:] = rows[first]
    count: Union[int, Array] = 1
    for s, (row, m) in enumerate(zip(rows, masks)):
        if s == first or m is False:
            continue
        if m is True:
            if row is out and acc.dtype == out.dtype:
                acc = xp.add(out, acc, out=out)  # the own row takes over as the accumulator
            else:
                xp.add(acc, row, out=acc)
            count = count + 1
        else:
            m = m if host else torch.from_numpy(m).to(out.device)
            xp.add(acc, xp.where(m, row, 0), out=acc)
            count = count + m
    if acc is out:
        return out if isinstance(count, int) and count == 1 else _divide(out, count, out)
    if acc.dtype == out.dtype:
        return _divide(acc, count, out)
    out[:] = _divide(acc, count, acc)
    return out


def _divide(x: Array, count: Union[int, Array], out: Array) -> Array:
    """``x / count`` into ``out``. By a power of two it multiplies by the reciprocal instead: the
    same real number, so the same rounded result, in about half the time of a division."""
    xp = np if isinstance(out, np.ndarray) else torch
    if isinstance(count, int) and count & (count - 1) == 0:
        return xp.multiply(x, 1.0 / count, out=out)
    return xp.divide(x, count, out=out)


def blockwise_average(flat: torch.Tensor, transport: Transport, num_servers: Optional[int] = None) -> torch.Tensor:
    """One lossy reduce-scatter / robust-average / all-gather round of 1-D ``flat``, in place
    (a CPU tensor, or a CUDA tensor when the transport's MPI is CUDA-aware).

    Block ``j`` of ``flat`` is server ``j``'s own row: it never leaves ``flat``, the robust
    average overwrites it, and the all-gather sends it from there. Averaged blocks (or packets)
    that arrive replace the rank's own values, lost ones leave them as they were. Returns ``flat``.
    """
    lay, buf, rows = _wiring(flat, num_servers, transport.size, transport.rank)

    # Reduce-scatter: block j to server j; a server's own block stays in place.
    rs = transport.exchange(buf, lay.to_servers, lay.from_peers, REDUCE_SCATTER, recv=rows, send_offsets=lay.starts)
    if lay.mine:
        me = transport.rank
        blocks, masks = _rows_of(rs, buf, lay, me, flat.dtype)
        robust_mean(blocks, masks, out=blocks[me])

    # All-gather: each server's average, straight from its block of flat into everyone's flat.
    transport.exchange(buf, lay.to_all, lay.blocks, ALL_GATHER, recv=buf, send_offsets=lay.own_offsets)
    return flat


_last_wiring: list = [None]  # (what flat and the round were, (layout, buf, rows)) of the last round


def _wiring(flat: torch.Tensor, num_servers: Optional[int], n: int, me: int) -> tuple:
    """The layout of a round of ``flat`` on rank ``me`` of ``n`` and what the transport moves:
    ``flat`` and the rows it receives, wired (:func:`~.fusion.wire`). Training averages the same
    memory every step: for the same memory (address, shape, strides, dtype) and servers, those
    of the last round, the same objects, by which the transport recognises a repeated exchange
    (the kept views hold that memory, so nothing else can take its address meanwhile; the rows'
    buffer too)."""
    what = (flat.data_ptr(), flat.shape, flat.stride(), flat.dtype, num_servers, n, me)
    last = _last_wiring[0]
    if last is not None and last[0] == what:
        return last[1]
    lay = _layout(flat.numel(), check_num_servers(num_servers, n), n, me)
    wiring = lay, wire(flat), wire(workspace("rows", (n - 1) * lay.mine, flat.dtype, flat.device))
    _last_wiring[0] = (what, wiring)
    return wiring


_last_rows: list = [None]  # (Received, (rows, buf, layout), blocks, masks) of the last reduce-scatter


def _rows_of(rs, buf, lay: "_Layout", me: int, dtype: torch.dtype) -> tuple:
    """The robust mean's rows (this rank's block of every rank, its own in ``buf``) and masks.

    A repeated reduce-scatter that loses nothing returns the same ``Received`` as the last one
    (the same buffers, counts and arrivals), whose rows and masks are the ones found then; one
    into the same buffers that loses other links has the same rows, with masks of its own.
    """
    last, wiring = _last_rows[0], (rs.data, buf, lay)
    if last is not None and last[0] is rs:
        return last[2], last[3]
    if last is not None and all(a is b for a, b in zip(last[1], wiring)):
        blocks = last[2]
    else:
        blocks = [numeric(buf[lay.start:lay.start + lay.mine] if s == me else rs.block(s), dtype)
                  for s in range(len(lay.blocks))]
    masks = [True if s == me else rs.mask(s) for s in range(len(lay.blocks))]
    _last_rows[0] = (rs, wiring, blocks, masks)
    return blocks, masks


class _Layout(NamedTuple):
    """Counts and offsets of one round, from the point of view of rank ``me``: tuples, shared by
    every round of this shape (the transport recognises a repeated exchange by their identity)."""

    mine: int               # elements of the block this rank serves (0 if it serves none)
    start: int              # where that block starts in the flat buffer
    starts: tuple           # per rank: where its block starts (0 for non-servers)
    blocks: tuple           # per rank: its block's size (0 for non-servers)
    to_servers: tuple       # reduce-scatter sends: blocks, without the own one
    from_peers: tuple       # reduce-scatter receives: the own block's size from every peer
    to_all: tuple           # all-gather sends: the own block to every rank
    own_offsets: tuple      # all-gather send offsets: the own block, for every rank


@functools.lru_cache(maxsize=64)
def _layout(total: int, servers: int, n: int, me: int) -> _Layout:
    blocks = [0] * n
    blocks[:servers] = partition(total, servers).tolist()
    starts = [0] * n
    for j in range(1, servers):
        starts[j] = starts[j - 1] + blocks[j - 1]
    mine, start = blocks[me], starts[me]
    to_servers, from_peers = list(blocks), [mine] * n
    to_servers[me] = from_peers[me] = 0
    return _Layout(mine, start, tuple(starts), tuple(blocks), tuple(to_servers), tuple(from_peers), (mine,) * n,
                   (start,) * n)


def average_tensors(tensors: List[torch.Tensor], transport: Transport, num_servers: Optional[int],
                    what: str) -> List[torch.Tensor]:
    """Fuse ``tensors``, run :func:`blockwise_average` once per dtype group, write back in place."""
    for group in fuse(tensors, what, device_buffers=transport.cuda_aware):
        blockwise_average(group.flat, transport, num_servers)
        group.store()
    return tensors
