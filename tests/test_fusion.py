"""Tensor fusion in one process: copies in and out, and tensors laid out by ``pack`` that fuse
without any copy."""
import numpy as np
import pytest
import torch

from hvd_unreliable.algorithms.fusion import fuse, pack, wire
from hvd_unreliable.errors import ConfigError


def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g).double(),
            torch.randn(4, generator=g)]


def roundtrip(ts):
    """Fuse, change every element through the fused buffers, write back; returns the groups."""
    groups = fuse(ts)
    for group in groups:
        group.flat.mul_(-2)
        group.store()
    return groups


def test_fused_groups_copy_in_and_out_per_dtype():
    ts = tensors()
    before = [t.clone() for t in ts]
    groups = roundtrip(ts)
    # float32: three tensors copied into a fusion buffer; float64: one tensor, its own buffer
    assert [(g.dtype, g.aliased, g.flat.numel()) for g in groups] == [(torch.float32, False, 26), (torch.float64, True, 8)]
    assert all(torch.equal(t, -2 * b) for t, b in zip(ts, before))


def test_packed_tensors_are_their_own_fusion_buffer():
    ts = tensors()
    before = [t.clone() for t in ts]
    pack(ts)
    assert all(torch.equal(t, b) for t, b in zip(ts, before))  # values kept
    assert ts[1].data_ptr() == ts[0].data_ptr() + 15 * 4 and ts[3].data_ptr() == ts[1].data_ptr() + 7 * 4
    groups = roundtrip(ts)
    assert [g.aliased for g in groups] == [True, True]
    assert groups[0].flat.data_ptr() == ts[0].data_ptr()
    assert all(torch.equal(t, -2 * b) for t, b in zip(ts, before))


@pytest.mark.parametrize("case", ["reordered", "non-contiguous", "adjacent allocations"])
def test_tensors_not_laid_out_by_pack_are_copied_and_still_right(case):
    ts = tensors()[:2] + [tensors()[3]]
    pack(ts)
    if case == "reordered":
        ts = [ts[1], ts[0], ts[2]]
    elif case == "non-contiguous":
        ts[0] = ts[0].t()
    else:  # neighbours in memory, but separate tensors over separate storages
        memory = np.arange(12, dtype=np.float32)
        ts = [torch.from_numpy(memory[:5]), torch.from_numpy(memory[5:])]
        assert ts[1].data_ptr() == ts[0].data_ptr() + 20
    before = [t.clone() for t in ts]
    groups = roundtrip(ts)
    assert not groups[0].aliased
    assert all(torch.equal(t, -2 * b) for t, b in zip(ts, before))


def test_fusing_again_into_the_same_buffer_is_right_for_new_tensors_and_other_shapes():
    # fresh tensors of the same shapes (new gradients every step), other shapes of the same total
    # (the same fusion buffer, cut otherwise), then the first shapes again; leaf tensors that
    # require grad (parameters) are written in place
    g = torch.Generator().manual_seed(1)
    for shapes in ([(3, 5), (7,), (4,)], [(3, 5), (7,), (4,)], [(2, 6), (14,)], [(13,), (13,)], [(3, 5), (7,), (4,)]):
        ts = [torch.randn(shape, generator=g).requires_grad_() for shape in shapes]
        before = [t.detach().clone() for t in ts]
        groups = roundtrip(ts)
        assert len(groups) == 1 and not groups[0].aliased and groups[0].flat.numel() == 26
        assert all(torch.equal(t.detach(), -2 * b) for t, b in zip(ts, before)), shapes


def test_a_packed_list_found_again_is_rechecked_by_address_and_dtype():
    ts = tensors()[:2] + [tensors()[3]]  # float32
    pack(ts)
    group = fuse(ts)[0]
    assert fuse(list(ts))[0] is group  # the same tensors where they were: the group found last time
    ts[1].data = ts[1].data.clone()  # re-pointed elsewhere: copied again, and still right
    before = [t.clone() for t in ts]
    groups = roundtrip(ts)
    assert not groups[0].aliased and all(torch.equal(t, -2 * b) for t, b in zip(ts, before))
    pack(ts)
    assert fuse(ts)[0].aliased
    ts[0].data = ts[0].data.view(torch.int32)  # the same address, another dtype: refused, as a new list would be
    with pytest.raises(ConfigError, match=r"params\[0\]=torch.int32 .*floating-point"):
        fuse(ts, "params")


def test_only_floating_point_tensors_fuse():
    with pytest.raises(ConfigError, match=r"params\[1\]=torch.int64 .*floating-point"):
        fuse([torch.zeros(2), torch.zeros(2, dtype=torch.int64)], "params")


def test_wire_views_bfloat16_as_raw_words():
    x = torch.randn(16, dtype=torch.bfloat16)
    view = wire(x)
    assert view.dtype == np.int16 and view.ctypes.data == x.data_ptr()
    assert torch.equal(torch.from_numpy(view).view(torch.bfloat16), x)
