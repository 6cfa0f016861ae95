"""Gradient allreduce over the lossy network: the baseline that fails (Paper A, slide 6).

Gradients are averaged with the same lossy reduce-scatter / robust average / all-gather as RPS
(:mod:`.blockwise`). A worker that misses the averaged gradient of a block applies its own local
gradient for that block. Replicas then drift apart and nothing re-synchronises them: the error
accumulates step after step, so training degrades even at 95-99% arrival.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from ..transport import Transport
from .blockwise import average_tensors


def lossy_allreduce(tensors: Iterable[torch.Tensor], transport: Transport,
                    num_servers: Optional[int] = None) -> List[torch.Tensor]:
    """Average ``tensors`` (e.g. gradients) across ranks over the lossy transport, in place.

    At p = 0 this equals ``hvd.allreduce(op=Average)`` up to float rounding. Returns ``tensors``.
    """
    return average_tensors(list(tensors), transport, num_servers, "lossy_allreduce.tensors")
