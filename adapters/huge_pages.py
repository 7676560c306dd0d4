"""Zeroed host tensors on transparent huge pages (Linux), for the large stores that kernels read
in page-sized runs at scattered places: the adapter page store and the KV cache.

With 4 KiB pages, every 4 KiB of such a run costs a TLB miss; with 2 MiB pages almost none do.
The kernel's decode LoRA pass over one step's adapter pages runs about 5% faster on them
(BENCHMARKS.md). The memory is advised (``madvise(MADV_HUGEPAGE)``) before its first touch, so
that the kernel maps it in 2 MiB pages as it is zeroed. Where that is not possible (another OS,
a device tensor, a small one, THP disabled) the result is an ordinary zeroed tensor. Many stores,
each under 2 MiB, go on huge pages as views of one arena (``zeros_many``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def zeros_many(shapes: list[tuple[int, ...]], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Zeroed tensors of ``shapes``, as views of one ``zeros`` arena on the host (each starting on
    a 64-byte boundary), so that tensors under 2 MiB, and the tails of larger ones, are on huge
    pages too: advised one by one, the default model's 120 page stores had 58% of their bytes on
    them. Separate tensors on a device, where the arena would buy nothing."""
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    align = max(1, 64 // dtype.itemsize)
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += -(-math.prod(shape) // align) * align
    arena = zeros((total,), dtype, device)
    return [arena[o : o + math.prod(shape)].view(shape) for o, shape in zip(offsets, shapes, strict=True)]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``, on huge pages when it is a host tensor
    of at least one huge page. The result is a view that starts on a 2 MiB boundary; the padding
    before it is never touched, so it costs address space, not memory."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if device.type != "cpu" or nbytes < HUGE_PAGE or madvise is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    region = raw[start : start + nbytes]
    madvise(region.data_ptr(), nbytes - nbytes % HUGE_PAGE, MADV_HUGEPAGE)  # advice only: failure is harmless
    return region.view(dtype).view(shape).zero_()
