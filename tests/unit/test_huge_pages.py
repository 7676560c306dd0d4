"""Host stores on transparent huge pages: the same zeroed tensor torch.zeros gives, starting on a
2 MiB boundary when it is large enough to be advised."""

import sys

import pytest
import torch

from loramux.adapters import huge_pages


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((512, 3, 576), torch.float32),
                                         ((700, 1536), torch.bfloat16), ((2 << 20,), torch.uint8)])
def test_zeros_is_a_writable_zeroed_tensor_of_the_shape_and_dtype(shape, dtype):
    t = huge_pages.zeros(shape, dtype, "cpu")
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert not t.any()
    t.view(-1)[-1] = 1  # the whole extent is ours: the last element is writable
    assert t.sum().item() == 1
    large = t.numel() * t.element_size() >= huge_pages.HUGE_PAGE
    if large and sys.platform.startswith("linux"):
        assert t.data_ptr() % huge_pages.HUGE_PAGE == 0


def test_small_tensors_are_plain_allocations():
    t = huge_pages.zeros((4, 4), torch.float32, "cpu")
    assert t.untyped_storage().nbytes() == 64  # no 2 MiB of padding for a small tensor


def test_stores_of_the_pool_and_kv_cache_use_it():
    from loramux.server.kv_cache import PagedKVCache

    kv = PagedKVCache(1, 64, 16, 8, 64, torch.float32, "cpu")  # 65 * 16 * 8 * 64 * 4 bytes: above 2 MiB
    if sys.platform.startswith("linux"):
        assert kv.k[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    kv.write(0, torch.tensor([3]), torch.ones(1, 8, 64), torch.ones(1, 8, 64))
    assert kv.k[0].view(-1, 8, 64)[3].eq(1).all() and kv.k[0].sum().item() == 8 * 64


def test_zeros_many_gives_disjoint_zeroed_views_of_one_arena():
    shapes = [(3, 5), (512, 3, 576), (7,), (700, 3)]
    ts = huge_pages.zeros_many(shapes, torch.float32, "cpu")
    assert [t.shape for t in ts] == [torch.Size(s) for s in shapes]
    assert all(t.is_contiguous() and t.data_ptr() % 64 == 0 and not t.any() for t in ts)
    assert len({t.untyped_storage().data_ptr() for t in ts}) == 1  # one allocation
    for i, t in enumerate(ts):  # disjoint: writing one leaves the others zero
        t.fill_(i + 1)
    assert [t.unique().tolist() for t in ts] == [[1.0], [2.0], [3.0], [4.0]]
    if sys.platform.startswith("linux"):
        assert ts[0].data_ptr() % huge_pages.HUGE_PAGE == 0


def test_a_pools_stores_share_one_arena():
    from loramux.adapters.device_pool import DevicePool
    from loramux.adapters.loader import LoRALayout

    shapes = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
    layout = LoRALayout(modules={f"{i}.{k}": (i, k) for i in range(2) for k in shapes}, shapes=shapes, num_layers=2,
                        fused=(("q_proj", "v_proj"),))
    pool = DevicePool(layout, 40, torch.float32, "cpu")
    stores = [t for pair in pool.fused_stores.values() for t in pair]
    assert len(stores) == 8 and len({t.untyped_storage().data_ptr() for t in stores}) == 1
    assert not any(t.any() for t in stores)


def test_interleaved_stores_hold_a_pages_a_and_b_rows_in_one_row_of_memory():
    """interleave: store p's A rows then its B row, each from a 64-byte boundary (q|v's A rows are
    24 floats, padded to 32), every store disjoint and zero, all in one arena."""
    from loramux.adapters.device_pool import DevicePool
    from loramux.adapters.loader import LoRALayout

    shapes = {"q_proj": (12, 8), "v_proj": (12, 4), "down_proj": (8, 12)}
    layout = LoRALayout(modules={f"{i}.{k}": (i, k) for i in range(2) for k in shapes}, shapes=shapes, num_layers=2,
                        fused=(("q_proj", "v_proj"),))
    pool = DevicePool(layout, 40, torch.float32, "cpu", interleave=True)
    a, b = pool.fused_stores[(0, ("q_proj", "v_proj"))]
    assert a.shape == (41, 2, 12) and b.shape == (41, 12)
    assert a.stride() == (32 + 16, 12, 1) and b.stride() == (48, 1) and b.data_ptr() - a.data_ptr() == 32 * 4
    assert all(t.data_ptr() % 64 == 0 for pair in pool.fused_stores.values() for t in (pair[0][1], pair[1][1]))
    stores = [t for pair in pool.fused_stores.values() for t in pair]
    assert len({t.untyped_storage().data_ptr() for t in stores}) == 1 and not any(t.any() for t in stores)
    for i, t in enumerate(stores):
        t.fill_(i + 1)
    assert [t.unique().tolist() for t in stores] == [[float(i + 1)] for i in range(len(stores))]
    assert pool.page_bytes == 2 * 4 * (2 * 12 + 12 + 12 + 8)
