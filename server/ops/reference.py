"""Pure-torch reference loops: the oracle the fast ops are tested against. Slow on purpose."""

from __future__ import annotations

import torch


def sgmv_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_store: torch.Tensor,
    b_store: torch.Tensor,
    seg_starts: list[int],
    seg_pages: list[torch.Tensor | None],
) -> None:
    """Semantics, for each segment s with pages P = seg_pages[s] (skipped when None):
        y[i] += (x[i] @ a_store[P].T) @ b_store[P]   for i in [seg_starts[s], seg_starts[s+1])

    y: [T, out], x: [T, in], a_store: [num_pages, in], b_store: [num_pages, out] (scaled).
    """
    for s, pages in enumerate(seg_pages):
        if pages is None:
            continue
        for i in range(seg_starts[s], seg_starts[s + 1]):
            y[i] += (x[i] @ a_store[pages].T) @ b_store[pages]


def bgmv_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_store: torch.Tensor,
    b_store: torch.Tensor,
    token_adapter: list[int],
    adapter_pages: list[torch.Tensor],
) -> None:
    """Semantics, for each row i with a = token_adapter[i] >= 0 and P = adapter_pages[a]:
        y[i] += (x[i] @ a_store[P].T) @ b_store[P]

    y: [T, out], x: [T, in], a_store: [num_pages, in], b_store: [num_pages, out] (scaled).
    """
    for i, a in enumerate(token_adapter):
        if a >= 0:
            pages = adapter_pages[a]
            y[i] += (x[i] @ a_store[pages].T) @ b_store[pages]


def dora_rescale_reference(y: torch.Tensor, b_store: torch.Tensor, bias: torch.Tensor | None, row_pages: dict[int, int],
                           columns: list[int]) -> None:
    """Semantics, for each row i with DoRA page p = row_pages[i] and each column c in ``columns``:
        y[i, c] = b_store[p, c] * (y[i, c] - bias[c]) + bias[c]   (bias: 0 when None)
    """
    for i, p in row_pages.items():
        for c in columns:
            b = 0.0 if bias is None else bias[c]
            y[i, c] = b_store[p, c].to(y.dtype) * (y[i, c] - b) + b
