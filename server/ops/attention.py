"""Attention over block-paged KV: the pure-torch oracle, the torch paths and the backend choice.

Shapes: q [R, H, hd]; k_cache, v_cache [NB, bs, KV, hd] (the KV heads are shared by H / KV query
heads); ``tables`` [R, MB] the block ids of each row's sequence; a row at position p attends to
key positions j with  max(0, p - window + 1) <= j <= p  (no window: from 0; with Llama 4's attention
``chunk_size`` C, also j >= floor(p / C) * C: only keys of the query's own chunk), key j stored at
block ``tables[r, j // bs]``, offset ``j % bs``:

    out[r, h] = sum_j softmax_j(scale * q[r, h] . k_j + slope_h * j) v_j

``slope_h`` is ALiBi's (BLOOM adds slope * key position: a per-row constant shift of the causal
bias); without ALiBi it is 0. Softmax and sums run in float32. Gemma 2 soft-caps the scores first:
s -> cap * tanh(s / cap) (every decode backend's ``softcap``). GPT-OSS and GraniteSWA add an
attention sink per head, ``sinks[h]``: one more logit in the softmax's denominator with no value,

    out[r, h] = sum_j e^(s_j) v_j / (e^(sinks[h]) + sum_j e^(s_j))

so a head can attend to nothing (every backend's ``sinks``; prefill in torch ops: ``eager_attention``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def paged_attention_reference(q, k_cache, v_cache, tables, positions, scale: float, window: int | None = None,
                              slopes: torch.Tensor | None = None, softcap: float | None = None,
                              sinks: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """The oracle: one row at a time, straight from the formula above."""
    R, H, hd = q.shape
    bs, KV = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for r in range(R):
        p = int(positions[r])
        lo = 0 if window is None else max(0, p - window + 1)
        if chunk_size is not None:
            lo = max(lo, p // chunk_size * chunk_size)
        j = torch.arange(lo, p + 1)
        blocks = tables[r].cpu()[j // bs]
        k = k_cache[blocks.to(k_cache.device), (j % bs).to(k_cache.device)].float()  # [n, KV, hd]
        v = v_cache[blocks.to(v_cache.device), (j % bs).to(v_cache.device)].float()
        for h in range(H):
            kvh = h // (H // KV)
            s = scale * (k[:, kvh] @ q[r, h].float())
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            if slopes is not None:
                s = s + slopes[h].float().cpu().to(s.device) * j.to(s.device).float()
            if sinks is not None:  # the sink's weight is dropped: it has no value
                probs = torch.softmax(torch.cat([s, sinks[h].float().reshape(1).to(s.device)]), 0)[:-1]
            else:
                probs = torch.softmax(s, 0)
            out[r, h] = (probs @ v[:, kvh]).to(q.dtype)
    return out


def gather_context(cache: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    """One sequence's first ``ctx`` positions of one layer's cache: [KV, ctx, hd] (an unpadded copy
    of exactly its blocks; prefill's SDPA then runs on it)."""
    return cache.index_select(0, blocks).flatten(0, 1)[:ctx].transpose(0, 1)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype, window: int | None, slopes, head_dim_at: int,
                chunk_size: int | None = None):
    """q_pos [q, 1], k_pos [1, k] -> bool mask [q, k], or with ALiBi an additive float mask with a
    head dimension inserted at ``head_dim_at`` (0: [H, q, k]; 1: [q, H, k])."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    if chunk_size is not None:
        allowed &= k_pos // chunk_size == q_pos // chunk_size
    if slopes is None:
        return allowed
    bias = (slopes.float()[:, None] * k_pos.float()).to(dtype)  # [H, k]: built in float32, rounded once
    bias, allowed = bias.unsqueeze(1 - head_dim_at), allowed.unsqueeze(head_dim_at)
    return torch.where(allowed, bias, float("-inf"))


def eager_attention(q, k, v, mask, scale: float, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with its scores materialised, for what SDPA cannot do (HF's eager paths): Gemma 2's
    soft cap and GPT-OSS's sinks,
        s = cap * tanh(scale * q k^T / cap) (or scale * q k^T), masked;  out = softmax([s, sink_h])[:-1] v
    q [B, H, n, hd], k and v [B, KV, ctx, hd] (KV divides H), ``mask`` [B or 1, 1 or H, n, ctx]:
    bool (True: attend) or additive float (ALiBi's) -> [B, H, n, hd]. Scores and softmax in float32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if sinks is None:
        return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


def paged_decode_torch(q, k_cache, v_cache, tables, lengths, ctx: int, scale: float, window, slopes,
                       masks: dict, softcap: float | None = None, sinks: torch.Tensor | None = None,
                       chunk_size: int | None = None) -> torch.Tensor:
    """Decode rows (position = length - 1) with torch ops: gathers each row's blocks into a padded
    [D, KV, ctx, hd] copy. The fallback where no kernel is available, and a second oracle.
    ``softcap`` (Gemma 2's) and ``sinks`` [H] (GPT-OSS's) through ``eager_attention``."""
    D, H, hd = q.shape
    bs = k_cache.shape[1]
    nb = -(-ctx // bs)
    k = k_cache[tables[:, :nb]].flatten(1, 2)[:, :ctx].transpose(1, 2)  # [D, KV, ctx, hd]
    v = v_cache[tables[:, :nb]].flatten(1, 2)[:, :ctx].transpose(1, 2)
    key = ("decode", window, chunk_size, None if slopes is None else id(slopes))
    mask = masks.get(key)
    if mask is None:  # once per step, shared by the layers
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = causal_mask((lengths - 1)[:, None], k_pos, q.dtype, window, slopes, head_dim_at=1, chunk_size=chunk_size)
        mask = mask[:, None, None, :] if slopes is None else mask[:, :, None, :]
        masks[key] = mask
    if softcap is not None or sinks is not None:
        return eager_attention(q[:, :, None], k, v, mask, scale, softcap, sinks)[:, :, 0]
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=H != k_cache.shape[2])
    return o[:, :, 0]


DecodeAttention = Callable[..., torch.Tensor]
PrefillAttention = Callable[..., None]


@functools.cache
def _cpp_decode():
    from .cpu_kernel import load_kernels

    module = load_kernels()
    return None if module is None else module.paged_decode


def cpp_decode(q, k_cache, v_cache, tables, lengths, ctx, scale, window, slopes, masks, softcap=None, sinks=None,
               chunk_size=None):
    q = q.contiguous()  # [D, H, hd]: a small copy of the decode rows' queries (they are a view of qkv)
    out = torch.empty_like(q)
    none = q.new_empty(0, dtype=torch.float32)
    _cpp_decode()(out, q, k_cache, v_cache, tables, lengths, scale, window or 0,
                  slopes if slopes is not None else none, softcap or 0.0, sinks if sinks is not None else none,
                  chunk_size or 0)
    return out


def select_decode_attention(name: str, device) -> DecodeAttention:
    """Decode attention for an op backend on ``device`` (the same names as the LoRA ops):
    the C++ kernel on the CPU, the Triton kernel on CUDA, the torch gather otherwise."""
    device = torch.device(device)
    if name in ("cpp", "auto") and device.type == "cpu" and _cpp_decode() is not None:
        return cpp_decode
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from . import triton_available

        if triton_available(device):
            from .triton_attention import paged_decode_triton

            return paged_decode_triton
    return paged_decode_torch


def select_prefill_attention(name: str, device) -> PrefillAttention | None:
    """Prefill attention of every chunk of a step in one call, read from the paged cache: Triton's
    kernel where decode takes Triton's (CUDA, or ``triton`` under its interpreter); None elsewhere,
    where each chunk runs SDPA over a gathered copy of its context (layers.py)."""
    device = torch.device(device)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from . import triton_available

        if triton_available(device):
            from .triton_attention import paged_prefill_triton

            return paged_prefill_triton
    return None
