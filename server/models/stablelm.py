"""StableLM (``StableLmForCausalLM``: StableLM 2, StableLM 3B 4E1T) over a flat token batch: the
Llama decoder with LayerNorms (the model's own modules), RoPE on part of each head, optional q/k/v
biases, and two options of its config:

- ``use_parallel_residual``: one LayerNorm before attention and the MLP side by side,
  h + attention(x) + mlp(x) of x = ln(h), summed in that order as Hugging Face sums them;
- ``qk_layernorm``: q and k normed per head, each head by a LayerNorm of its own (the model's module).
"""

from __future__ import annotations

import torch

from .llama import LlamaForServing, LlamaLayer


class StableLmLayer(LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        attn = hf_layer.self_attn
        if config.qk_layernorm:  # [T, heads, head_dim] split by head, as the module splits its dim 1
            self.q_norm, self.k_norm = attn.q_layernorm, attn.k_layernorm
        self.parallel = config.use_parallel_residual


class StableLmForServing(LlamaForServing):
    LAYER = StableLmLayer
