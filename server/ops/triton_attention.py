"""Triton decode attention over block-paged KV (the CUDA path; after vLLM's PagedAttention).

One program per (decode row, query head). It walks the row's block table one KV block at a time,
reading keys and values where the pool keeps them, with an online softmax in float32:

    m' = max(m, max_j s_j);  l' = l e^(m - m') + sum_j e^(s_j - m');  acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j

and writes acc / l. Scores are ``scale * q . k_j + slope_h * j`` over the row's causal window (see
attention.py). Tested under ``TRITON_INTERPRET=1`` against the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["window", "max_blocks"])
def _paged_decode(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, slopes_ptr, scale, window, max_blocks,
                  H: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, HD_BLOCK: tl.constexpr,
                  BS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    length = tl.load(lengths_ptr + i)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # one type on both paths, for the compiler
    d = tl.arange(0, HD_BLOCK)
    d_mask = d < HD
    q = tl.load(q_ptr + (i * H + h) * HD + d, mask=d_mask, other=0.0).to(tl.float32)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + h)
    m = tl.full([1], float("-inf"), tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([HD_BLOCK], tl.float32)
    offs = tl.arange(0, BS)
    token_stride = (H // GROUP) * HD
    for blk in range(lo // BS, tl.cdiv(length, BS)):
        block = tl.load(tables_ptr + i * max_blocks + blk)
        j = blk * BS + offs
        valid = (j >= lo) & (j < length)
        base = block * BS * token_stride + offs[:, None] * token_stride + kvh * HD + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
        s = scale * tl.sum(k * q[None, :], axis=1) + slope * j.to(tl.float32)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + (i * H + h) * HD + d, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_triton(q, k_cache, v_cache, tables, lengths, ctx, scale, window, slopes, masks):
    """Same contract as ``attention.paged_decode_torch``; ``ctx`` and ``masks`` are unused."""
    D, H, hd = q.shape
    out = torch.empty_like(q)
    if D == 0:
        return out
    q = q.contiguous()
    tables = tables.contiguous()
    _paged_decode[(D, H)](
        out, q, k_cache, v_cache, tables, lengths, slopes if slopes is not None else q, float(scale),
        int(window or 0), tables.shape[1], H=H, GROUP=H // k_cache.shape[2], HD=hd,
        HD_BLOCK=triton.next_power_of_2(hd), BS=k_cache.shape[1], HAS_ALIBI=slopes is not None,
    )
    return out
