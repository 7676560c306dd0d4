"""Triton attention over block-paged KV (the CUDA path; after vLLM's PagedAttention and its prefix
prefill kernel): decode rows, and every prefill chunk of a step in one launch.

One program per (decode row, KV head), for the query heads that share that KV head (so each key
and value is read once for the group). It walks the row's keys TILE positions at a time, each
position's block looked up in the block table, reading keys and values where the pool keeps them,
with an online softmax in float32:

    m' = max(m, max_j s_j);  l' = l e^(m - m') + sum_j e^(s_j - m');  acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j

and writes acc / l; with attention sinks (GPT-OSS's), the sink's logit joins the denominator at the
end, m' = max(m, sink_h), l' = l e^(m - m') + e^(sink_h - m'), acc' = acc e^(m - m'). Scores are
``c(scale * q . k_j) + slope_h * j`` over the row's causal window (see attention.py; with Llama 4's
attention ``chunk_size``, from the start of the row's own chunk), c(s) = cap * tanh(s / cap) with
Gemma 2's soft cap (tanh as 2 sigmoid(2x) - 1, which the interpreter runs too), else s. Prefill
(``paged_prefill_triton``) runs the same online softmax for a block of a chunk's queries at once,
with tl.dot, over keys up to each query's own position.
Tested under ``TRITON_INTERPRET=1`` against the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 32  # key positions per loop iteration, gathered through the block table token by token


@triton.jit(do_not_specialize=["window", "chunk_size", "max_blocks"])
def _paged_decode(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, slopes_ptr, sinks_ptr, scale, window,
                  chunk_size, max_blocks, softcap, H: tl.constexpr, KV: tl.constexpr, GROUP: tl.constexpr,
                  G_BLOCK: tl.constexpr,
                  HD: tl.constexpr, HD_BLOCK: tl.constexpr, BS: tl.constexpr, TILE: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    length = tl.load(lengths_ptr + i)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # one type on both paths, for the compiler
    lo = tl.where(chunk_size > 0, tl.maximum(lo, (length - 1) // tl.maximum(chunk_size, 1) * chunk_size), lo)
    g = tl.arange(0, G_BLOCK)
    g_mask = g < GROUP
    heads = kvh * GROUP + g  # the query heads that share this KV head
    d = tl.arange(0, HD_BLOCK)
    d_mask = d < HD
    q = tl.load(q_ptr + (i * H + heads[:, None]) * HD + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)  # [G, HD]
    slope = tl.zeros([G_BLOCK], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=g_mask, other=0.0)
    m = tl.full([G_BLOCK], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_BLOCK], tl.float32)
    acc = tl.zeros([G_BLOCK, HD_BLOCK], tl.float32)
    offs = tl.arange(0, TILE)
    for tile in range(lo // TILE, tl.cdiv(length, TILE)):
        j = tile * TILE + offs
        valid = (j >= lo) & (j < length)
        block = tl.load(tables_ptr + i * max_blocks + j // BS, mask=valid, other=0)  # each token's block
        base = (block[:, None] * BS + (j % BS)[:, None]) * KV * HD + kvh * HD + d[None, :]  # [TILE, HD]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
        s = scale * tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        if HAS_CAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        s = s + slope[:, None] * j[None, :].to(tl.float32)
        s = tl.where(valid[None, :], s, float("-inf"))  # [G, TILE]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        m = m_new
    if HAS_SINKS:
        acc, l_sum = _sink(acc, l_sum, m, tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32))
    out = acc / l_sum[:, None]
    tl.store(out_ptr + (i * H + heads[:, None]) * HD + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_triton(q, k_cache, v_cache, tables, lengths, ctx, scale, window, slopes, masks, softcap=None,
                        sinks=None, chunk_size=None):
    """Same contract as ``attention.paged_decode_torch``; ``ctx`` and ``masks`` are unused."""
    D, H, hd = q.shape
    out = torch.empty_like(q)
    if D == 0:
        return out
    q = q.contiguous()
    tables = tables.contiguous()
    KV = k_cache.shape[2]
    _paged_decode[(D, KV)](
        out, q, k_cache, v_cache, tables, lengths, slopes if slopes is not None else q,
        sinks if sinks is not None else q, float(scale), int(window or 0), int(chunk_size or 0), tables.shape[1],
        float(softcap or 0.0), H=H, KV=KV, GROUP=H // KV, G_BLOCK=triton.next_power_of_2(H // KV), HD=hd,
        HD_BLOCK=triton.next_power_of_2(hd), BS=k_cache.shape[1], TILE=TILE, HAS_ALIBI=slopes is not None,
        HAS_CAP=softcap is not None, HAS_SINKS=sinks is not None,
    )
    return out


@triton.jit
def _sink(acc, l_sum, m, sink):
    """The online softmax's state [R, HD], [R], [R] with each row's sink logit [R] joined to its
    denominator (one more score, no value)."""
    m_new = tl.maximum(m, sink)
    alpha = tl.exp(m - m_new)  # m = -inf (no key yet): 0, and l, acc are 0 too
    return acc * alpha[:, None], l_sum * alpha + tl.exp(sink - m_new)


@triton.jit(do_not_specialize=["window", "chunk_size"])
def _paged_prefill(out_ptr, q_ptr, k_ptr, v_ptr, blocks_ptr, chunks_ptr, slopes_ptr, sinks_ptr, scale, window,
                   chunk_size, softcap, stride_qt, stride_qh, H: tl.constexpr, KV: tl.constexpr, GROUP: tl.constexpr,
                   G_BLOCK: tl.constexpr, HD: tl.constexpr, HD_BLOCK: tl.constexpr, BS: tl.constexpr,
                   BLOCK_M: tl.constexpr, TILE: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_CAP: tl.constexpr,
                   HAS_SINKS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (chunk c, block mb of its queries, KV head): BLOCK_M query positions times the GROUP
    query heads sharing the KV head, as R = BLOCK_M * G_BLOCK rows of tl.dot, over the chunk's keys."""
    c = tl.program_id(0)
    mb = tl.program_id(1)
    kvh = tl.program_id(2)
    row_start = tl.load(chunks_ptr + c * 4)
    n = tl.load(chunks_ptr + c * 4 + 1)
    start = tl.load(chunks_ptr + c * 4 + 2)
    block_start = tl.load(chunks_ptr + c * 4 + 3)
    if mb * BLOCK_M < n:
        r = tl.arange(0, BLOCK_M * G_BLOCK)
        mi = mb * BLOCK_M + r // G_BLOCK  # query index within the chunk
        gi = r % G_BLOCK
        r_mask = (mi < n) & (gi < GROUP)
        heads = kvh * GROUP + gi
        pos = start + mi
        d = tl.arange(0, HD_BLOCK)
        d_mask = d < HD
        q_off = (row_start + mi)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        slope = tl.zeros([BLOCK_M * G_BLOCK], tl.float32)
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + heads, mask=r_mask, other=0.0)
        m = tl.full([BLOCK_M * G_BLOCK], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M * G_BLOCK], tl.float32)
        acc = tl.zeros([BLOCK_M * G_BLOCK, HD_BLOCK], tl.float32)
        last = start + tl.minimum(n, (mb + 1) * BLOCK_M)  # keys [lo, last): up to the block's last query
        lo = tl.where(window > 0, tl.maximum(start + mb * BLOCK_M - window + 1, 0), 0)
        first = start + mb * BLOCK_M  # the block's first query: its attention chunk starts lowest
        lo = tl.where(chunk_size > 0, tl.maximum(lo, first // tl.maximum(chunk_size, 1) * chunk_size), lo)
        offs = tl.arange(0, TILE)
        for tile in range(lo // TILE, tl.cdiv(last, TILE)):
            j = tile * TILE + offs
            j_valid = (j >= lo) & (j < last)
            block = tl.load(blocks_ptr + block_start + j // BS, mask=j_valid, other=0)
            base = (block[:, None] * BS + (j % BS)[:, None]) * KV * HD + kvh * HD + d[None, :]  # [TILE, HD]
            kv_mask = j_valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
            s = scale * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [R, TILE]
            if HAS_CAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            s = s + slope[:, None] * j[None, :].to(tl.float32)
            allowed = j_valid[None, :] & (j[None, :] <= pos[:, None])
            allowed = allowed & ((window <= 0) | (j[None, :] > pos[:, None] - window))
            own_chunk = j[None, :] >= pos[:, None] // tl.maximum(chunk_size, 1) * chunk_size
            allowed = allowed & ((chunk_size <= 0) | own_chunk)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row none of whose keys came yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(v_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        if HAS_SINKS:
            acc, l_sum = _sink(acc, l_sum, m, tl.load(sinks_ptr + heads, mask=r_mask, other=0.0).to(tl.float32))
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # 0 only in masked rows past the chunk's end
        out_off = ((row_start + mi)[:, None] * H + heads[:, None]) * HD + d[None, :]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


PREFILL_BLOCK_M = 16  # query positions per program


def paged_prefill_triton(out, q, k_cache, v_cache, blocks, chunks, max_tokens: int, scale, window, slopes,
                         softcap=None, sinks=None, chunk_size=None) -> None:
    """Every prefill chunk's attention in one launch, straight from the paged cache (no gathered
    copy of the context), written into ``out`` [T, H, hd] at the chunks' rows.

    q [T, H, hd] (rows unit-stride in hd), k_cache/v_cache [NB, bs, KV, hd]; ``chunks`` [S, 4] int64
    (row_start, num_tokens, start_pos, block_start) per chunk; ``blocks`` the chunks' block tables
    end to end (chunk s's at block_start); ``max_tokens`` the longest chunk. A chunk's query at
    position p attends to keys j of its sequence with max(0, p - window + 1) <= j <= p (and, with an
    attention ``chunk_size`` C, j >= floor(p / C) * C), scores as
    in ``paged_decode_triton``. float32 storage multiplies in IEEE float32; half types in TF32, whose
    10-bit mantissa holds their values (the probabilities are rounded to it)."""
    S = chunks.shape[0]
    if S == 0:
        return
    H, hd = q.shape[1], q.shape[2]
    KV = k_cache.shape[2]
    if q.stride(2) != 1:
        q = q.contiguous()
    assert out.is_contiguous()
    _paged_prefill[(S, triton.cdiv(max_tokens, PREFILL_BLOCK_M), KV)](
        out, q, k_cache, v_cache, blocks, chunks, slopes if slopes is not None else q,
        sinks if sinks is not None else q, float(scale), int(window or 0), int(chunk_size or 0),
        float(softcap or 0.0), q.stride(0), q.stride(1), H=H, KV=KV, GROUP=H // KV, G_BLOCK=triton.next_power_of_2(H // KV), HD=hd,
        HD_BLOCK=max(16, triton.next_power_of_2(hd)), BS=k_cache.shape[1], BLOCK_M=PREFILL_BLOCK_M, TILE=TILE,
        HAS_ALIBI=slopes is not None, HAS_CAP=softcap is not None, HAS_SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
