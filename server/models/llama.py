"""Llama-family decoder (LLaMA, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2) over a flat token batch.

Built from a loaded Hugging Face model, sharing its embedding, norms and lm_head, with the
attention and MLP projections fused (q|k|v and gate|up) so that a step makes few large matmuls.
Grouped-query attention, RoPE (any HF scaling: the cos/sin table comes from HF's own rotary
module), Qwen2's q/k/v biases, Qwen3's per-head RMSNorm of q and k (before RoPE) and sliding
windows (Mistral's, or per layer as Qwen3's ``layer_types``), and Phi-3's single q|k|v and gate|up
linears (LoRA targets of their own) with RoPE on part of each head, are handled here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear

ATTN_KINDS = ("q_proj", "k_proj", "v_proj")
MLP_UP_KINDS = ("gate_proj", "up_proj")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin, rotary: int):
    """x [T, heads, hd] with RoPE on its first ``rotary`` dims of each head (cos, sin [T, 1, rotary])."""
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned = x[..., :rotary]
    return torch.cat((turned * cos + _rotate_half(turned) * sin, x[..., rotary:]), dim=-1)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config, layer: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] != "sliding_attention":
        return None
    return window


class LlamaLayer(nn.Module):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        if hasattr(attn, "qkv_proj"):  # Phi-3: one linear each, one LoRA target each
            self.qkv = FusedLoRALinear.from_linears([attn.qkv_proj], ("qkv_proj",), layer, int8)
            self.gate_up = FusedLoRALinear.from_linears([mlp.gate_up_proj], ("gate_up_proj",), layer, int8)
        else:
            self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
            self.gate_up = FusedLoRALinear.from_linears([mlp.gate_proj, mlp.up_proj], MLP_UP_KINDS, layer, int8)
        self.o_proj = FusedLoRALinear.from_linears([attn.o_proj], ("o_proj",), layer, int8)
        self.down_proj = FusedLoRALinear.from_linears([mlp.down_proj], ("down_proj",), layer, int8)
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3
        self.act = ACT2FN[getattr(config, "hidden_activation", None) or config.hidden_act]  # Gemma's name for it
        hd = _head_dim(config)
        self.shape_q = (config.num_attention_heads, hd)
        self.shape_kv = (config.num_key_value_heads, hd)
        self.attention = self.make_attention(config, layer)
        self.cos, self.sin = cos, sin  # [max_len, rotary dim], shared by all layers
        self.rotary = cos.shape[-1]  # the first dims of each head RoPE turns: all, or Phi-3's partial_rotary_factor

    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        return FlatAttention(layer, config.num_attention_heads, config.num_key_value_heads, _head_dim(config),
                             sliding_window=sliding_window(config, layer))

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.attend(self.input_layernorm(h), batch, kv, apply_lora)
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora)

    def attend(self, x, batch: StepBatch, kv, apply_lora):
        """Attention of the normed input x [T, hidden], through o_proj."""
        T = x.shape[0]
        qkv = self.qkv(x, batch.lora, apply_lora)
        q_size, kv_size = self.shape_q[0] * self.shape_q[1], self.shape_kv[0] * self.shape_kv[1]
        q = qkv[:, :q_size].view(T, *self.shape_q)
        k = qkv[:, q_size : q_size + kv_size].view(T, *self.shape_kv)
        v = qkv[:, q_size + kv_size :].view(T, *self.shape_kv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.cos[batch.positions][:, None], self.sin[batch.positions][:, None]  # [T, 1, rotary]
        q, k = _rope(q, cos, sin, self.rotary), _rope(k, cos, sin, self.rotary)
        return self.o_proj(self.attention(q, k, v, batch, kv), batch.lora, apply_lora)

    def mlp(self, x, batch: StepBatch, apply_lora):
        """down(act(gate x) * up x) of the normed input x."""
        gate_up = self.gate_up(x, batch.lora, apply_lora)
        inter = gate_up.shape[1] // 2
        return self.down_proj(self.act(gate_up[:, :inter]) * gate_up[:, inter:], batch.lora, apply_lora)


class LlamaForServing(ServingModel):
    EMBEDDING = ("model.embed_tokens", "embed_tokens")
    FUSED_KINDS = (ATTN_KINDS, MLP_UP_KINDS)

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = hf_model.lm_head
        positions = torch.arange(max_model_len, device=self.lm_head.weight.device)
        dummy = self.lm_head.weight.new_empty(0)
        cos, sin = inner.rotary_emb(dummy, positions[None])  # [1, max_len, hd], computed as HF does
        self.register_buffer("cos", cos[0].to(dummy.dtype), persistent=False)
        self.register_buffer("sin", sin[0].to(dummy.dtype), persistent=False)
        self.layers = nn.ModuleList(LlamaLayer(layer, config, i, self.cos, self.sin, int8)
                                    for i, layer in enumerate(inner.layers))
        self.kv_spec = (config.num_hidden_layers, config.num_key_value_heads, _head_dim(config))

    @staticmethod
    def lora_targets(config):
        hidden, inter = config.hidden_size, config.intermediate_size
        q, kv = config.num_attention_heads * _head_dim(config), config.num_key_value_heads * _head_dim(config)
        attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
        return {"q_proj": (attn + "q_proj", hidden, q), "k_proj": (attn + "k_proj", hidden, kv),
                "v_proj": (attn + "v_proj", hidden, kv), "o_proj": (attn + "o_proj", q, hidden),
                "gate_proj": (mlp + "gate_proj", hidden, inter), "up_proj": (mlp + "up_proj", hidden, inter),
                "down_proj": (mlp + "down_proj", inter, hidden)}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch)


class Phi3ForServing(LlamaForServing):
    """Phi-3 and Phi-4-mini: q|k|v and gate|up stored as one linear each (``qkv_proj``,
    ``gate_up_proj``), which adapters target whole."""

    FUSED_KINDS = ()

    @staticmethod
    def lora_targets(config):
        hidden, inter = config.hidden_size, config.intermediate_size
        q, kv = config.num_attention_heads * _head_dim(config), config.num_key_value_heads * _head_dim(config)
        attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
        return {"qkv_proj": (attn + "qkv_proj", hidden, q + 2 * kv), "o_proj": (attn + "o_proj", q, hidden),
                "gate_up_proj": (mlp + "gate_up_proj", hidden, 2 * inter), "down_proj": (mlp + "down_proj", inter, hidden)}
