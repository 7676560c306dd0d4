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
