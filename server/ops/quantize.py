"""Weight-only int8 base projections (``--quantization int8``).

Each output row o of a weight W [out, in] keeps int8 values and one float32 scale:
    s[o]    = max_i |W[o, i]| / 127          (1 for a row of zeros)
    q[o, i] = round(W[o, i] / s[o])           in [-127, 127], half to even
so that the served weight is Ŵ = q * s[:, None], with |W - Ŵ| <= s / 2 value by value, and
    y = x @ Ŵ.T + b                          x: [T, in] -> y: [T, out]
Activations stay in the model's dtype: only the weights' bytes shrink (4x from float32), which is
what a decode step of few rows reads. On a CPU with the C++ kernels, 1 to DECODE_ROWS float32
rows, and prefill steps of the counts where the float32 projections take the kernel, run
``few_rows_linear`` on the int8 rows, widening each value to q * s (the same float32 product as
Ŵ's) before the sums; other shapes and devices multiply by Ŵ built for the call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F

from .linear import DECODE_ROWS

QMAX = 127  # symmetric: -128 is never used, so that -q is always a value

# int8_linear(x [T, in], q [out, in] int8, scale [out] float32, bias [out] | None) -> [T, out]
Int8Linear = Callable[..., torch.Tensor]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] int8, scale [out] float32) of ``weight`` [out, in], row by row (above); computed
    in float32 whatever the weight's dtype. A non-finite weight is refused: it has no scale."""
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("a weight to quantize holds a non-finite value (NaN or Inf): the model is damaged")
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ = q * scale[:, None] [out, in], multiplied in float32, in ``dtype``."""
    return (q.float() * scale[:, None]).to(dtype)


def select_int8_linear(kernels, rows: Collection[int] = ()) -> Int8Linear:
    """The int8 projection: the kernel's ``few_rows_linear`` where it applies (``kernels``: loaded,
    on a CPU host, else None; float32 x of 1 to DECODE_ROWS rows, or of ``rows``: the counts where
    the float32 projections' tiles beat torch's matmul, which for int8 weights would also
    dequantize them first), else ``F.linear`` by Ŵ in x's dtype."""
    kernel = None if kernels is None else kernels.few_rows_linear
    no_bias = torch.empty(0)
    rows = frozenset(rows)

    def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        if kernel is not None and x.dtype == torch.float32 and (1 <= x.shape[0] <= DECODE_ROWS or x.shape[0] in rows):
            return kernel(x if x.stride(1) == 1 else x.contiguous(), q, no_bias if bias is None else bias, scale)
        return F.linear(x, dequantize_int8(q, scale, x.dtype), bias)

    return int8_linear
