"""Attention over block-paged KV, every path against the pure-torch oracle: the decode kernels
(C++, Triton in its interpreter, the torch gather) and prefill's gather + SDPA, with GQA, sliding
windows, ALiBi, scattered block tables and several dtypes; Gemma 2's soft-capped scores and
GPT-OSS's attention sinks; Llama 4's chunked attention."""

import pytest
import torch
import torch.nn.functional as F

from loramux.server.ops import triton_available
from loramux.server.ops.attention import (
    _cpp_decode,
    causal_mask,
    cpp_decode,
    eager_attention,
    gather_context,
    paged_attention_reference,
    paged_decode_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
CASES = [  # (heads, kv heads, head dim, block size, window, alibi)
    (4, 4, 16, 4, None, False),
    (8, 2, 16, 16, None, False),  # grouped-query attention
    (4, 2, 8, 4, 5, False),  # sliding window (GPT-Neo's local layers, Mistral)
    (4, 4, 16, 8, None, True),  # ALiBi (BLOOM)
    (6, 6, 12, 4, 3, True),  # a head dim that is not a power of two
]


def _decoders():
    out = [("torch", paged_decode_torch)]
    if DEVICE == "cpu" and _cpp_decode() is not None:
        out.append(("cpp", cpp_decode))
    if triton_available(DEVICE):
        from loramux.server.ops.triton_attention import paged_decode_triton

        out.append(("triton", paged_decode_triton))
    return out


def _pool(num_blocks, bs, kv, hd, dtype, gen):
    k = torch.randn(num_blocks + 1, bs, kv, hd, generator=gen).to(dtype)
    v = torch.randn(num_blocks + 1, bs, kv, hd, generator=gen).to(dtype)
    return k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_decode_kernels_match_the_oracle(case, dtype):
    H, KV, hd, bs, window, alibi = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    k, v = _pool(24, bs, KV, hd, dtype, gen)
    lengths = torch.tensor([1, bs, bs + 1, 3 * bs + 2, 5 * bs, 7])
    max_blocks = -(-int(lengths.max()) // bs)
    # scattered, shuffled tables padded with the sink: no row's blocks are contiguous
    tables = torch.stack([torch.randperm(24, generator=gen)[:max_blocks] for _ in lengths])
    for i, n in enumerate(lengths.tolist()):
        tables[i, -(-n // bs):] = 24
    q = (torch.randn(len(lengths), H, hd, generator=gen) / hd**0.25).to(dtype).to(DEVICE)
    slopes = (torch.rand(H, generator=gen) * 0.5).to(DEVICE) if alibi else None
    tables, lengths = tables.to(DEVICE), lengths.to(DEVICE)
    expected = paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window, slopes).float()
    for name, decode in _decoders():
        got = decode(q, k, v, tables, lengths, int(lengths.max()), 0.3, window, slopes, {})
        assert torch.allclose(got.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]), name


@pytest.mark.parametrize("case", CASES)
def test_prefill_chunks_over_their_blocks_match_the_oracle(case):
    """A chunk that starts after cached tokens (a prefix hit, or chunked prefill) attends to the
    cached keys and to its own, causally."""
    H, KV, hd, bs, window, alibi = case
    gen = torch.Generator().manual_seed(7)
    k, v = _pool(16, bs, KV, hd, torch.float32, gen)
    blocks = torch.randperm(16, generator=gen)[:5].to(DEVICE)
    start, n = 2 * bs + 1, bs + 2  # positions [start, start + n)
    ctx = start + n
    q = torch.randn(n, H, hd, generator=gen).to(DEVICE)
    slopes = (torch.rand(H, generator=gen) * 0.5).to(DEVICE) if alibi else None
    q_pos = torch.arange(start, ctx, device=DEVICE)
    mask = causal_mask(q_pos[:, None], torch.arange(ctx, device=DEVICE)[None, :], q.dtype, window, slopes,
                       head_dim_at=0)
    got = F.scaled_dot_product_attention(q.transpose(0, 1)[None], gather_context(k, blocks, ctx)[None],
                                         gather_context(v, blocks, ctx)[None], attn_mask=mask, scale=0.3,
                                         enable_gqa=H != KV)[0].transpose(0, 1)
    tables = blocks[None].expand(n, -1)
    expected = paged_attention_reference(q, k, v, tables, q_pos, 0.3, window, slopes)
    assert torch.allclose(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [c for c in CASES if not c[5]])  # soft-capping comes without ALiBi
def test_softcapped_decode_and_prefill_match_the_oracle(case):
    """cap * tanh(s / cap) on every score (a cap small enough to change the softmax), for decode
    rows over scattered blocks (every decode backend here: torch ops, the C++ kernel, Triton's under
    its interpreter) and for a prefill chunk after cached tokens."""
    H, KV, hd, bs, window, _ = case
    gen = torch.Generator().manual_seed(11)
    k, v = _pool(24, bs, KV, hd, torch.float32, gen)
    lengths = torch.tensor([1, bs + 1, 3 * bs + 2, 7])
    tables = torch.stack([torch.randperm(24, generator=gen)[: -(-int(lengths.max()) // bs)] for _ in lengths])
    q = torch.randn(len(lengths), H, hd, generator=gen) * 2
    tables, lengths, q = tables.to(DEVICE), lengths.to(DEVICE), q.to(DEVICE)
    expected = paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window, softcap=1.5)
    assert not torch.allclose(expected, paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window))
    for name, decode in _decoders():  # every backend's decode takes the cap
        got = decode(q, k, v, tables, lengths, int(lengths.max()), 0.3, window, None, {}, 1.5)
        assert torch.allclose(got, expected, atol=2e-5, rtol=2e-5), name
    blocks = tables[2]
    start, n = 2 * bs, bs + 2
    q_pos = torch.arange(start, start + n, device=DEVICE)
    chunk = torch.randn(n, H, hd, generator=gen).to(DEVICE) * 2
    allowed = causal_mask(q_pos[:, None], torch.arange(start + n, device=DEVICE)[None, :], chunk.dtype, window, None, 0)
    got = eager_attention(chunk.transpose(0, 1)[None], gather_context(k, blocks, start + n)[None],
                               gather_context(v, blocks, start + n)[None], allowed[None, None], 0.3, 1.5)
    expected = paged_attention_reference(chunk, k, v, blocks[None].expand(n, -1), q_pos, 0.3, window, softcap=1.5)
    assert torch.allclose(got[0].transpose(0, 1), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", CASES)
def test_attention_sinks_in_decode_and_prefill_match_the_oracle(case):
    """A sink logit per head joins the softmax's denominator (GPT-OSS's; HF's eager path is the
    oracle's formula): decode rows through every backend, and a prefill chunk after cached tokens
    through eager_attention, with windows, GQA and ALiBi's additive mask; sinks large enough that
    some heads give most of their weight to the sink, and the oracle is checked to move with them."""
    H, KV, hd, bs, window, alibi = case
    gen = torch.Generator().manual_seed(13)
    k, v = _pool(24, bs, KV, hd, torch.float32, gen)
    lengths = torch.tensor([1, bs + 1, 3 * bs + 2, 7])
    tables = torch.stack([torch.randperm(24, generator=gen)[: -(-int(lengths.max()) // bs)] for _ in lengths])
    q = torch.randn(len(lengths), H, hd, generator=gen)
    sinks = (torch.randn(H, generator=gen) * 2 + 1).to(DEVICE)
    slopes = (torch.rand(H, generator=gen) * 0.5).to(DEVICE) if alibi else None
    tables, lengths, q = tables.to(DEVICE), lengths.to(DEVICE), q.to(DEVICE)
    expected = paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window, slopes, sinks=sinks)
    assert not torch.allclose(expected, paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window, slopes),
                              atol=1e-2)
    for name, decode in _decoders():
        got = decode(q, k, v, tables, lengths, int(lengths.max()), 0.3, window, slopes, {}, None, sinks)
        assert torch.allclose(got, expected, atol=2e-5, rtol=2e-5), name
    blocks = tables[2]
    start, n = 2 * bs, bs + 2
    q_pos = torch.arange(start, start + n, device=DEVICE)
    chunk = torch.randn(n, H, hd, generator=gen).to(DEVICE)
    mask = causal_mask(q_pos[:, None], torch.arange(start + n, device=DEVICE)[None, :], chunk.dtype, window, slopes, 0)
    got = eager_attention(chunk.transpose(0, 1)[None], gather_context(k, blocks, start + n)[None],
                          gather_context(v, blocks, start + n)[None], mask[None] if alibi else mask[None, None],
                          0.3, sinks=sinks)
    expected = paged_attention_reference(chunk, k, v, blocks[None].expand(n, -1), q_pos, 0.3, window, slopes,
                                         sinks=sinks)
    assert torch.allclose(got[0].transpose(0, 1), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("chunk_size", [4, 5, 16])
def test_chunked_attention_in_decode_and_prefill_matches_the_oracle(chunk_size):
    """Llama 4's chunked layers: a query at p attends to keys floor(p / C) * C .. p only. Decode rows
    at positions on both sides of chunk boundaries (the first of a chunk attends to itself alone),
    through every backend; a prefill chunk that crosses boundaries after cached tokens through the
    mask SDPA runs with; the oracle is checked to differ from plain causal attention."""
    H, KV, hd, bs = 8, 2, 16, 4
    gen = torch.Generator().manual_seed(17)
    k, v = _pool(24, bs, KV, hd, torch.float32, gen)
    lengths = torch.tensor([1, 4, 5, 6, 16, 17, 21, 23])
    tables = torch.stack([torch.randperm(24, generator=gen)[: -(-int(lengths.max()) // bs)] for _ in lengths])
    q = torch.randn(len(lengths), H, hd, generator=gen)
    tables, lengths, q = tables.to(DEVICE), lengths.to(DEVICE), q.to(DEVICE)
    expected = paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, chunk_size=chunk_size)
    assert not torch.allclose(expected, paged_attention_reference(q, k, v, tables, lengths - 1, 0.3), atol=1e-3)
    for name, decode in _decoders():
        got = decode(q, k, v, tables, lengths, int(lengths.max()), 0.3, None, None, {}, None, None, chunk_size)
        assert torch.allclose(got, expected, atol=2e-5, rtol=2e-5), name
    blocks = tables[-1]
    start, n = 3, 19  # positions 3 .. 21
    q_pos = torch.arange(start, start + n, device=DEVICE)
    chunk = torch.randn(n, H, hd, generator=gen).to(DEVICE)
    mask = causal_mask(q_pos[:, None], torch.arange(start + n, device=DEVICE)[None, :], chunk.dtype, None, None, 0,
                       chunk_size=chunk_size)
    got = F.scaled_dot_product_attention(chunk.transpose(0, 1)[None], gather_context(k, blocks, start + n)[None],
                                         gather_context(v, blocks, start + n)[None], attn_mask=mask, scale=0.3,
                                         enable_gqa=True)[0].transpose(0, 1)
    expected = paged_attention_reference(chunk, k, v, blocks[None].expand(n, -1), q_pos, 0.3, chunk_size=chunk_size)
    assert torch.allclose(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(4, 2, 16, 4, None, "cap"), (8, 2, 16, 8, 6, "cap"),
                                  (8, 2, 16, 4, 6, "sinks"), (4, 4, 8, 8, None, "sinks"), (8, 2, 16, 4, None, 7),
                                  (4, 2, 16, 8, None, 16)])
def test_the_triton_prefill_kernel_runs_every_chunk_of_a_step_against_the_oracle(case, dtype):
    """One launch over chunks of several sequences: whole prompts, chunks after cached tokens (a
    prefix hit or chunked prefill), lengths across query blocks and key tiles, scattered block
    tables; every chunk's rows against the oracle, and rows of no chunk left as they were."""
    from loramux.server.ops.triton_attention import paged_prefill_triton

    H, KV, hd, bs, window, extra = case
    alibi, cap = extra is True, 1.5 if extra == "cap" else None
    sinks = (torch.randn(H, generator=torch.Generator().manual_seed(3)) * 2 + 1).to(DEVICE) if extra == "sinks" else None
    chunk_size = extra if type(extra) is int else None  # Llama 4's chunked attention
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    k, v = _pool(48, bs, KV, hd, dtype, gen)
    spans = [(0, 5), (3 * bs + 1, 20), (0, 40), (bs, 1), (2, 33)]  # (start position, tokens)
    T = sum(n for _, n in spans) + 3  # three decode rows after the chunks, which the kernel must not touch
    q = (torch.randn(T, H, hd, generator=gen) / hd**0.25).to(dtype).to(DEVICE)
    slopes = (torch.rand(H, generator=gen) * 0.5).to(DEVICE) if alibi else None
    order = torch.randperm(48, generator=gen).tolist()
    chunks, blocks, tables, row = [], [], [], 0
    for start, n in spans:
        nb = -(-(start + n) // bs)
        chunks.append((row, n, start, len(blocks)))
        own, order = order[:nb], order[nb:]
        blocks += own
        tables.append(own)
        row += n
    out = torch.full((T, H, hd), 7.0, dtype=dtype, device=DEVICE)
    qv = torch.cat([q, q], dim=2)[:, :, :hd]  # a strided view, as q is of qkv's columns
    paged_prefill_triton(out, qv, k, v, torch.tensor(blocks, device=DEVICE), torch.tensor(chunks, device=DEVICE),
                         max(n for _, n in spans), 0.3, window, slopes, cap, sinks, chunk_size)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for (row, n, start, _), own in zip(chunks, tables, strict=True):
        pos = torch.arange(start, start + n, device=DEVICE)
        expected = paged_attention_reference(q[row : row + n], k, v, torch.tensor(own, device=DEVICE)[None].expand(n, -1),
                                             pos, 0.3, window, slopes, cap, sinks, chunk_size).float()
        assert torch.allclose(out[row : row + n].float(), expected, atol=tol, rtol=tol), (start, n)
    assert (out[row + n :] == 7).all()
