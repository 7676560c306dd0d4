"""Triton SGMV/BGMV kernels over the page store, the GPU fast path (after Punica and S-LoRA).

Each rank group of a plan is two launches: a shrink ``v = x @ A_P.T`` into a float32 scratch
[n, rank], then an expand ``y += v @ B_P`` that adds straight into the output rows. Kernels read
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

import torch
import triton
import triton.language as tl

from .plan import LoRAPlan, RankGroup

_BGMV_TILE = 8192  # elements of a BGMV weight tile [R_BLOCK, BLOCK]: 32 KiB of float32 registers
_BLOCK_K = 64  # SGMV reduction tile (input features)
_BLOCK_N = 64  # SGMV output tile (output features)
_BLOCK_M = 16  # rows per SGMV program; tl.dot needs at least 16
_SPLIT_K_MIN_INPUT = 1024  # split the shrink's reduction when a small batch leaves the GPU idle
_SPLIT_K_ROWS = 64


@triton.jit(do_not_specialize=["rank"])
def _bgmv_shrink(x_ptr, a_ptr, v_ptr, rows_ptr, pages_ptr, in_features, k_per_split, stride_x, stride_a,
                 rank, R_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """v[i, :] (+)= x[rows[i], K_s] @ a[pages_i, K_s].T for reduction slice K_s = program_id(1);
    with SPLIT the slices add up atomically into a zeroed v, else each program stores its row."""
    i = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    row = tl.load(rows_ptr + i)
    r = tl.arange(0, R_BLOCK)
    r_mask = r < rank
    pages = tl.load(pages_ptr + i * rank + r, mask=r_mask, other=0)
    acc = tl.zeros([R_BLOCK], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(x_ptr + row * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + pages[:, None] * stride_a + k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    if SPLIT:
        tl.atomic_add(v_ptr + i * rank + r, acc, mask=r_mask)
    else:
        tl.store(v_ptr + i * rank + r, acc, mask=r_mask)


@triton.jit(do_not_specialize=["rank"])
def _bgmv_expand(v_ptr, b_ptr, y_ptr, rows_ptr, pages_ptr, out_features, stride_y, stride_b,
                 rank, R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[rows[i], N_j] += v[i, :] @ b[pages_i, N_j] for output tile N_j = program_id(1)."""
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    r = tl.arange(0, R_BLOCK)
    r_mask = r < rank
    pages = tl.load(pages_ptr + i * rank + r, mask=r_mask, other=0)
    v = tl.load(v_ptr + i * rank + r, mask=r_mask, other=0.0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    b = tl.load(b_ptr + pages[:, None] * stride_b + n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                other=0.0).to(tl.float32)
    delta = tl.sum(v[:, None] * b, axis=0)
    y_ptrs = y_ptr + row * stride_y + n
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=n_mask)


@triton.jit
def _segment_program(ends_ptr, rows_ptr, pages_ptr, rank, R_BLOCK: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """What an SGMV program (adapter u = program_id(0), row block program_id(1)) works on: its
    positions m in the group and their mask, their token rows, and the adapter's rank rows r, their
    mask and their pages."""
    u = tl.program_id(0)
    seg_start = tl.load(ends_ptr + u - 1, mask=u > 0, other=0)
    seg_end = tl.load(ends_ptr + u)
    m = seg_start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < seg_end
    r = tl.arange(0, R_BLOCK)
    r_mask = r < rank
    pages = tl.load(pages_ptr + u * rank + r, mask=r_mask, other=0)
    return m, m_mask, tl.load(rows_ptr + m, mask=m_mask, other=0), r, r_mask, pages


@triton.jit(do_not_specialize=["rank"])
def _sgmv_shrink(x_ptr, a_ptr, v_ptr, rows_ptr, pages_ptr, ends_ptr, in_features, stride_x, stride_a,
                 rank, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """v[m, :] = x[rows[m], :] @ a[pages_u, :].T for the rows m of adapter u."""
    m, m_mask, rows, r, r_mask, pages = _segment_program(ends_ptr, rows_ptr, pages_ptr, rank, R_BLOCK, BLOCK_M)
    acc = tl.zeros([BLOCK_M, R_BLOCK], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a_t = tl.load(a_ptr + pages[None, :] * stride_a + k[:, None], mask=k_mask[:, None] & r_mask[None, :],
                      other=0.0)
        acc += tl.dot(x.to(tl.float32), a_t.to(tl.float32), input_precision=PRECISION)
    tl.store(v_ptr + m[:, None] * rank + r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["rank"])
def _sgmv_expand(v_ptr, b_ptr, y_ptr, rows_ptr, pages_ptr, ends_ptr, out_features, stride_y, stride_b,
                 rank, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """y[rows[m], N_j] += v[m, :] @ b[pages_u, N_j] for the rows m of adapter u."""
    m, m_mask, rows, r, r_mask, pages = _segment_program(ends_ptr, rows_ptr, pages_ptr, rank, R_BLOCK, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    b = tl.load(b_ptr + pages[:, None] * stride_b + n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    v = tl.load(v_ptr + m[:, None] * rank + r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    delta = tl.dot(v, b.to(tl.float32), input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_y + n[None, :]
    tile_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=tile_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=tile_mask)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


class TritonLoRA:
    """``apply_lora(y, x, a_store, b_store, plan)`` with Triton kernels; same contract as TorchLoRA."""

    name = "triton"

    def _apply_group(self, y, x, a_store, b_store, g: RankGroup) -> None:
        n, rank = g.num_rows, g.rank
        in_features, out_features = x.shape[1], y.shape[1]
        r_block = _rank_block(rank)
        # SGMV multiplies in float32: IEEE for float32 storage; for half types TF32 tensor cores, whose
        # 10-bit mantissa holds fp16 and bf16 values exactly (and Triton's interpreter has no bf16 dot)
        precision = "ieee" if a_store.dtype == torch.float32 else "tf32"
        if g.group_ends is None:
            block = _BGMV_TILE // r_block  # low ranks take wider tiles: fewer, fuller programs
            split = 1
            if n < _SPLIT_K_ROWS and in_features >= _SPLIT_K_MIN_INPUT:
                split = min(triton.cdiv(in_features, block), triton.cdiv(_SPLIT_K_ROWS, n))
            k_per_split = triton.cdiv(triton.cdiv(in_features, split), block) * block
            split = triton.cdiv(in_features, k_per_split)
            v = (torch.zeros if split > 1 else torch.empty)(n, rank, dtype=torch.float32, device=x.device)
            _bgmv_shrink[(n, split)](x, a_store, v, g.rows, g.pages, in_features, k_per_split, x.stride(0),
                                     a_store.stride(0), rank=rank, R_BLOCK=r_block, BLOCK_K=block, SPLIT=split > 1)
            _bgmv_expand[(n, triton.cdiv(out_features, block))](
                v, b_store, y, g.rows, g.pages, out_features, y.stride(0), b_store.stride(0),
                rank=rank, R_BLOCK=r_block, BLOCK_N=block)
        else:
            v = torch.empty(n, rank, dtype=torch.float32, device=x.device)
            row_blocks = triton.cdiv(g.max_rows_per_adapter, _BLOCK_M)
            num_adapters = g.group_ends.numel()
            _sgmv_shrink[(num_adapters, row_blocks)](
                x, a_store, v, g.rows, g.pages, g.group_ends, in_features, x.stride(0), a_store.stride(0),
                rank=rank, R_BLOCK=r_block, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, PRECISION=precision)
            _sgmv_expand[(num_adapters, row_blocks, triton.cdiv(out_features, _BLOCK_N))](
                v, b_store, y, g.rows, g.pages, g.group_ends, out_features, y.stride(0), b_store.stride(0),
                rank=rank, R_BLOCK=r_block, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, PRECISION=precision)

    def warm_up(self, max_rank: int, stores, device) -> None:
        """Compile every kernel variant a step can need (each rank block up to ``max_rank``, BGMV
        with and without a split reduction, SGMV) for each (in, out) shape of ``stores``, so that
        no step waits for a compile. stores: {(layer, kind): (a_store, b_store)}."""
        from .plan import plan_segments, plan_tokens

        shapes = {}
        for a_store, b_store in stores.values():
            shapes.setdefault((a_store.shape[1], b_store.shape[1], a_store.dtype), (a_store, b_store))
        blocks, block = [], 16  # the padded rank blocks: one compiled variant each
        while True:
            blocks.append(min(max_rank, block))
            if block >= max_rank:
                break
            block *= 2
        for rank in blocks:
            pages = torch.arange(rank, dtype=torch.long)
            for (in_f, out_f, dtype), (a_store, b_store) in shapes.items():
                for rows in (1, _SPLIT_K_ROWS):  # a small batch splits the reduction; a large one does not
                    x = torch.zeros(rows, in_f, dtype=dtype, device=device)
                    y = torch.zeros(rows, out_f, dtype=dtype, device=device)
                    self(y, x, a_store, b_store, plan_tokens([0] * rows, [pages], device))
                x = torch.zeros(2, in_f, dtype=dtype, device=device)
                y = torch.zeros(2, out_f, dtype=dtype, device=device)
                self(y, x, a_store, b_store, plan_segments([0, 2], [pages], device))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a_store, b_store, plan: LoRAPlan) -> None:
        """y[i] += (x[i] @ a_store[P_i].T) @ b_store[P_i] for every row i the plan assigns pages P_i.

        y: [T, out] (updated in place; a column slice of a wider output is fine), x: [T, in],
        a_store: [num_pages, in], b_store: [num_pages, out]; rows and features unit-stride.
        """
        assert x.stride(1) == 1 and y.stride(1) == 1 and a_store.stride(1) == 1 and b_store.stride(1) == 1
        for g in plan.groups:
            self._apply_group(y, x, a_store, b_store, g)
