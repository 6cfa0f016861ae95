"""Tensor fusion: many tensors travel as one flat host buffer, as in Horovod's fusion buffer.

A model with hundreds of parameter tensors then costs one exchange per dtype, not hundreds.
CUDA tensors are fused on their GPU when the MPI is CUDA-aware (``device_buffers``), and staged
through a pinned host buffer otherwise.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch

from ..errors import ConfigError


def wire(flat: torch.Tensor):
    """What the transport moves: a NumPy view of a contiguous 1-D CPU tensor (bfloat16 as raw
    int16), or a device tensor itself (for a CUDA-aware MPI)."""
    if flat.device.type != "cpu":
        return flat
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy()
    return flat.numpy()


def from_wire(array, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`wire` (a view, no copy)."""
    if isinstance(array, torch.Tensor):
        return array
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class FusedGroup:
    """Tensors of one dtype and device, flattened into one contiguous buffer ``flat``: on the
    host (pinned for CUDA tensors), or on the tensors' GPU with ``device_buffers``."""

    def __init__(self, tensors: List[torch.Tensor], device_buffers: bool = False):
        self.tensors = tensors
        self.dtype = tensors[0].dtype
        staged = tensors[0].is_cuda and not device_buffers
        # One contiguous tensor where the transport can read it is its own fusion buffer.
        self.aliased = len(tensors) == 1 and not staged and tensors[0].is_contiguous()
        if self.aliased:
            self.flat = tensors[0].detach().view(-1)
            return
        total = sum(t.numel() for t in tensors)
        self.flat = torch.empty(total, dtype=self.dtype, device="cpu" if staged else tensors[0].device,
                                pin_memory=staged)
        self.load()

    def load(self) -> None:
        """Copy the tensors' current values into ``flat``."""
        if self.aliased:
            return
        offset = 0
        for t in self.tensors:
            k = t.numel()
            self.flat[offset:offset + k].copy_(t.detach().reshape(-1), non_blocking=False)
            offset += k

    def store(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` back into the tensors, in place."""
        if self.aliased and flat.data_ptr() == self.flat.data_ptr():
            return
        offset = 0
        for t in self.tensors:
            k = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset:offset + k].view_as(t))
            offset += k


def fuse(tensors: Iterable[torch.Tensor], what: str = "tensors", device_buffers: bool = False) -> List[FusedGroup]:
    """Group floating-point ``tensors`` by (dtype, device) into :class:`FusedGroup` s; CUDA
    tensors are fused on their GPU with ``device_buffers`` (a CUDA-aware MPI), else staged."""
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = OrderedDict()
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ConfigError(f"{what}[{i}]", getattr(t, "dtype", type(t).__name__),
                              "a floating-point torch.Tensor (float16, bfloat16, float32, float64)")
        groups.setdefault((t.dtype, t.device), []).append(t)
    return [FusedGroup(ts, device_buffers) for ts in groups.values() if sum(t.numel() for t in ts) > 0]
