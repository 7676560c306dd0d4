"""Hunyuan dense (``HunYuanDenseV1ForCausalLM``: Hunyuan-0.5B to 7B): the Llama decoder with q and
k normed per head (``query_layernorm``, ``key_layernorm``) *after* RoPE, where Qwen3's norms come
before it. Its RoPE table is the model's own rotary module's (Hunyuan's fixed NTK alpha included)."""

from __future__ import annotations

import torch

from .llama import LlamaForServing, LlamaLayer, QKNormsAfterRoPE, fast_norm


class HunYuanDenseLayer(QKNormsAfterRoPE, LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        attn = hf_layer.self_attn
        self.q_norm_after, self.k_norm_after = fast_norm(attn.query_layernorm), fast_norm(attn.key_layernorm)


class HunYuanDenseForServing(LlamaForServing):
    LAYER = HunYuanDenseLayer
