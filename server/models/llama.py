"""Llama-family decoder (LLaMA, Mistral, Qwen2, SmolLM2) over a flat token batch.

Built from a loaded Hugging Face model, sharing its embedding, norms and lm_head, with the
attention and MLP projections fused (q|k|v and gate|up) so that a step makes few large matmuls.
LoRA deltas are added to slices of the fused outputs by the op the backend seam selects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ...adapters.loader import LoRALayout
from ..kv_cache import SlotKVCache
from ..ops import LoRAPlan
from .batch import StepBatch

ATTN_KINDS = ("q_proj", "k_proj", "v_proj")
MLP_UP_KINDS = ("gate_proj", "up_proj")
LORA_KINDS = (*ATTN_KINDS, "o_proj", *MLP_UP_KINDS, "down_proj")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedLoRALinear(nn.Module):
    """Several linear layers sharing one input, computed as one matmul:
        y[:, slice_k] = x @ W_k.T + b_k + LoRA_k(x)   for each fused kind k
    x: [T, in] -> y: [T, sum(out_k)].
    """

    def __init__(self, linears: list[nn.Linear], kinds: tuple[str, ...], layer: int):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        biases = [m.bias for m in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = nn.Parameter(
                torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                           for b, m in zip(biases, linears, strict=True)]),
                requires_grad=False,
            )
        bounds = [0]
        for m in linears:
            bounds.append(bounds[-1] + m.out_features)
        self.slices = tuple(slice(bounds[i], bounds[i + 1]) for i in range(len(linears)))
        self.kinds = kinds
        self.layer = layer
        self.stores: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # per kind: (a_store, b_store)

    def forward(self, x: torch.Tensor, plans: dict[str, LoRAPlan], apply_lora) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for kind, sl, (a_store, b_store) in zip(self.kinds, self.slices, self.stores, strict=True):
            plan = plans[kind]
            if not plan.empty:
                apply_lora(y[:, sl], x, a_store, b_store, plan)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, config, layer: int):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.qkv = FusedLoRALinear([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer)
        self.o_proj = FusedLoRALinear([attn.o_proj], ("o_proj",), layer)
        self.gate_up = FusedLoRALinear([mlp.gate_proj, mlp.up_proj], MLP_UP_KINDS, layer)
        self.down_proj = FusedLoRALinear([mlp.down_proj], ("down_proj",), layer)
        self.act = ACT2FN[config.hidden_act]
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]

    def forward(self, h, cos, sin, batch: StepBatch, kv: SlotKVCache, apply_lora):
        T = h.shape[0]
        x = self.input_layernorm(h)
        qkv = self.qkv(x, batch.lora, apply_lora)
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin  # cos, sin: [T, 1, hd]
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]  # [slots, kv_heads, max_len, hd]
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v
        attn = self._attention(q, batch, k_cache, v_cache)  # [T, heads * hd]
        h = h + self.o_proj(attn, batch.lora, apply_lora)
        x = self.post_attention_layernorm(h)
        gate_up = self.gate_up(x, batch.lora, apply_lora)
        inter = gate_up.shape[1] // 2
        x = self.act(gate_up[:, :inter]) * gate_up[:, inter:]
        return h + self.down_proj(x, batch.lora, apply_lora)

    def _window_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal mask, narrowed to the sliding window when the model has one. [.., q, k] bool."""
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def _attention(self, q, batch: StepBatch, k_cache, v_cache) -> torch.Tensor:
        out = q.new_empty(q.shape[0], self.q_size)
        for seq in batch.prefill:
            # queries [1, H, n, hd] over the slot's keys [1, KV, ctx, hd]
            ctx = seq.start_pos + seq.num_tokens
            rows = slice(seq.row_start, seq.row_start + seq.num_tokens)
            q_pos = torch.arange(seq.start_pos, ctx, device=q.device)[:, None]
            mask = self._window_mask(q_pos, torch.arange(ctx, device=q.device)[None, :])
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], k_cache[seq.slot : seq.slot + 1, :, :ctx],
                v_cache[seq.slot : seq.slot + 1, :, :ctx], attn_mask=mask, scale=self.scale, enable_gqa=True,
            )
            out[rows] = o[0].transpose(0, 1).reshape(seq.num_tokens, self.q_size)
        num_decode = batch.decode_slots.numel()
        if num_decode:
            # All decode rows in one call over a view of slots [0, max slot]: no KV copy.
            span = int(batch.decode_slots.max()) + 1
            ctx = int(batch.decode_lengths.max())
            qd = q.new_zeros(span, self.num_heads, 1, self.head_dim)
            qd[batch.decode_slots] = q[batch.num_prefill_rows :, :, None]
            lengths = torch.ones(span, dtype=torch.long, device=q.device)
            lengths[batch.decode_slots] = batch.decode_lengths
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = self._window_mask((lengths - 1)[:, None], k_pos)[:, None, None, :]  # [span, 1, 1, ctx]
            o = F.scaled_dot_product_attention(
                qd, k_cache[:span, :, :ctx], v_cache[:span, :, :ctx], attn_mask=mask, scale=self.scale,
                enable_gqa=True,
            )
            out[batch.num_prefill_rows :] = o[batch.decode_slots].reshape(num_decode, self.q_size)
        return out


class LlamaForServing(nn.Module):
    """The frozen base model. ``forward(batch, kv, apply_lora) -> logits [N, vocab]``."""

    def __init__(self, hf_model, max_model_len: int):
        super().__init__()
        config = hf_model.config
        self.config = config
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.layers = nn.ModuleList(DecoderLayer(layer, config, i) for i, layer in enumerate(inner.layers))
        positions = torch.arange(max_model_len, device=self.lm_head.weight.device)
        dummy = self.lm_head.weight.new_empty(0)
        cos, sin = inner.rotary_emb(dummy, positions[None])  # [1, max_len, hd], computed as HF does
        self.register_buffer("cos", cos[0].to(dummy.dtype), persistent=False)
        self.register_buffer("sin", sin[0].to(dummy.dtype), persistent=False)
        hd = self.layers[0].head_dim
        self.kv_spec = (config.num_hidden_layers, config.num_key_value_heads, hd)

    @staticmethod
    def layout_from_config(config) -> LoRALayout:
        """LoRA targets and their (in, out) from the HF config alone: no weights needed."""
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                  "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        modules = {
            f"model.layers.{i}.{'mlp' if kind in (*MLP_UP_KINDS, 'down_proj') else 'self_attn'}.{kind}": (i, kind)
            for i in range(config.num_hidden_layers) for kind in LORA_KINDS
        }
        return LoRALayout(modules, shapes, config.num_hidden_layers)

    def lora_layout(self) -> LoRALayout:
        return self.layout_from_config(self.config)

    def bind_lora_stores(self, stores: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, layer in enumerate(self.layers):
            for fused in layer.lora_modules():
                fused.stores = tuple(stores[(i, kind)] for kind in fused.kinds)

    def forward(self, batch: StepBatch, kv: SlotKVCache, apply_lora) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, hidden]
        cos = self.cos[batch.positions][:, None]  # [T, 1, hd]
        sin = self.sin[batch.positions][:, None]
        for layer in self.layers:
            h = layer(h, cos, sin, batch, kv, apply_lora)
        h = self.norm(h[batch.logits_rows])
        return self.lm_head(h).float()  # [N, vocab]
