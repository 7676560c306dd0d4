"""Building blocks shared by the model families: fused LoRA-aware linears and flat-batch attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import SlotKVCache
from ..ops import LoRAPlan
from .batch import StepBatch


class FusedLoRALinear(nn.Module):
    """Several linear layers sharing one input, computed as one matmul:
        y[:, slice_k] = x @ W_k.T + b_k + LoRA_k(x)   for each fused kind k
    x: [T, in] -> y: [T, sum(out_k)]. ``weights`` are [out_k, in] (transpose Conv1D weights first).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], kinds: tuple[str, ...],
                 layer: int):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = nn.Parameter(
                torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                           for b, w in zip(biases, weights, strict=True)]),
                requires_grad=False,
            )
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + w.shape[0])
        self.slices = tuple(slice(bounds[i], bounds[i + 1]) for i in range(len(weights)))
        self.kinds = kinds
        self.layer = layer
        self.stores: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # per kind: (a_store, b_store)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], kinds: tuple[str, ...], layer: int) -> FusedLoRALinear:
        return cls([m.weight for m in linears], [m.bias for m in linears], kinds, layer)

    @classmethod
    def from_conv1d(cls, conv, kind: str, layer: int) -> FusedLoRALinear:
        """GPT-2's Conv1D keeps its weight as [in, out] (PEFT's fan_in_fan_out)."""
        return cls([conv.weight.T.contiguous()], [conv.bias], (kind,), layer)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: (self.weight.shape[1], sl.stop - sl.start) for k, sl in zip(self.kinds, self.slices, strict=True)}

    def forward(self, x: torch.Tensor, plans: dict[str, LoRAPlan], apply_lora) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for kind, sl, (a_store, b_store) in zip(self.kinds, self.slices, self.stores, strict=True):
            plan = plans[kind]
            if not plan.empty:
                apply_lora(y[:, sl], x, a_store, b_store, plan)
        return y


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes, one per head: a geometric series from 2^(-8/n) (Press et al.)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = torch.pow(torch.tensor(extra_base), torch.arange(1, 1 + 2 * (num_heads - closest), 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class FlatAttention(nn.Module):
    """Causal attention of a flat batch against the slot KV cache of one layer.

    q: [T, H, hd], k, v: [T, KV, hd] (new tokens, already position-encoded) -> [T, H * hd].
    Options: ``scale`` (None: hd^-0.5), a ``sliding_window`` (keys q_pos - window < k_pos <= q_pos),
    and ALiBi ``slopes`` [H] (score += slope_h * k_pos; constant per query row, as BLOOM adds it).
    """

    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None, slopes: torch.Tensor | None = None):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.register_buffer("slopes", slopes, persistent=False)

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype, head_dim_at: int) -> torch.Tensor:
        """q_pos [q, 1], k_pos [1, k] -> bool mask [q, k], or with ALiBi an additive float mask with a
        head dimension inserted at ``head_dim_at`` (0: [H, q, k] for prefill; 1: [q, H, k] for decode)."""
        allowed = k_pos <= q_pos
        if self.sliding_window is not None:
            allowed &= k_pos > q_pos - self.sliding_window
        if self.slopes is None:
            return allowed
        # [H, k], constant over queries; built in float32, rounded once to the compute dtype
        bias = (self.slopes.float()[:, None] * k_pos.float()).to(dtype)
        bias, allowed = bias.unsqueeze(1 - head_dim_at), allowed.unsqueeze(head_dim_at)
        return torch.where(allowed, bias, float("-inf"))

    def _decode_mask(self, batch: StepBatch, dtype) -> torch.Tensor:
        """[span, 1 or H, 1, ctx]; built once per step for each (window, ALiBi) and shared by layers."""
        key = ("decode", self.sliding_window, None if self.slopes is None else id(self.slopes))
        mask = batch.masks.get(key)
        if mask is None:
            device = batch.decode_slots.device
            lengths = torch.ones(batch.decode_span, dtype=torch.long, device=device)  # idle slots see key 0
            lengths[batch.decode_slots] = batch.decode_lengths
            k_pos = torch.arange(batch.decode_ctx, device=device)[None, :]
            mask = self._mask((lengths - 1)[:, None], k_pos, dtype, head_dim_at=1)  # [span, ctx] | [span, H, ctx]
            mask = mask[:, None, None, :] if self.slopes is None else mask[:, :, None, :]
            batch.masks[key] = mask
        return mask

    def forward(self, q, k, v, batch: StepBatch, kv: SlotKVCache) -> torch.Tensor:
        k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]  # [slots, kv_heads, max_len, hd]
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v
        size = self.num_heads * self.head_dim
        gqa = self.num_heads != self.num_kv_heads
        out = q.new_empty(q.shape[0], size)
        for seq in batch.prefill:
            # queries [1, H, n, hd] over the slot's keys [1, KV, ctx, hd]
            ctx = seq.start_pos + seq.num_tokens
            rows = slice(seq.row_start, seq.row_start + seq.num_tokens)
            key = ("prefill", seq.row_start, self.sliding_window, None if self.slopes is None else id(self.slopes))
            mask = batch.masks.get(key)
            if mask is None:  # once per step and chunk, shared by layers
                q_pos = torch.arange(seq.start_pos, ctx, device=q.device)[:, None]
                mask = self._mask(q_pos, torch.arange(ctx, device=q.device)[None, :], q.dtype, head_dim_at=0)
                batch.masks[key] = mask
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], k_cache[seq.slot : seq.slot + 1, :, :ctx],
                v_cache[seq.slot : seq.slot + 1, :, :ctx], attn_mask=mask, scale=self.scale, enable_gqa=gqa,
            )
            out[rows] = o[0].transpose(0, 1).reshape(seq.num_tokens, size)
        num_decode = batch.decode_slots.numel()
        if num_decode:
            # All decode rows in one call over a view of slots [0, span): no KV copy.
            span, ctx = batch.decode_span, batch.decode_ctx
            qd = q.new_zeros(span, self.num_heads, 1, self.head_dim)
            qd[batch.decode_slots] = q[batch.num_prefill_rows :, :, None]
            o = F.scaled_dot_product_attention(
                qd, k_cache[:span, :, :ctx], v_cache[:span, :, :ctx], attn_mask=self._decode_mask(batch, q.dtype),
                scale=self.scale, enable_gqa=gqa,
            )
            out[batch.num_prefill_rows :] = o[batch.decode_slots].reshape(num_decode, size)
        return out


class PreLNBlock(nn.Module):
    """A GPT-style pre-LayerNorm block with a fused q|k|v projection and a two-layer MLP:
        h += out(attn(qkv(ln_1(h))));  h += proj(act(fc(ln_2(h))))
    Shared by GPT-2 and GPT-Neo, which differ only in module names, Conv1D weights and attention."""

    def __init__(self, ln_1, ln_2, qkv: FusedLoRALinear, out: FusedLoRALinear, fc: FusedLoRALinear,
                 proj: FusedLoRALinear, act, attention: FlatAttention):
        super().__init__()
        self.ln_1, self.ln_2, self.qkv, self.out, self.fc, self.proj = ln_1, ln_2, qkv, out, fc, proj
        self.act, self.attention = act, attention
        self.head_shape = (attention.num_heads, attention.head_dim)

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.out, self.fc, self.proj]

    def forward(self, h, batch: StepBatch, kv: SlotKVCache, apply_lora):
        T = h.shape[0]
        q, k, v = self.qkv(self.ln_1(h), batch.lora, apply_lora).view(T, 3, *self.head_shape).unbind(1)
        h = h + self.out(self.attention(q, k, v, batch, kv), batch.lora, apply_lora)
        return h + self.proj(self.act(self.fc(self.ln_2(h), batch.lora, apply_lora)), batch.lora, apply_lora)
