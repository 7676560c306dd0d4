"""Fast pure-torch batched LoRA on preallocated scratch buffers.

- Per-row groups (BGMV, decode): each row's A pages are gathered and one batched matmul gives
  ``v = x_i @ A_i.T``; the expand ``d_i = sum_j v_ij * b_store[P_ij]`` is a weighted embedding-bag
  that reads B's pages straight from the store, with no copy.
- Segment groups (SGMV, prefill): each distinct adapter's pages are gathered once, then a grouped
  matmul runs each adapter's rows against its weights.

Scratch buffers grow to the largest batch seen and are reused: a fresh multi-megabyte buffer per
call costs more in page faults than the matmul itself on a CPU.
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


class TorchLoRA:
    """``apply_lora(y, x, a_store, b_store, plan)``, holding its own scratch buffers. With a
    ``bgmv_kernel`` (the fused C++ one, ``cpu_kernel.load_bgmv()``), per-row groups on the CPU
    go to it instead of the gather/bmm/bag sequence."""

    def __init__(self, bgmv_kernel=None):
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._bgmv_kernel = bgmv_kernel

    @property
    def name(self) -> str:
        """The backend in use, as --op-backend names it."""
        return "torch" if self._bgmv_kernel is None else "cpp"

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        key = (name, like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._scratch[key] = buf
        return buf[:numel].view(shape)

    def _gather(self, name: str, store: torch.Tensor, pages: torch.Tensor, lead: int, rank: int) -> torch.Tensor:
        out = self._buffer(name, (pages.numel(), store.shape[1]), store)
        torch.index_select(store, 0, pages, out=out)
        return out.view(lead, rank, store.shape[1])

    def _apply_group(self, y, x, a_store, b_store, g: RankGroup) -> None:
        if g.group_ends is None and self._bgmv_kernel is not None and x.device.type == "cpu":
            self._bgmv_kernel(y, x, a_store, b_store, g.rows, g.pages, g.rank)
            return
        n, lo = g.num_rows, g.row_start
        xs = x[lo : lo + n] if lo is not None else x.index_select(0, g.rows)
        if g.group_ends is None:  # BGMV: one adapter per row
            a = self._gather("a", a_store, g.pages, n, g.rank)  # [n, r, in]
            v = torch.bmm(xs[:, None, :], a.transpose(1, 2), out=self._buffer("v", (n, 1, g.rank), x))  # [n, 1, r]
            # torch.embedding_bag, not F.embedding_bag: this runs 200+ times a step, and the functional
            # wrapper's checks and offsets cost more than the bag itself at decode sizes
            delta = torch.embedding_bag(b_store, g.pages, g.row_offsets, False, 0, False, v.view(-1))[0]  # [n, out]
        else:  # SGMV: one adapter per run of rows
            num_adapters = g.group_ends.numel()
            a = self._gather("a", a_store, g.pages, num_adapters, g.rank).transpose(1, 2)  # [U, in, r]
            b = self._gather("b", b_store, g.pages, num_adapters, g.rank)  # [U, r, out]
            delta = _grouped(_grouped(xs, a, g.group_ends), b, g.group_ends)  # [n, out]
        if lo is not None:
            y[lo : lo + n].add_(delta)  # not ``+=``: that writes the slice back with a second copy
        else:
            y.index_add_(0, g.rows, delta)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a_store, b_store, plan: LoRAPlan) -> None:
        """y[i] += (x[i] @ a_store[P_i].T) @ b_store[P_i] for every row i the plan assigns pages P_i.

        y: [T, out] (updated in place), x: [T, in], a_store: [num_pages, in], b_store: [num_pages, out].
        """
        for g in plan.groups:
            self._apply_group(y, x, a_store, b_store, g)
