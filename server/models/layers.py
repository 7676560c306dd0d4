"""Building blocks shared by the model families: fused LoRA-aware linears and flat-batch attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import PagedKVCache
from ..ops import LoRAPlans
from ..ops.attention import causal_mask, eager_attention, gather_context
from ..ops.linear import Linear
from ..ops.quantize import Int8Linear, quantize_int8
from .batch import StepBatch


class FusedLoRALinear(nn.Module):
    """Several linear layers sharing one input, computed as one matmul:
        y[:, slice_k] = x @ W_k.T + b_k + LoRA_k(x)   for each fused kind k
    x: [T, in] -> y: [T, sum(out_k)]. ``weights`` are [out_k, in] (transpose Conv1D weights first).
    With ``int8`` (``--quantization int8``) the weight is kept as int8 with a float32 ``scale`` per
    output row, W served as weight * scale[:, None] (ops/quantize.py); no float copy is made.
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], kinds: tuple[str, ...],
                 layer: int, int8: bool = False):
        super().__init__()
        self.register_buffer("scale", None, persistent=False)  # [out] float32 when the weight is int8
        if int8:  # row by row, so each source weight's rows quantize as they would fused
            parts = [quantize_int8(w) for w in weights]
            self.weight = nn.Parameter(torch.cat([q for q, _ in parts]), requires_grad=False)
            self.scale = torch.cat([s for _, s in parts])
        else:
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
        self.bounds = tuple(bounds)  # output columns of kind j: bounds[j]:bounds[j + 1]
        self.kinds = kinds
        self.layer = layer
        self.linear: Linear = F.linear  # the base matmul (ServingModel.use_base_linear)
        self.int8_linear: Int8Linear | None = None  # the matmul of an int8 weight (ServingModel.use_base_linear)
        # the adapter pages of these kinds (bound by ``ServingModel.bind_lora_stores``):
        # a_store [P, len(kinds), in], b_store [P, bounds[-1]]
        self.a_store: torch.Tensor | None = None
        self.b_store: torch.Tensor | None = None

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], kinds: tuple[str, ...], layer: int,
                     int8: bool = False) -> FusedLoRALinear:
        return cls([m.weight for m in linears], [m.bias for m in linears], kinds, layer, int8)

    @classmethod
    def from_conv1d(cls, conv, kind: str, layer: int, int8: bool = False) -> FusedLoRALinear:
        """GPT-2's Conv1D keeps its weight as [in, out] (PEFT's fan_in_fan_out)."""
        return cls([conv.weight.T if int8 else conv.weight.T.contiguous()], [conv.bias], (kind,), layer, int8)

    def shapes(self) -> dict[str, tuple[int, int]]:
        b = self.bounds
        return {k: (self.weight.shape[1], b[j + 1] - b[j]) for j, k in enumerate(self.kinds)}

    def forward(self, x: torch.Tensor, plans: LoRAPlans, apply_lora) -> torch.Tensor:
        """One LoRA call per set of these kinds that the step's adapters target (usually one):
        each shrinks its kinds together, in one pass over x (and rescales DoRA adapters' rows)."""
        if self.scale is None:
            base = lambda: self.linear(x, self.weight, self.bias)  # noqa: E731
        else:  # int8 weights: never the one call (float32 weights only)
            base = lambda: self.int8_linear(x, self.weight, self.scale, self.bias)  # noqa: E731
        return with_lora(x, base, self.weight, self.bias, plans.get(self.kinds, ()), apply_lora, self.a_store,
                         self.b_store, self.bounds, self.bias)


def with_lora(x, base, weight, bias, entries, apply_lora, a_store, b_store, bounds, lora_bias) -> torch.Tensor:
    """``base()`` (x's linear by ``weight`` and ``bias``), then the LoRA of each (used, plan) of
    ``entries``: the first in one call with the linear where the op serves it (``with_linear``: the
    C++ op's decode rows beside the base tiles), the others after. ``lora_bias``: the linear's bias
    as DoRA's rescale sees it (None: none)."""
    y = None
    if entries and (with_linear := getattr(apply_lora, "with_linear", None)) is not None:
        used, plan = entries[0]
        y = with_linear(x, weight, bias, a_store, b_store, plan, bounds, used)
        entries = entries[1:] if y is not None else entries
    if y is None:
        y = base()
    for used, plan in entries:
        apply_lora(y, x, a_store, b_store, plan, bounds, used, lora_bias)
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
    """Causal attention of a flat batch against one layer of the block-paged KV cache.

    q: [T, H, hd], k, v: [T, KV, hd] (new tokens, already position-encoded) -> [T, H * hd].
    Options: ``scale`` (None: hd^-0.5), a ``sliding_window`` (keys q_pos - window < k_pos <= q_pos), an
    attention ``chunk_size`` (Llama 4's: keys of the query's own chunk of that many positions),
    ALiBi ``slopes`` [H] (score += slope_h * k_pos; constant per query row, as BLOOM adds it), and
    Gemma 2's ``softcap`` (score -> cap * tanh(score / cap)) and GPT-OSS's attention ``sinks`` [H]
    (a logit per head in the softmax's denominator, with no value): every decode backend and
    Triton's prefill take them; prefill on the CPU runs them in torch ops (``eager_attention``).
    The new K/V are written first; prefill chunks then run SDPA over exactly their own blocks (on
    CUDA, Triton's kernel runs them all in one call, straight from the cache), and all decode rows
    go through the cache's decode kernel in one call (ops/attention.py).
    """

    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 sliding_window: int | None = None, slopes: torch.Tensor | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, chunk_size: int | None = None):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window, self.softcap, self.chunk_size = sliding_window, softcap, chunk_size
        self.register_buffer("slopes", None if slopes is None else slopes.float(), persistent=False)
        self.register_buffer("sinks", None, persistent=False)
        self.set_sinks(sinks)

    def set_sinks(self, sinks: torch.Tensor | None) -> None:
        """The attention sinks [H] (None: none), float32 and contiguous, as every backend reads them."""
        self.sinks = None if sinks is None else sinks.detach().float().contiguous()

    def forward(self, q, k, v, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        kv.write(self.layer, batch.slot_mapping, k, v)
        k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]  # [blocks + 1, block_size, KV, hd]
        size = self.num_heads * self.head_dim
        gqa = self.num_heads != self.num_kv_heads
        slopes = None if self.slopes is None else self.slopes.float()
        out = q.new_empty(q.shape[0], size)
        chunks = batch.prefill
        if chunks and kv.prefill_attention is not None:  # every chunk in one call, from the cache
            kv.prefill_attention(out.view(-1, self.num_heads, self.head_dim), q, k_cache, v_cache, batch.prefill_blocks,
                                 batch.prefill_chunks, batch.longest_prefill, self.scale,
                                 self.sliding_window, slopes, self.softcap, self.sinks, self.chunk_size)
            chunks = ()
        for seq in chunks:
            # queries [1, H, n, hd] over the sequence's keys [1, KV, ctx, hd]
            ctx = seq.start_pos + seq.num_tokens
            rows = slice(seq.row_start, seq.row_start + seq.num_tokens)
            blocks = batch.prefill_blocks[seq.block_start : seq.block_start + seq.num_blocks]
            # A whole prompt with a plain causal mask (no cached prefix, window or ALiBi) takes SDPA's
            # is_causal path: on the CPU half the time of an explicit mask at 2k tokens.
            eager = self.softcap is not None or self.sinks is not None  # what SDPA cannot run
            plain = seq.start_pos == 0 and slopes is None and not eager and (
                self.sliding_window is None or ctx <= self.sliding_window) and (
                self.chunk_size is None or ctx <= self.chunk_size)
            mask = None
            if not plain:
                key = ("prefill", seq.row_start, self.sliding_window, self.chunk_size,
                       None if slopes is None else id(self.slopes))
                mask = batch.masks.get(key)
                if mask is None:  # once per step and chunk, shared by layers
                    q_pos = torch.arange(seq.start_pos, ctx, device=q.device)[:, None]
                    mask = causal_mask(q_pos, torch.arange(ctx, device=q.device)[None, :], q.dtype,
                                       self.sliding_window, slopes, head_dim_at=0, chunk_size=self.chunk_size)
                    batch.masks[key] = mask
            keys, values = gather_context(k_cache, blocks, ctx)[None], gather_context(v_cache, blocks, ctx)[None]
            if eager:
                o = eager_attention(q[rows].transpose(0, 1)[None], keys, values, mask[None] if slopes is not None
                                    else mask[None, None], self.scale, self.softcap, self.sinks)
            else:
                o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                   is_causal=plain, scale=self.scale, enable_gqa=gqa)
            out[rows] = o[0].transpose(0, 1).reshape(seq.num_tokens, size)
        num_decode = batch.decode_lengths.numel()
        if num_decode:
            rows = q[batch.num_prefill_rows :]
            o = kv.decode_attention(rows, k_cache, v_cache, batch.decode_tables, batch.decode_lengths,
                                    batch.decode_ctx, self.scale, self.sliding_window, slopes, batch.masks,
                                    self.softcap, self.sinks, self.chunk_size)
            out[batch.num_prefill_rows :] = o.reshape(num_decode, size)
        return out


def qkv_dense_projections(attn, mlp, layer: int, int8: bool = False) -> tuple[FusedLoRALinear, ...]:
    """BLOOM's, GPT-NeoX's and Falcon's projections, one LoRA target each: q|k|v
    (``query_key_value``), attention's output (``dense``) and the MLP's two (``dense_h_to_4h``,
    ``dense_4h_to_h``)."""
    return tuple(FusedLoRALinear.from_linears([module], (module_name,), layer, int8) for module, module_name in
                 ((attn.query_key_value, "query_key_value"), (attn.dense, "dense"),
                  (mlp.dense_h_to_4h, "dense_h_to_4h"), (mlp.dense_4h_to_h, "dense_4h_to_h")))


def qkv_dense_targets(attn: str, mlp: str, hidden: int, qkv: int, inter: int) -> dict[str, tuple[str, int, int]]:
    """Their ``lora_targets``: module name templates under ``attn`` and ``mlp``, q|k|v's width ``qkv``."""
    return {"query_key_value": (attn + "query_key_value", hidden, qkv), "dense": (attn + "dense", hidden, hidden),
            "dense_h_to_4h": (mlp + "dense_h_to_4h", hidden, inter),
            "dense_4h_to_h": (mlp + "dense_4h_to_h", inter, hidden)}


class PreLNBlock(nn.Module):
    """A GPT-style pre-LayerNorm block with a fused q|k|v projection and a two-layer MLP:
        h += out(attn(qkv(ln_1(h))));  h += proj(act(fc(ln_2(h))))
    Shared by GPT-2, GPT-Neo and GPTBigCode, which differ in module names, Conv1D weights, attention
    and how q, k, v lie in qkv's columns: ``split`` (qkv [T, q + 2 kv]) -> q [T, H, hd], k and v
    [T, KV, hd]; by default q, then k, then v, of H heads each."""

    def __init__(self, ln_1, ln_2, qkv: FusedLoRALinear, out: FusedLoRALinear, fc: FusedLoRALinear,
                 proj: FusedLoRALinear, act, attention: FlatAttention, split=None):
        super().__init__()
        self.ln_1, self.ln_2, self.qkv, self.out, self.fc, self.proj = ln_1, ln_2, qkv, out, fc, proj
        self.act, self.attention = act, attention
        head_shape = (attention.num_heads, attention.head_dim)
        self.split = split or (lambda qkv: qkv.view(qkv.shape[0], 3, *head_shape).unbind(1))

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.out, self.fc, self.proj]

    def forward(self, h, batch: StepBatch, kv: PagedKVCache, apply_lora):
        q, k, v = self.split(self.qkv(self.ln_1(h), batch.lora, apply_lora))
        h = h + self.out(self.attention(q, k, v, batch, kv), batch.lora, apply_lora)
        return h + self.proj(self.act(self.fc(self.ln_2(h), batch.lora, apply_lora)), batch.lora, apply_lora)
