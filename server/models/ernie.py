"""Llama decoders with RoPE on interleaved pairs of each head's dims, as Cohere's, their table
taking each frequency twice in a row (Hugging Face's rotary module gives cat(freqs, freqs), which
their RoPE re-lays that way, unless it gives them in pairs already, as GLM-4.1V's does):

- ERNIE 4.5 dense (``Ernie4_5ForCausalLM``), with optional biases (``use_bias``);
- Helium (``HeliumForCausalLM``), its attention scaled by 1 / sqrt(head_dim) as Hugging Face
  computes it (not always head_dim^-0.5 to the last bit).
"""

from __future__ import annotations

import math

import torch

from .cohere import _rope_pairs
from .layers import FlatAttention
from .llama import LlamaForServing, LlamaLayer, _head_dim, _kv_heads, sliding_window


class Ernie4_5Layer(LlamaLayer):
    rope = staticmethod(_rope_pairs)


class Ernie4_5ForServing(LlamaForServing):
    LAYER = Ernie4_5Layer
    SIGNED_SIN = False

    def rope_table(self, inner, max_model_len: int, kind: str | None):
        table = super().rope_table(inner, max_model_len, kind)
        if all(torch.equal(t[:, 0::2], t[:, 1::2]) for t in table):  # in pairs already (GLM-4.1V's multimodal rotary)
            return table
        return tuple(t[:, : t.shape[1] // 2].repeat_interleave(2, dim=1) for t in table)


class HeliumLayer(Ernie4_5Layer):
    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        head_dim = _head_dim(config)
        return FlatAttention(layer, config.num_attention_heads, _kv_heads(config), head_dim,
                             scale=1 / math.sqrt(head_dim), sliding_window=sliding_window(config, layer))


class HeliumForServing(Ernie4_5ForServing):
    LAYER = HeliumLayer
