"""Fast pure-torch batched LoRA on preallocated scratch buffers.

- Per-row groups (BGMV, decode): each row's A pages (of every kind of a fused linear it uses) are
  gathered and one batched matmul gives ``v = x_i @ A_i.T``; the expand
  ``d_i = sum_j v_ij * b_store[P_ij]`` is a weighted embedding-bag that reads B's pages straight
  from the store when one kind owns it, else a batched matmul per kind over the gathered pages.
- Segment groups (SGMV, prefill): each distinct adapter's pages are gathered once, then a grouped
  matmul runs each adapter's rows against its weights (one for the shrink of all used kinds).

Scratch buffers grow to the largest batch seen and are reused: a fresh multi-megabyte buffer per
call costs more in page faults than the matmul itself on a CPU.
"""

from __future__ import annotations

import torch

from .dora import dora_rescale, used_columns
from .plan import LoRAPlan, RankGroup

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    """What ``torch._grouped_mm`` accepts: 16-byte aligned data and non-unit strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def _grouped(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """out[rows of group u] = x[rows of group u] @ w[u];  x: [n, k], w: [U, k, m] -> [n, m]."""
    if _HAS_GROUPED_MM and x.dtype == w.dtype and _aligned(x) and _aligned(w):
        return torch._grouped_mm(x, w, offs=group_ends)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for u, end in enumerate(group_ends.tolist()):
        torch.matmul(x[start:end], w[u], out=out[start:end])
        start = end
    return out


def fused_args(out: int, a_store: torch.Tensor, bounds, used):
    """The fused form of a call: a_store [P, m, in] (a [P, in] store is one kind), the output
    column bounds of the m kinds (default: all ``out`` columns of y), and the kinds used (default: all)."""
    if a_store.dim() == 2:
        a_store = a_store[:, None, :]
    bounds = (0, out) if bounds is None else tuple(bounds)
    used = tuple(range(a_store.shape[1])) if used is None else tuple(used)
    return a_store, bounds, used


class TorchLoRA:
    """``apply_lora(y, x, a_store, b_store, plan, bounds=None, used=None, bias=None)``, holding its
    own scratch buffers. With the C++ ``lora_kernel`` (``cpu_kernel.load_lora_kernel()``), every
    group on the CPU goes to it instead of the gather/bmm/bag sequence, DoRA's rescale included."""

    def __init__(self, lora_kernel=None):
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._kernel = lora_kernel
        self._linear_lora = None  # the C++ ``linear_lora`` (use_base_linear)
        self._linear_rows: frozenset[int] = frozenset()
        self._empty = torch.empty(0, dtype=torch.int32)
        self._no_mags = torch.empty(0, dtype=torch.long)

    @property
    def name(self) -> str:
        """The backend in use, as --op-backend names it."""
        return "torch" if self._kernel is None else "cpp"

    @property
    def base_linear_rows(self) -> frozenset[int]:
        """The row counts served through ``linear_lora`` (use_base_linear); empty without it."""
        return self._linear_rows if self._linear_lora is not None else frozenset()

    def use_base_linear(self, linear_lora, rows) -> None:
        """Serve the decode rows of a linear whose base matmul is the C++ kernel's at these row
        counts (ops/linear.py) through ``linear_lora`` (cpu_kernels.cpp), base and LoRA in one call."""
        self._linear_lora, self._linear_rows = linear_lora, frozenset(rows)

    def with_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_store, b_store,
                    plan: LoRAPlan, bounds=None, used=None) -> torch.Tensor | None:
        """``y = linear(x, weight, bias)`` with the plan's LoRA added (as ``__call__`` adds it, the
        same bits), the base tiles and the decode rows' LoRA (its per-row groups, every rank) side
        by side in one C++ call; its segment groups (prefill rows) follow as usual. Where the base
        matmul is the kernel's at x's row count, with float32 weights and pages, a per-row group and
        no DoRA rows; None elsewhere: the caller computes the linear, then calls this op."""
        if (self._linear_lora is None or x.shape[0] not in self._linear_rows or plan.magnitude is not None
                or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.stride(1) != 1
                or a_store.dtype != torch.float32 or x.stride(1) != 1 or plan.per_row is None):
            return None
        a_store, bounds, used = fused_args(weight.shape[0], a_store, bounds, used)
        y = self._linear_lora(x, weight, self._empty if bias is None else bias, a_store, b_store, *plan.per_row,
                              bounds, used)
        self._kernel_groups(y, x, a_store, b_store, plan.segments, bounds, used, self._no_mags, self._empty)
        return y

    def _kernel_groups(self, y, x, a_store, b_store, groups, bounds, used, mags, bias) -> None:
        """Each group through the C++ ``lora`` (mags, bias: DoRA's, or empty)."""
        for g in groups:
            ends = self._empty if g.group_ends is None else g.group_ends
            self._kernel(y, x, a_store, b_store, g.rows, g.pages, ends, g.rank, bounds, used, mags, bias)

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

    def _gather(self, name: str, store: torch.Tensor, pages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """store[pages], in ``like``'s dtype (--lora-dtype pages narrower than the activations widen here)."""
        out = self._buffer(name, (pages.numel(), *store.shape[1:]), store)
        torch.index_select(store, 0, pages, out=out)
        if out.dtype != like.dtype:
            wide = self._buffer(name + "-wide", out.shape, like)
            wide.copy_(out)
            return wide
        return out

    def _shrink(self, x, a_store, g: RankGroup, used) -> torch.Tensor:
        """v [n, s, rank]: every used kind's shrink in one matmul over x's rows (s = len(used))."""
        n, s, rank = g.num_rows, len(used), g.rank
        lo = g.row_start
        xs = x[lo : lo + n] if lo is not None else x.index_select(0, g.rows)
        a = self._gather("a", a_store, g.pages, x)  # [pages, m, in]
        if s < a_store.shape[1]:
            a = a[:, list(used)]
        if g.group_ends is None:  # BGMV: row i's own pages
            a = a.view(n, rank * s, -1)  # rows (k, t)
            v = torch.bmm(xs[:, None, :], a.transpose(1, 2), out=self._buffer("v", (n, 1, rank * s), x))
        else:  # SGMV: one weight per adapter, over its run of rows
            a = a.reshape(g.group_ends.numel(), rank * s, -1).transpose(1, 2)  # [U, in, rank * s]
            v = _grouped(xs, a, g.group_ends)
        return v.view(n, rank, s).transpose(1, 2)  # [n, s, rank]

    def _apply_group(self, y, x, a_store, b_store, g: RankGroup, bounds, used) -> None:
        n, lo = g.num_rows, g.row_start
        v = self._shrink(x, a_store, g, used)
        # one kind owns the store: BGMV reads it in place (in the activations' dtype only; embedding_bag
        # would copy a strided store whole)
        whole = bounds == (0, b_store.shape[1]) and b_store.dtype == x.dtype and b_store.is_contiguous()
        if g.group_ends is not None or not whole:
            lead = n if g.group_ends is None else g.group_ends.numel()
            b_pages = self._gather("b", b_store, g.pages, x).view(lead, g.rank, -1)  # [n or U, rank, out]
        for t, j in enumerate(used):
            c0, c1 = bounds[j], bounds[j + 1]
            vt = v[:, t].contiguous()  # [n, rank]
            if g.group_ends is not None:
                delta = _grouped(vt, b_pages[:, :, c0:c1], g.group_ends)
            elif whole:  # d_i = sum_k v_ik * b[P_ik]
                # torch.embedding_bag, not F.embedding_bag: at decode sizes the functional wrapper's
                # checks cost more than the bag itself
                delta = torch.embedding_bag(b_store, g.pages, g.row_offsets, False, 0, False, vt.view(-1))[0]
            else:
                delta = torch.bmm(vt[:, None, :], b_pages[:, :, c0:c1]).squeeze(1)
            if lo is not None:
                y[lo : lo + n, c0:c1].add_(delta)  # not ``+=``: that writes the slice back with a second copy
            else:
                y[:, c0:c1].index_add_(0, g.rows, delta)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a_store, b_store, plan: LoRAPlan, bounds=None,
                 used=None, bias: torch.Tensor | None = None) -> None:
        """For every row i the plan assigns pages P_i and each used kind j, with C_j the columns
        bounds[j]:bounds[j + 1]:  y[i, C_j] += (x[i] @ a_store[P_i, j].T) @ b_store[P_i, C_j];
        then the rows of DoRA adapters (``plan.magnitude``) are rescaled (ops/dora.py; ``bias``:
        the linear's, [out], or None).

        y: [T, out] (updated in place), x: [T, in], a_store: [num_pages, m, in] (or [num_pages, in]:
        m = 1), b_store: [num_pages, out]; bounds: m + 1 column offsets (default (0, out)); used:
        indices of the kinds these rows use (default all m).
        """
        a_store, bounds, used = fused_args(y.shape[1], a_store, bounds, used)
        if self._kernel is not None and x.device.type == "cpu":  # the rescale as each row is written
            mags = self._no_mags if plan.magnitude is None else plan.magnitude.row_pages
            self._kernel_groups(y, x, a_store, b_store, plan.groups, bounds, used, mags,
                                self._empty if bias is None else bias)
            return
        for g in plan.groups:
            self._apply_group(y, x, a_store, b_store, g, bounds, used)
        if plan.magnitude is not None:
            dora_rescale(y, b_store, bias, plan.magnitude.runs, used_columns(bounds, used))
