"""DoRA's magnitude (Liu et al., 2024: weight-decomposed low-rank adaptation).

A DoRA adapter serves y = g * (x W^T + s x A^T B^T) + bias, with g = m / ||W + s B A||_row one
factor per output (adapters/loader.py ``dora_scale``). The LoRA ops add s x A^T B^T as for any
adapter; then the rows of DoRA adapters are rescaled: by this op in the torch and Triton backends,
inside the C++ kernel as it writes each row (csrc ``dora_row``, the same arithmetic). g lives in
the adapter's magnitude page of the b_store, so it pages in and out with the adapter.
"""

from __future__ import annotations

import torch


def used_columns(bounds: tuple[int, ...], used: tuple[int, ...]) -> list[tuple[int, int]]:
    """The output columns of the kinds in ``used`` (indices into a fused linear's kinds, ascending),
    as [lo, hi) runs, adjacent kinds merged: q|k|v all used is one run, q and v two."""
    runs: list[tuple[int, int]] = []
    for j in used:
        lo, hi = bounds[j], bounds[j + 1]
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def dora_rescale(y: torch.Tensor, b_store: torch.Tensor, bias: torch.Tensor | None,
                 runs: tuple[tuple[int, int, int | torch.Tensor], ...], columns: list[tuple[int, int]]) -> None:
    """In place, for each run (lo, hi, page) of rows and each column c in ``columns``' runs:
        y[i, c] = g[i, c] * (y[i, c] - bias[c]) + bias[c]   for lo <= i < hi
    computed as y * g + bias * (1 - g), where y[i] already holds x W^T + bias + s x A^T B^T
    (bias: 0 when None) and g = b_store[page] for a prefill chunk (one page, an int: broadcast
    over its rows, nothing gathered), or b_store[page[i - lo]] for decode rows (a [hi - lo] tensor).

    y: [T, O]; b_store: [P, O] (any float dtype: it widens as it multiplies); bias: [O] or None.
    """
    for lo, hi, page in runs:
        g = b_store[page] if isinstance(page, int) else b_store.index_select(0, page)  # [O] or [n, O]
        for c0, c1 in columns:
            view, gc = y[lo:hi, c0:c1], g[..., c0:c1]
            view.mul_(gc)
            if bias is not None:
                bc = bias[c0:c1]
                view.add_(bc - bc * gc)
