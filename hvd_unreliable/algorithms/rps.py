"""RPS: model averaging over a lossy network (Paper A).

Yu, Tang, Renggli, Kassing, Singla, Alistarh, Zhang, Liu. "Distributed Learning over Unreliable
Networks", ICML 2019 (arXiv 1810.07766). Every worker<->server message is dropped with
probability p; RPS still converges at a rate comparable to a reliable network, and the influence
of p fades as the number of servers grows.

Step t on worker i (the optimizer wrapper does step 1; :func:`rps_average` does steps 2-4)::

    1. v_t^(i) = x_t^(i) - gamma * g_t^(i)            local optimizer step on the own replica
    2. v_t^(i) = [v_t^(i,1); ...; v_t^(i,S)]          partition into S blocks, block j at server j
    3. O_t^(j) = {j} U {i : message i->j arrived}     lossy reduce-scatter
       vbar_t^(j) = 1/|O_t^(j)| * sum_{i in O_t^(j)} v_t^(i,j)      robust average, never zero-fill
    4. x_{t+1}^(i,j) = vbar_t^(j)  if message j->i arrived (or i == j)   lossy all-gather
                     = v_t^(i,j)   otherwise (keep the own block)

MODELS are averaged, not gradients: a replica that missed a broadcast is pulled back at the next
step, which is why RPS is robust where gradient averaging (:mod:`.lossy_allreduce`) drifts.
Steps 2-4 are :func:`hvd_unreliable.algorithms.blockwise.blockwise_average`.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from ..transport import Transport
from .blockwise import average_tensors


def rps_average(tensors: Iterable[torch.Tensor], transport: Transport,
                num_servers: Optional[int] = None) -> List[torch.Tensor]:
    """One RPS averaging round of ``tensors`` (e.g. a model's parameters), in place.

    All tensors are fused into one flat buffer per dtype (one exchange, not one per tensor).
    ``num_servers`` S <= n ranks serve the blocks (ranks 0..S-1; default all n, as in the paper).
    At p = 0 the result is the exact mean on every rank (up to float rounding); at p = 1 every
    rank keeps its own values. Returns ``tensors``.
    """
    return average_tensors(list(tensors), transport, num_servers, "rps_average.tensors")
