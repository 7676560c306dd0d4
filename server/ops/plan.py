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

import array
from dataclasses import dataclass, replace
from functools import cached_property

import torch


@dataclass(frozen=True)
class RankGroup:
    """Rows that use adapters of one rank, in one of two forms:

    - segments (SGMV): ``rows`` ordered so that each adapter's rows are adjacent, ``pages``
      [U * rank] adapter-major, ``group_ends`` [U] int32 cumulative row counts per adapter;
    - per-row (BGMV): ``rows`` ascending, ``pages`` [n * rank] row-major (each row's adapter
      pages), ``group_ends`` None.
    """

    rank: int
    rows: torch.Tensor  # [n] token rows
    row_start: int | None  # rows == arange(row_start, row_start + n): slice instead of gather
    pages: torch.Tensor
    group_ends: torch.Tensor | None
    max_rows_per_adapter: int = 1  # longest segment (SGMV), known on the host for kernel grids

    @property
    def num_rows(self) -> int:
        return self.rows.numel()

    @cached_property
    def row_offsets(self) -> torch.Tensor:
        """[n] start of each row's pages in ``pages`` (per-row form); computed once per step."""
        return torch.arange(0, self.pages.numel(), self.rank, device=self.pages.device)

    def to(self, device) -> RankGroup:
        ends = None if self.group_ends is None else self.group_ends.to(device)
        return replace(self, rows=self.rows.to(device), pages=self.pages.to(device), group_ends=ends)


@dataclass(frozen=True)
class MagnitudeRuns:
    """The rows of DoRA adapters in runs of adjacent rows (lo, hi, page), ``page`` the magnitude
    page (ops/dora.py) of a prefill chunk's adapter (an int), or of each decode row's ([hi - lo])."""

    runs: tuple[tuple[int, int, int | torch.Tensor], ...]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [p for _, _, p in self.runs if isinstance(p, torch.Tensor)]

    def with_tensors(self, tensors) -> MagnitudeRuns:
        """The same runs, their page tensors replaced in order by ``tensors`` (moved elsewhere)."""
        it = iter(tensors)
        return MagnitudeRuns(tuple((lo, hi, next(it) if isinstance(p, torch.Tensor) else p) for lo, hi, p in self.runs))

    def to(self, device) -> MagnitudeRuns:
        return self.with_tensors(t.to(device) for t in self.tensors)

    @cached_property
    def row_pages(self) -> torch.Tensor:
        """[last row + 1] int64 on the host: each row's magnitude page, -1 for rows of no DoRA
        adapter (the C++ kernel's form); built once per step."""
        out = torch.full((max(hi for _, hi, _ in self.runs),), -1, dtype=torch.long)
        for lo, hi, page in self.runs:
            out[lo:hi] = page
        return out


@dataclass(frozen=True)
class LoRAPlan:
    """All rank groups of one step. ``groups == ()`` means an all-base batch. ``magnitude``: the
    rows among them whose adapters are DoRA adapters, rescaled once their deltas are in."""

    groups: tuple[RankGroup, ...]
    magnitude: MagnitudeRuns | None = None

    @property
    def empty(self) -> bool:
        return not self.groups

    def to(self, device) -> LoRAPlan:
        return LoRAPlan(tuple(g.to(device) for g in self.groups),
                        None if self.magnitude is None else self.magnitude.to(device))

    @cached_property
    def per_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows of every per-row (BGMV) group as one list, whatever their ranks: (rows [n], starts
        [n + 1], pages [starts[n]]), row i's pages pages[starts[i]:starts[i + 1]] (the C++
        ``linear_lora``'s form); None without such a group. Built once per step: the step's layers
        share its plans."""
        groups = [g for g in self.groups if g.group_ends is None]
        if not groups:
            return None
        rows = torch.cat([g.rows for g in groups])
        sizes = torch.cat([torch.full((g.num_rows,), g.rank, dtype=torch.long) for g in groups])
        starts = torch.zeros(rows.numel() + 1, dtype=torch.long)
        torch.cumsum(sizes, 0, out=starts[1:])
        return rows, starts, torch.cat([g.pages for g in groups])

    @cached_property
    def segments(self) -> tuple[RankGroup, ...]:
        """The segment (SGMV) groups: prefill rows, which ``linear_lora`` leaves to ``lora``."""
        return tuple(g for g in self.groups if g.group_ends is not None)


# The LoRA work of one step, per fused linear (keyed by its kinds, e.g. ("q_proj", "k_proj",
# "v_proj")): one (used, plan) entry per set of those kinds that the step's adapters target, where
# ``used`` holds the indices of the kinds in the key and ``plan`` the rows and pages of the adapters
# targeting exactly those. A fused linear absent from the dict has no LoRA work this step.
LoRAPlans = dict[tuple[str, ...], tuple[tuple[tuple[int, ...], LoRAPlan], ...]]


def longs(values) -> torch.Tensor:
    """A host int64 tensor of ``values`` (ints): through ``array``'s C conversion, 3-4x faster than
    ``torch.tensor`` on a list, which the step metadata of every engine step goes through."""
    flat = array.array("q", values)
    return torch.frombuffer(flat, dtype=torch.long) if flat else torch.empty(0, dtype=torch.long)


def upload(tensors: list[torch.Tensor], device, pin: bool = True) -> list[torch.Tensor]:
    """Host integer tensors -> the same values on ``device`` in one host-to-device copy: packed as
    int64 into one buffer (pinned, so the copy is asynchronous and the host never waits), then
    viewed back apart on the device, each cast back to its own dtype there."""
    sizes = [t.numel() for t in tensors]
    flat = torch.empty(sum(sizes), dtype=torch.long, pin_memory=pin)
    at = 0
    for t, n in zip(tensors, sizes, strict=True):
        flat[at : at + n].copy_(t.reshape(-1))
        at += n
    flat = flat.to(device, non_blocking=pin)
    out, at = [], 0
    for t, n in zip(tensors, sizes, strict=True):
        view = flat[at : at + n].view(t.shape)
        out.append(view if t.dtype == torch.long else view.to(t.dtype))
        at += n
    return out


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host-built step metadata onto ``device`` without a host synchronisation: on CUDA through
    pinned memory and an asynchronous copy (a copy from pageable memory waits for the stream)."""
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def _group(rank: int, rows: list[int], pages: list[torch.Tensor], counts: list[int] | None, device) -> RankGroup:
    first = rows[0]
    return RankGroup(
        rank=rank,
        rows=to_device(longs(rows), device),
        row_start=first if rows == list(range(first, first + len(rows))) else None,
        pages=to_device(torch.cat(pages), device),
        group_ends=None if counts is None else to_device(longs(counts).cumsum(0, dtype=torch.int32), device),
        max_rows_per_adapter=1 if counts is None else max(counts),
    )


def plan_segments(
    seg_starts: list[int], seg_pages: list[torch.Tensor | None], device=None
) -> LoRAPlan:
    """SGMV form: segment ``s`` covers rows ``[seg_starts[s], seg_starts[s+1])`` and uses the
    adapter whose pages are ``seg_pages[s]`` (``None``: base model, no LoRA work).

    seg_starts: [S + 1] python ints, non-decreasing; empty segments are allowed.
    """
    by_rank: dict[int, tuple[list[int], list[torch.Tensor], list[int]]] = {}
    for s, pages in enumerate(seg_pages):
        lo, hi = seg_starts[s], seg_starts[s + 1]
        if pages is None or hi == lo:
            continue
        rows, group_pages, counts = by_rank.setdefault(pages.numel(), ([], [], []))
        rows.extend(range(lo, hi))
        group_pages.append(pages)
        counts.append(hi - lo)
    return LoRAPlan(tuple(_group(r, *g, device) for r, g in sorted(by_rank.items())))


def plan_tokens(token_adapter: list[int], adapter_pages: list[torch.Tensor], device=None) -> LoRAPlan:
    """BGMV form: row ``i`` uses adapter ``token_adapter[i]`` (an index into ``adapter_pages``),
    or no adapter when it is ``-1``. Rows of one adapter need not be adjacent."""
    by_rank: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for row, a in enumerate(token_adapter):
        if a >= 0:
            pages = adapter_pages[a]
            rows, row_pages = by_rank.setdefault(pages.numel(), ([], []))
            rows.append(row)
            row_pages.append(pages)
    return LoRAPlan(tuple(_group(r, rows, pages, None, device) for r, (rows, pages) in sorted(by_rank.items())))


def merge_plans(*plans: LoRAPlan) -> LoRAPlan:
    return LoRAPlan(tuple(g for p in plans for g in p.groups))
