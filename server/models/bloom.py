"""BLOOM over a flat token batch: ALiBi instead of position embeddings, an embedding LayerNorm,
and ``query_key_value`` fused with each head's q, k, v interleaved ([heads, 3, head_dim])."""

from __future__ import annotations

import torch
from torch import nn

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, alibi_slopes, qkv_dense_projections, qkv_dense_targets


class BloomLayer(nn.Module):
    def __init__(self, block, config, layer: int, slopes: torch.Tensor, int8: bool = False):
        super().__init__()
        attn, mlp = block.self_attention, block.mlp
        self.input_layernorm, self.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        self.qkv, self.dense, self.up, self.down = qkv_dense_projections(attn, mlp, layer, int8)
        self.gelu = mlp.gelu_impl
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        heads = config.num_attention_heads
        self.head_shape = (heads, config.hidden_size // heads)
        self.attention = FlatAttention(layer, heads, heads, self.head_shape[1], slopes=slopes)

    def lora_modules(self):
        return [self.qkv, self.dense, self.up, self.down]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        T = h.shape[0]
        x = self.input_layernorm(h)
        q, k, v = self.qkv(x, batch.lora, apply_lora).view(T, self.head_shape[0], 3, -1).unbind(2)
        h = (x if self.post_ln_residual else h) + self.dense(self.attention(q, k, v, batch, kv), batch.lora, apply_lora)
        x = self.post_attention_layernorm(h)
        residual = x if self.post_ln_residual else h
        return residual + self.down(self.gelu(self.up(x, batch.lora, apply_lora)), batch.lora, apply_lora)


class BloomForServing(ServingModel):
    EMBEDDING = ("transformer.word_embeddings", "word_embeddings")

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        t = hf_model.transformer
        self.word_embeddings, self.embed_norm = t.word_embeddings, t.word_embeddings_layernorm
        self.final_norm, self.lm_head = t.ln_f, hf_model.lm_head
        heads = config.num_attention_heads
        slopes = alibi_slopes(heads).to(self.lm_head.weight.device)
        self.layers = nn.ModuleList(BloomLayer(block, config, i, slopes, int8) for i, block in enumerate(t.h))
        self.kv_spec = (config.num_hidden_layers, heads, config.hidden_size // heads)

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        return qkv_dense_targets("transformer.h.{i}.self_attention.", "transformer.h.{i}.mlp.", d, 3 * d, 4 * d)

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_norm(self.embed_with_lora(batch))
