"""The base model's projections: ``F.linear``, or on a CPU with the C++ kernels and a float32
model, the kernel's few-row path (``few_rows_linear``: each weight row streamed once against every
row of x, with the rows ahead prefetched) for the row counts where it beat torch. From DRAM,
torch's GEMM reads the weights at half its one-row speed at 4 to 14 rows; the AVX-512 build ran
decode steps there 1.2-1.3x faster (BENCHMARKS.md). At one to three rows torch's GEMV is as fast,
and from 16 rows on its GEMM takes a faster path. The AVX2 build runs out of vector registers
past eight rows, and the baseline build (SSE2) is slower than torch at every count."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# the rows each kernel build is sent (it takes up to 16): where it ran faster than torch
FEW_ROWS = {"avx512": range(4, 15), "avx2": range(4, 9)}

Linear = Callable[..., torch.Tensor]  # linear(x [T, in], weight [out, in], bias [out] | None) -> [T, out]


def select_base_linear(device, dtype: torch.dtype, kernels) -> Linear:
    """``F.linear``, unless ``kernels`` (``cpu_kernel.load_kernels()``) of a build in FEW_ROWS
    serve a float32 model on the CPU: then F.linear with the kernel's path for that build's row
    counts (the same y, to float32 rounding)."""
    rows = None if kernels is None else FEW_ROWS.get(kernels.variant)
    if torch.device(device).type != "cpu" or dtype != torch.float32 or rows is None:
        return F.linear
    kernel, no_bias = kernels.few_rows_linear, torch.empty(0)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] in rows and x.dtype == torch.float32 and weight.stride(1) == 1:
            return kernel(x if x.stride(1) == 1 else x.contiguous(), weight, no_bias if bias is None else bias)
        return F.linear(x, weight, bias)

    return linear
