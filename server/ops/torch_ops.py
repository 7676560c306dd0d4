"""Fast pure-torch batched LoRA: one grouped matmul pair per rank present in the batch.

Each distinct adapter's pages are gathered once per call (not once per token), so a popular
adapter shared by many rows costs the same weight traffic as one row.
"""

from __future__ import annotations

import torch

from .plan import LoRAPlan, RankGroup

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """out[rows of group u] = x[rows of group u] @ w[u];  x: [n, k], w: [U, k, m] -> [n, m]."""
    if _HAS_GROUPED_MM and x.dtype == w.dtype:
        return torch._grouped_mm(x, w, offs=group_ends)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for u, end in enumerate(group_ends.tolist()):
        torch.matmul(x[start:end], w[u], out=out[start:end])
        start = end
    return out


def _apply_group(y: torch.Tensor, x: torch.Tensor, a_store, b_store, g: RankGroup) -> None:
    num_adapters = g.group_ends.numel()
    if g.contiguous:
        lo = int(g.rows[0])
        xs = x[lo : lo + g.num_rows]
    else:
        xs = x.index_select(0, g.rows)
    a = a_store.index_select(0, g.pages).view(num_adapters, g.rank, -1).transpose(1, 2)  # [U, in, r]
    b = b_store.index_select(0, g.pages).view(num_adapters, g.rank, -1)  # [U, r, out]
    delta = _grouped(_grouped(xs, a, g.group_ends), b, g.group_ends)  # [n, out]
    if g.contiguous:
        y[lo : lo + g.num_rows] += delta
    else:
        y.index_add_(0, g.rows, delta)


def apply_lora(y: torch.Tensor, x: torch.Tensor, a_store, b_store, plan: LoRAPlan) -> None:
    """y[i] += (x[i] @ a_store[P_i].T) @ b_store[P_i] for every row i the plan assigns pages P_i.

    y: [T, out] (updated in place), x: [T, in], a_store: [num_pages, in], b_store: [num_pages, out].
    """
    for g in plan.groups:
        _apply_group(y, x, a_store, b_store, g)


def sgmv(y, x, a_store, b_store, plan: LoRAPlan) -> None:
    """Segment form (prefill): the plan comes from ``plan_segments``; see ``sgmv_reference``."""
    apply_lora(y, x, a_store, b_store, plan)


def bgmv(y, x, a_store, b_store, plan: LoRAPlan) -> None:
    """Per-token gather form (decode): the plan comes from ``plan_tokens``; see ``bgmv_reference``."""
    apply_lora(y, x, a_store, b_store, plan)
