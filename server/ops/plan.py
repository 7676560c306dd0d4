"""Batch metadata for the low-rank ops, built once per engine step and shared by every layer.

Adapter weights live in a page store per (layer, module): ``a_store[page] = A[k, :]`` and
``b_store[page] = s * B[:, k]`` for rank row ``k`` of an adapter, so an adapter of rank ``r``
owns exactly ``r`` pages (no padding to the pool's maximum rank), and its scaling ``s`` is folded
into ``b_store``.

The fast path groups the tokens that need LoRA work by rank: within a group every adapter has the
same rank, so one grouped matmul covers the whole group. Base-model tokens belong to no group and
cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankGroup:
    rank: int
    rows: torch.Tensor  # [n] token rows, ordered so that each adapter's rows are adjacent
    contiguous: bool  # rows == arange(rows[0], rows[0] + n): slice instead of gather
    group_ends: torch.Tensor  # [U] int32, cumulative row counts per adapter (grouped-mm offsets)
    pages: torch.Tensor  # [U * rank] page ids, adapter-major

    @property
    def num_rows(self) -> int:
        return self.rows.numel()


@dataclass(frozen=True)
class LoRAPlan:
    """All rank groups of one step. ``groups == ()`` means an all-base batch."""

    groups: tuple[RankGroup, ...]

    @property
    def empty(self) -> bool:
        return not self.groups


def _group(rank: int, rows: list[int], adapters: list[tuple[int, torch.Tensor]], device) -> RankGroup:
    # adapters: [(row_count, pages [rank])] in row order
    counts = torch.tensor([c for c, _ in adapters], dtype=torch.int32)
    first = rows[0]
    return RankGroup(
        rank=rank,
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        contiguous=rows == list(range(first, first + len(rows))),
        group_ends=counts.cumsum(0, dtype=torch.int32).to(device),
        pages=torch.cat([p for _, p in adapters]).to(device),
    )


def plan_segments(
    seg_starts: list[int], seg_pages: list[torch.Tensor | None], device=None
) -> LoRAPlan:
    """SGMV form: segment ``s`` covers rows ``[seg_starts[s], seg_starts[s+1])`` and uses the
    adapter whose pages are ``seg_pages[s]`` (``None``: base model, no LoRA work).

    seg_starts: [S + 1] python ints, non-decreasing; empty segments are allowed.
    """
    by_rank: dict[int, tuple[list[int], list[tuple[int, torch.Tensor]]]] = {}
    for s, pages in enumerate(seg_pages):
        lo, hi = seg_starts[s], seg_starts[s + 1]
        if pages is None or hi == lo:
            continue
        rows, adapters = by_rank.setdefault(pages.numel(), ([], []))
        rows.extend(range(lo, hi))
        adapters.append((hi - lo, pages))
    return LoRAPlan(tuple(_group(r, rows, ads, device) for r, (rows, ads) in sorted(by_rank.items())))


def plan_tokens(token_adapter: list[int], adapter_pages: list[torch.Tensor], device=None) -> LoRAPlan:
    """BGMV form: row ``i`` uses adapter ``token_adapter[i]`` (an index into ``adapter_pages``),
    or no adapter when it is ``-1``. Rows of one adapter need not be adjacent."""
    by_adapter: dict[int, list[int]] = {}
    for row, a in enumerate(token_adapter):
        if a >= 0:
            by_adapter.setdefault(a, []).append(row)
    by_rank: dict[int, tuple[list[int], list[tuple[int, torch.Tensor]]]] = {}
    for a, rows_of_a in by_adapter.items():
        pages = adapter_pages[a]
        rows, adapters = by_rank.setdefault(pages.numel(), ([], []))
        rows.extend(rows_of_a)
        adapters.append((len(rows_of_a), pages))
    return LoRAPlan(tuple(_group(r, rows, ads, device) for r, (rows, ads) in sorted(by_rank.items())))


def merge_plans(*plans: LoRAPlan) -> LoRAPlan:
    return LoRAPlan(tuple(g for p in plans for g in p.groups))
