"""Tensor fusion: many tensors travel as one flat host buffer, as in Horovod's fusion buffer.

A model with hundreds of parameter tensors then costs one exchange per dtype, not hundreds.
CUDA tensors are fused on their GPU when the MPI is CUDA-aware (``device_buffers``), and staged
through a pinned host buffer otherwise.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError


def wire(flat: torch.Tensor):
    """What the transport moves: a NumPy view of a contiguous 1-D CPU tensor (bfloat16 as raw
    int16), or a device tensor itself (for a CUDA-aware MPI)."""
    if flat.is_cuda:
        return flat
    return flat.view(torch.int16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()


def numeric(array, dtype: torch.dtype):
    """What arithmetic runs on, from (a slice of) a :func:`wire` view of ``dtype`` data: the
    NumPy array or the device tensor itself, except bfloat16's raw int16 words, viewed as
    bfloat16 again (a torch tensor: NumPy has no bfloat16). A view, no copy."""
    if dtype == torch.bfloat16 and isinstance(array, np.ndarray):
        return torch.from_numpy(array).view(torch.bfloat16)
    return array


_workspace: Dict[tuple, torch.Tensor] = {}


def workspace(name: str, count: int, dtype: torch.dtype, device, pin: bool = False) -> torch.Tensor:
    """A 1-D buffer of ``count`` elements reused from call to call under ``name``.

    Training repeats the same shapes every step; a fresh buffer of several megabytes would be
    page-faulted in (or, pinned, registered with the driver) on every call. Each name keeps one
    buffer per dtype and device, grown when a larger one is asked for; callers must be done with
    a buffer before asking for the same name again.
    """
    key = (name, dtype, device, pin)
    buf = _workspace.get(key)
    if buf is None or buf.numel() < count:
        buf = _workspace[key] = torch.empty(count, dtype=dtype, device=device, pin_memory=pin)
    return buf if buf.numel() == count else buf[:count]  # a tensor slice costs a microsecond


class FusedGroup:
    """Tensors of one dtype and device, flattened into one contiguous buffer ``flat``: on the
    host (pinned for CUDA tensors), or on the tensors' GPU with ``device_buffers``.

    ``flat`` is a :func:`workspace` buffer: valid until the next group of the same dtype and
    device is fused. Tensors that already lie back to back in one buffer where the transport can
    read it (one contiguous tensor, or tensors laid out by :func:`pack`) are their own ``flat``:
    no copy in, no copy out.
    """

    def __init__(self, tensors: List[torch.Tensor], device_buffers: bool = False,
                 packed: Optional[torch.Tensor] = None):
        self.tensors = tensors
        self.dtype = tensors[0].dtype
        self.staged = tensors[0].is_cuda and not device_buffers
        if packed is None and not self.staged:
            packed = _packed_view(tensors)
        self.aliased = packed is not None
        if self.aliased:
            self.flat = packed
            return
        self.sizes = [t.numel() for t in tensors]
        self.flat = workspace(f"fusion:{tensors[0].device}", sum(self.sizes), self.dtype,
                              "cpu" if self.staged else tensors[0].device, pin=self.staged)
        self.load()

    def load(self) -> None:
        """Copy the tensors' current values into ``flat`` (one multi-tensor copy; staged: one
        concatenation on the GPU, then one transfer)."""
        if self.aliased:
            return
        with torch.no_grad():
            if self.staged:
                self.flat.copy_(torch.cat([t.reshape(-1) for t in self.tensors]))
            else:
                torch._foreach_copy_(_shaped_views(self.flat, self.tensors), self.tensors)

    def store(self) -> None:
        """Copy ``flat`` back into the tensors, in place (one multi-tensor copy)."""
        if self.aliased:
            return
        with torch.no_grad():
            if self.staged:
                src = self.flat.to(self.tensors[0].device, non_blocking=True)
                torch._foreach_copy_(self.tensors, [v.view_as(t) for v, t in zip(torch.split(src, self.sizes), self.tensors)])
            else:
                torch._foreach_copy_(self.tensors, _shaped_views(self.flat, self.tensors))


_views: Dict[tuple, tuple] = {}  # (buffer address, dtype) -> (shapes, views) of the last cut by _shaped_views


def _shaped_views(flat: torch.Tensor, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """``flat`` cut into consecutive views shaped like ``tensors``. Training fuses the same shapes
    into the same workspace every step: the views made last time for this buffer are handed out
    again when the shapes are those of last time (making 300 views costs more than copying
    through them; the kept views hold the buffer's memory, so no other buffer takes its address)."""
    shapes = [t.shape for t in tensors]
    key = (flat.data_ptr(), flat.dtype)
    last = _views.get(key)
    if last is not None and last[0] == shapes:
        return last[1]
    if len(_views) >= 8:  # (one buffer per dtype and device)
        _views.clear()
    views = [v.view(shape) for v, shape in zip(torch.split(flat, [t.numel() for t in tensors]), shapes)]
    _views[key] = (shapes, views)
    return views


_last_packed: list = [None]  # (tensors, their addresses, dtype, view) of the last list found packed


def _packed_view(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D view over ``tensors`` if they are tensors of one dtype lying contiguous and back to
    back in one allocation."""
    view = _known_packed(tensors)
    if view is None:
        view = _check_packed(tensors)
        if view is not None:
            _last_packed[0] = (list(tensors), [t.data_ptr() for t in tensors], view.dtype, view)
    return view


def _known_packed(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """The view found for the last list found packed, if ``tensors`` is that list still.

    Training asks again every step for the same parameters: when the list holds the same tensor
    objects at the same addresses and of the same dtype as the last list found packed, the view
    found then is handed out again (reading two attributes per tensor instead of six: a model has
    hundreds of tensors). Re-pointing a tensor's ``.data`` elsewhere changes its address; the
    kept view holds the packed memory, so nothing else can take that address meanwhile.
    """
    last = _last_packed[0]
    if (last is not None and len(tensors) == len(last[0]) and all(map(operator.is_, tensors, last[0]))
            and [t.data_ptr() for t in tensors] == last[1] and all(t.dtype is last[2] for t in tensors)):
        return last[3]
    return None


def _check_packed(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    first = tensors[0]
    dtype, item, start = first.dtype, first.element_size(), first.data_ptr()
    end = start
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.data_ptr() != end or not t.is_contiguous():
            return None
        end += t.numel() * item
    total = (end - start) // item
    if first.storage_offset() + total > first.untyped_storage().nbytes() // item:
        return None  # adjacent by chance, not one allocation
    return first.detach().as_strided((total,), (1,))


def pack(tensors: Iterable[torch.Tensor]) -> None:
    """Lay ``tensors`` (e.g. a model's parameters) out back to back, one buffer per dtype and
    device, by re-pointing each tensor's ``.data`` at its slice; values are kept.

    Fusing them afterwards (:func:`fuse`) costs no copy. Anything that later replaces a tensor's
    storage (``model.to(...)``, assigning ``.data``) only makes fusion copy again.
    """
    for ts in _by_dtype_and_device(tensors):
        if _packed_view(ts) is not None:
            continue
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        offset = 0
        for t in ts:
            t.data = flat[offset:offset + t.numel()].view_as(t)
            offset += t.numel()


_last_fused: list = [None]  # (device_buffers, group) of the last list fused that was packed


def fuse(tensors: Iterable[torch.Tensor], what: str = "tensors", device_buffers: bool = False) -> List[FusedGroup]:
    """Group floating-point ``tensors`` by (dtype, device) into :class:`FusedGroup` s; CUDA
    tensors are fused on their GPU with ``device_buffers`` (a CUDA-aware MPI), else staged."""
    tensors = list(tensors)
    last = _last_fused[0]
    if last is not None and last[0] is device_buffers and _known_packed(tensors) is last[1].flat:
        return [last[1]]  # the packed tensors fused last time, where they were: the same group
    first = tensors[0] if tensors else None
    if isinstance(first, torch.Tensor) and first.is_floating_point() and not (first.is_cuda and not device_buffers):
        whole = _packed_view(tensors)  # every tensor of the first one's dtype: all valid
        if whole is not None:  # laid out by pack(): one buffer, one dtype, one device
            if not whole.numel():
                return []
            group = FusedGroup(tensors, device_buffers, packed=whole)
            _last_fused[0] = (device_buffers, group)
            return [group]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ConfigError(f"{what}[{i}]", getattr(t, "dtype", type(t).__name__),
                              "a floating-point torch.Tensor (float16, bfloat16, float32, float64)")
    return [FusedGroup(ts, device_buffers) for ts in _by_dtype_and_device(tensors) if sum(t.numel() for t in ts) > 0]


def _by_dtype_and_device(tensors: Iterable[torch.Tensor]) -> List[List[torch.Tensor]]:
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = OrderedDict()
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())
