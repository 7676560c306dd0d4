"""Triton SGMV/BGMV kernels over the page store, the GPU fast path (after Punica and S-LoRA).

Each rank group of a plan is two launches: a shrink ``v = x @ A_P.T`` into a float32 scratch
[n, s * rank], for all s used kinds of a fused linear (q|k|v, gate|up) in one pass over x, then an
expand ``y[:, C_j] += v_j @ B_P[:, C_j]`` that adds straight into each kind's output columns. Kernels read
the adapter pages where the device pool keeps them (``a_store[page]``, ``b_store[page]``): no
gather copy, and each adapter is read at its own rank (padded in registers to a power of two of at
least 16, masked, never in memory). Accumulation is float32 whatever the storage dtype. The rank
is a runtime argument, not specialised: one compiled kernel serves every rank of a padded block,
and ``warm_up`` compiles them all at start-up, never inside a step. Row and page indices are int64.

- BGMV (decode, ``group_ends is None``): one program per row (and per slice of the reduction or
  output dimension); row ``i`` reads pages ``pages[i*rank : (i+1)*rank]``.
- SGMV (prefill): one program per (adapter, block of its rows[, block of outputs]); the adapter's
  weight tile is loaded once per block and multiplied with ``tl.dot``.

On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the tests check them against ``reference.py``.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .dora import dora_rescale, used_columns
from .plan import LoRAPlan, RankGroup
from .torch_ops import fused_args

_BGMV_TILE = 8192  # elements of a BGMV weight tile [R_BLOCK, BLOCK]: 32 KiB of float32 registers
_BLOCK_K = 64  # SGMV reduction tile (input features), at most ...
_SGMV_TILE = 16384  # ... this many elements of A's tile [BLOCK_K, RS_BLOCK]: its pipelined stages
# (float32: 64 KiB each) stay within an H100/H200 block's 227 KiB of shared memory at rank x kinds 512
_BLOCK_N = 64  # SGMV output tile (output features)
_BLOCK_M = 16  # rows per SGMV program; tl.dot needs at least 16
_SPLIT_K_MIN_INPUT = 1024  # split the shrink's reduction when a small batch leaves the GPU idle
_SPLIT_K_ROWS = 64


@triton.jit
def _fused_rows(pages_ptr, page_base, meta_ptr, rank, num_used, RS_BLOCK: tl.constexpr):
    """The shrink's output rows rr = t * rank + k (kind t of the used ones, rank row k), their mask,
    pages and the offset of kind t's A row within a page."""
    rr = tl.arange(0, RS_BLOCK)
    rr_mask = rr < rank * num_used
    t = rr // rank
    pages = tl.load(pages_ptr + page_base + rr % rank, mask=rr_mask, other=0)
    a_off = tl.load(meta_ptr + t * 3, mask=rr_mask, other=0)
    return rr, rr_mask, pages, a_off


@triton.jit(do_not_specialize=["rank", "num_used"])
def _bgmv_shrink(x_ptr, a_ptr, v_ptr, rows_ptr, pages_ptr, meta_ptr, in_features, k_per_split, stride_x, stride_a,
                 rank, num_used, RS_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """v[s, i, t*rank + k] = x[rows[i], K_s] . a[page_ik, kind_t, K_s] for reduction slice K_s,
    s = program_id(1): every used kind in one pass over x. Each slice stores its own partial sum
    (the expand adds them in a fixed order: no atomics, no zeroed buffer, the same bits every run)."""
    i = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    row = tl.load(rows_ptr + i)
    rr, rr_mask, pages, a_off = _fused_rows(pages_ptr, i * rank, meta_ptr, rank, num_used, RS_BLOCK)
    acc = tl.zeros([RS_BLOCK], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(x_ptr + row * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + pages[:, None] * stride_a + a_off[:, None] + k[None, :],
                    mask=rr_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(v_ptr + (tl.program_id(1) * tl.num_programs(0) + i) * rank * num_used + rr, acc, mask=rr_mask)


@triton.jit(do_not_specialize=["rank", "num_used", "splits"])
def _bgmv_expand(v_ptr, b_ptr, y_ptr, rows_ptr, pages_ptr, meta_ptr, stride_y, stride_b,
                 rank, num_used, splits, R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[rows[i], N_j] += (sum_s v[s, i, t*rank : (t+1)*rank]) @ b[pages_i, N_j] for used kind t =
    program_id(2) and tile N_j = program_id(1) of its columns; s over the shrink's ``splits``
    reduction slices, in order."""
    i = tl.program_id(0)
    t = tl.program_id(2)
    row = tl.load(rows_ptr + i)
    r = tl.arange(0, R_BLOCK)
    r_mask = r < rank
    pages = tl.load(pages_ptr + i * rank + r, mask=r_mask, other=0)
    v = tl.zeros([R_BLOCK], dtype=tl.float32)
    for s in range(splits):
        v += tl.load(v_ptr + ((s * tl.num_programs(0) + i) * num_used + t) * rank + r, mask=r_mask, other=0.0)
    c0 = tl.load(meta_ptr + t * 3 + 1)
    c1 = tl.load(meta_ptr + t * 3 + 2)
    n = c0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < c1
    b = tl.load(b_ptr + pages[:, None] * stride_b + n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                other=0.0).to(tl.float32)
    delta = tl.sum(v[:, None] * b, axis=0)
    y_ptrs = y_ptr + row * stride_y + n
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=n_mask)


@triton.jit
def _segment_rows(ends_ptr, rows_ptr, BLOCK_M: tl.constexpr):
    """What an SGMV program (adapter u = program_id(0), row block program_id(1)) works on: its
    positions m in the group, their mask and their token rows."""
    u = tl.program_id(0)
    seg_start = tl.load(ends_ptr + u - 1, mask=u > 0, other=0)
    seg_end = tl.load(ends_ptr + u)
    m = seg_start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < seg_end
    return m, m_mask, tl.load(rows_ptr + m, mask=m_mask, other=0)


@triton.jit(do_not_specialize=["rank", "num_used"])
def _sgmv_shrink(x_ptr, a_ptr, v_ptr, rows_ptr, pages_ptr, ends_ptr, meta_ptr, in_features, stride_x, stride_a,
                 rank, num_used, RS_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """v[m, t*rank + k] = x[rows[m], :] . a[page_uk, kind_t, :] for the rows m of adapter u."""
    m, m_mask, rows = _segment_rows(ends_ptr, rows_ptr, BLOCK_M)
    rr, rr_mask, pages, a_off = _fused_rows(pages_ptr, tl.program_id(0) * rank, meta_ptr, rank, num_used, RS_BLOCK)
    acc = tl.zeros([BLOCK_M, RS_BLOCK], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a_t = tl.load(a_ptr + pages[None, :] * stride_a + a_off[None, :] + k[:, None],
                      mask=k_mask[:, None] & rr_mask[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision=PRECISION)
    tl.store(v_ptr + m[:, None] * rank * num_used + rr[None, :], acc, mask=m_mask[:, None] & rr_mask[None, :])


@triton.jit(do_not_specialize=["rank", "num_used"])
def _sgmv_expand(v_ptr, b_ptr, y_ptr, rows_ptr, pages_ptr, ends_ptr, meta_ptr, col_tiles, stride_y, stride_b,
                 rank, num_used, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """y[rows[m], N_j] += v[m, t*rank : (t+1)*rank] @ b[pages_u, N_j] for the rows m of adapter u,
    used kind t = program_id(2) // col_tiles and tile N_j = program_id(2) % col_tiles of its columns."""
    m, m_mask, rows = _segment_rows(ends_ptr, rows_ptr, BLOCK_M)
    t = tl.program_id(2) // col_tiles
    r = tl.arange(0, R_BLOCK)
    r_mask = r < rank
    pages = tl.load(pages_ptr + tl.program_id(0) * rank + r, mask=r_mask, other=0)
    c0 = tl.load(meta_ptr + t * 3 + 1)
    c1 = tl.load(meta_ptr + t * 3 + 2)
    n = c0 + (tl.program_id(2) % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < c1
    b = tl.load(b_ptr + pages[:, None] * stride_b + n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    v = tl.load(v_ptr + m[:, None] * rank * num_used + t * rank + r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                other=0.0)
    delta = tl.dot(v, b.to(tl.float32), input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_y + n[None, :]
    tile_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=tile_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=tile_mask)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


class TritonLoRA:
    """``apply_lora(y, x, a_store, b_store, plan, bounds=None, used=None, bias=None)`` with Triton
    kernels; same contract as TorchLoRA. Each rank group is two launches whatever the number of
    used kinds: one shrink for all of them, one expand into each kind's columns."""

    name = "triton"

    def __init__(self):
        self._meta: dict[tuple, torch.Tensor] = {}

    def _meta_for(self, a_store, bounds, used, device) -> torch.Tensor:
        """[s, 3] int64 on the device: per used kind, its A row's offset in a page and its columns.
        Built once per (store shape, kinds): never a copy inside a step."""
        key = (a_store.stride(1), bounds, used, device)
        meta = self._meta.get(key)
        if meta is None:
            meta = torch.tensor([(j * a_store.stride(1), bounds[j], bounds[j + 1]) for j in used], dtype=torch.long,
                                device=device)
            self._meta[key] = meta
        return meta

    def _apply_group(self, y, x, a_store, b_store, g: RankGroup, meta, bounds, used) -> None:
        n, rank, s = g.num_rows, g.rank, len(used)
        in_features = x.shape[1]
        widest = max(bounds[j + 1] - bounds[j] for j in used)
        r_block, rs_block = _rank_block(rank), _rank_block(rank * s)
        # SGMV multiplies in float32: IEEE for float32 storage; for half types TF32 tensor cores, whose
        # 10-bit mantissa holds fp16 and bf16 values exactly (and Triton's interpreter has no bf16 dot)
        precision = "ieee" if a_store.dtype == torch.float32 else "tf32"
        if g.group_ends is None:
            block = _BGMV_TILE // rs_block  # low ranks take wider tiles: fewer, fuller programs
            split = 1
            if n < _SPLIT_K_ROWS and in_features >= _SPLIT_K_MIN_INPUT:
                split = min(triton.cdiv(in_features, block), triton.cdiv(_SPLIT_K_ROWS, n))
            k_per_split = triton.cdiv(triton.cdiv(in_features, split), block) * block
            split = triton.cdiv(in_features, k_per_split)
            v = torch.empty(split, n, s * rank, dtype=torch.float32, device=x.device)
            _bgmv_shrink[(n, split)](x, a_store, v, g.rows, g.pages, meta, in_features, k_per_split, x.stride(0),
                                     a_store.stride(0), rank=rank, num_used=s, RS_BLOCK=rs_block, BLOCK_K=block)
            block_n = _BGMV_TILE // r_block
            _bgmv_expand[(n, triton.cdiv(widest, block_n), s)](
                v, b_store, y, g.rows, g.pages, meta, y.stride(0), b_store.stride(0),
                rank=rank, num_used=s, splits=split, R_BLOCK=r_block, BLOCK_N=block_n)
        else:
            v = torch.empty(n, s * rank, dtype=torch.float32, device=x.device)
            row_blocks = triton.cdiv(g.max_rows_per_adapter, _BLOCK_M)
            num_adapters = g.group_ends.numel()
            _sgmv_shrink[(num_adapters, row_blocks)](
                x, a_store, v, g.rows, g.pages, g.group_ends, meta, in_features, x.stride(0), a_store.stride(0),
                rank=rank, num_used=s, RS_BLOCK=rs_block, BLOCK_M=_BLOCK_M,
                BLOCK_K=max(16, min(_BLOCK_K, _SGMV_TILE // rs_block)), PRECISION=precision)  # tl.dot: K >= 16
            col_tiles = triton.cdiv(widest, _BLOCK_N)
            _sgmv_expand[(num_adapters, row_blocks, col_tiles * s)](
                v, b_store, y, g.rows, g.pages, g.group_ends, meta, col_tiles, y.stride(0), b_store.stride(0),
                rank=rank, num_used=s, R_BLOCK=r_block, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, PRECISION=precision)

    def warm_up(self, max_rank: int, stores, device, bounds: dict | None = None) -> None:
        """Compile every kernel variant a step can need (each padded rank block up to ``max_rank``
        for each number of fused kinds, BGMV with and without a split reduction, SGMV) for each
        store shape, so that no step waits for a compile; and, given each fused linear's ``bounds``
        ({kinds: column bounds}), the device metadata of every set of its kinds an adapter can
        target, so that no step makes it with a copy that waits for the device (``_meta_for``).
        stores: {(layer, kinds): (a_store [P, m, in], b_store [P, out])}."""
        from .plan import plan_segments, plan_tokens

        device = torch.device(device)  # as a step's tensors give it: the metadata's key
        for (_, kinds), (a_store, _) in stores.items():
            if bounds and kinds in bounds:
                for s in range(1, len(kinds) + 1):
                    for used in itertools.combinations(range(len(kinds)), s):
                        self._meta_for(a_store, bounds[kinds], used, device)

        shapes = {}
        for a_store, b_store in stores.values():
            shapes.setdefault((tuple(a_store.shape[1:]), b_store.shape[1], a_store.dtype), (a_store, b_store))
        ranks, rank = [], 16  # one per padded rank block
        while True:
            ranks.append(min(max_rank, rank))
            if rank >= max_rank:
                break
            rank *= 2
        for rank in ranks:
            pages = torch.arange(rank, dtype=torch.long)
            for ((m, in_f), out_f, dtype), (a_store, b_store) in shapes.items():
                bounds = tuple(round(out_f * j / m) for j in range(m + 1))  # any split: offsets are arguments
                for s in range(1, m + 1):
                    used = tuple(range(s))
                    for rows in (1, _SPLIT_K_ROWS):  # a small batch splits the reduction; a large one does not
                        x = torch.zeros(rows, in_f, dtype=dtype, device=device)
                        y = torch.zeros(rows, out_f, dtype=dtype, device=device)
                        self(y, x, a_store, b_store, plan_tokens([0] * rows, [pages], device), bounds, used)
                    x = torch.zeros(2, in_f, dtype=dtype, device=device)
                    y = torch.zeros(2, out_f, dtype=dtype, device=device)
                    self(y, x, a_store, b_store, plan_segments([0, 2], [pages], device), bounds, used)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a_store, b_store, plan: LoRAPlan, bounds=None,
                 used=None, bias: torch.Tensor | None = None) -> None:
        """For every row i the plan assigns pages P_i and each used kind j, with C_j the columns
        bounds[j]:bounds[j + 1]:  y[i, C_j] += (x[i] @ a_store[P_i, j].T) @ b_store[P_i, C_j];
        then the rows of DoRA adapters are rescaled (ops/dora.py; ``bias``: the linear's, or None).

        y: [T, out] (updated in place), x: [T, in], a_store: [num_pages, m, in] (or [num_pages,
        in]), b_store: [num_pages, out]; features unit-stride.
        """
        a_store, bounds, used = fused_args(y.shape[1], a_store, bounds, used)
        assert x.stride(1) == 1 and y.stride(1) == 1 and a_store.stride(2) == 1 and b_store.stride(1) == 1
        if plan.empty or not used:
            return
        meta = self._meta_for(a_store, bounds, used, x.device)
        for g in plan.groups:
            self._apply_group(y, x, a_store, b_store, g, meta, bounds, used)
        if plan.magnitude is not None:
            dora_rescale(y, b_store, bias, plan.magnitude.runs, used_columns(bounds, used))
