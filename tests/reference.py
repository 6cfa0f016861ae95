"""Single-process NumPy reference of the lossy reduce-scatter / robust average / all-gather.

Written from Paper A's equations, independently of the torch code, and driven by the same loss
decisions (the fault model asked with the same coordinates as the transport asks them).
"""
import numpy as np

from hvd_unreliable.transport import element_mask, packetize


def arrivals(loss, seed, step, phase, call, src, dst, count, itemsize, packet_bytes):
    """Per-element arrival mask of link src -> dst, exactly as the transport decides it."""
    if src == dst:
        return np.ones(count, dtype=bool)
    if count == 0:
        return np.zeros(0, dtype=bool)
    npk, per = packetize(count, itemsize, packet_bytes)
    return element_mask(loss.decide(step, phase, src, dst, npk, seed, call), per, count)


def robust_average(blocks, masks, own):
    """Server ``own``'s average of the ``blocks`` whose elements arrived (``masks``), in rank order
    from the first block that arrived whole, accumulated in float32 (float64 for float64 data)."""
    dtype = blocks[0].dtype
    acc_dtype = np.float64 if dtype == np.float64 else np.float32
    size = blocks[0].size
    whole = [i for i, m in enumerate(masks) if m.all() and size > 0] or [own]  # the own block always arrives
    acc = blocks[whole[0]].astype(acc_dtype)
    count = np.ones(size, dtype=np.int64)
    for i, (block, m) in enumerate(zip(blocks, masks)):
        if i != whole[0]:
            acc = acc + np.where(m, block.astype(acc_dtype), acc_dtype(0))
            count += m
    return (acc / count.astype(acc_dtype)).astype(dtype)


def blockwise_round(xs, num_servers, loss, seed, step, packet_bytes=None, call=0):
    """One round on replicas ``xs`` (list of 1-D arrays, one per rank); returns the new replicas."""
    n, total = len(xs), xs[0].size
    itemsize = xs[0].itemsize
    base, extra = divmod(total, num_servers)
    sizes = [base + (j < extra) for j in range(num_servers)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    averages = []
    for j in range(num_servers):  # server j: robust average of what arrived, in rank order
        masks = [arrivals(loss, seed, step, "reduce_scatter", call, i, j, sizes[j], itemsize, packet_bytes)
                 for i in range(n)]
        averages.append(robust_average([x[offsets[j]:offsets[j + 1]] for x in xs], masks, j))
    out = []
    for i in range(n):  # all-gather: adopt the average where it arrived, keep the own block otherwise
        x = xs[i].copy()
        for j in range(num_servers):
            m = arrivals(loss, seed, step, "all_gather", call, j, i, sizes[j], itemsize, packet_bytes)
            x[offsets[j]:offsets[j + 1]] = np.where(m, averages[j], xs[i][offsets[j]:offsets[j + 1]])
        out.append(x)
    return out
