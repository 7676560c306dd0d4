"""DoRA's magnitude (Liu et al., 2024: weight-decomposed low-rank adaptation), for any backend.

A DoRA adapter serves y = g * (x W^T + s x A^T B^T) + bias, with g = m / ||W + s B A||_row one
factor per output (adapters/loader.py ``dora_scale``). The LoRA ops add s x A^T B^T as for any
adapter; this op then rescales the rows of DoRA adapters. g lives in the adapter's magnitude page
of the b_store, so it pages in and out with the adapter.
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


def dora_rescale(y: torch.Tensor, b_store: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                 pages: torch.Tensor, columns: list[tuple[int, int]]) -> None:
    """In place, for each row i of ``rows`` and each column c in ``columns``' runs:
        y[i, c] = g * (y[i, c] - bias[c]) + bias[c],   g = b_store[pages[i], c]
    where y[i] already holds x W^T + bias + s x A^T B^T (bias: 0 when None).

    y: [T, O]; b_store: [P, O] (any float dtype; g is cast to y's); bias: [O] or None;
    rows, pages: [n] long, on y's device.
    """
    g_all = b_store.index_select(0, pages)
    picked = y.index_select(0, rows)
    for lo, hi in columns:
        sub, g = picked[:, lo:hi], g_all[:, lo:hi].to(y.dtype)
        if bias is None:
            sub.mul_(g)
        else:
            b = bias[lo:hi]
            sub.sub_(b).mul_(g).add_(b)
    y.index_copy_(0, rows, picked)
