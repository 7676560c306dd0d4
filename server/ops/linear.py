"""The base model's projections: ``F.linear``, or on a CPU with the C++ kernels and a float32
model, the kernel's few-row path (``few_rows_linear``: each weight row streamed once against every
row of x, with the rows ahead prefetched) for 3 to 14 rows. From DRAM, torch's GEMM reads the
weights at half its one-row speed at 4 to 14 rows, and decode steps ran 1.2-1.3x faster with the
kernel (BENCHMARKS.md). At one or two rows torch's GEMV is as fast, and from 16 rows on its GEMM
takes a faster path."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FEW_ROWS = range(3, 15)  # the rows the kernel is sent (it takes up to 16)

Linear = Callable[..., torch.Tensor]  # linear(x [T, in], weight [out, in], bias [out] | None) -> [T, out]


def select_base_linear(device, dtype: torch.dtype, kernels) -> Linear:
    """``F.linear``, unless ``kernels`` (``cpu_kernel.load_kernels()``) serve a float32 model on
    the CPU: then F.linear with the kernel's path for FEW_ROWS rows (the same y, to float32
    rounding)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or kernels is None:
        return F.linear
    kernel, no_bias = kernels.few_rows_linear, torch.empty(0)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] in FEW_ROWS and x.dtype == torch.float32 and weight.stride(1) == 1:
            return kernel(x if x.stride(1) == 1 else x.contiguous(), weight, no_bias if bias is None else bias)
        return F.linear(x, weight, bias)

    return linear
