"""GLM (``GlmForCausalLM``: GLM-4-9B-0414's predecessors, glm-4-9b-chat-hf) and GLM-4
(``Glm4ForCausalLM``: GLM-4-9B-0414, GLM-Z1) over a flat token batch: ERNIE 4.5's decoder
(RoPE on interleaved pairs of dims, here of the first ``partial_rotary_factor`` of each head) with

- the MLP's gate and up projections stored as one linear, ``gate_up_proj`` (a LoRA target whole);
- q/k/v biases (``attention_bias``), none on ``o_proj``;
- GLM-4: "sandwich" norms, each block's output normed (``post_self_attn_layernorm``,
  ``post_mlp_layernorm``) before it joins the residual stream, besides the norms before them.
"""

from __future__ import annotations

import torch

from .batch import StepBatch
from .ernie import Ernie4_5ForServing, Ernie4_5Layer
from .llama import ATTN_KINDS, attention_targets, fast_norm, mlp_targets


class GlmForServing(Ernie4_5ForServing):
    FUSED_KINDS = (ATTN_KINDS,)

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config), **mlp_targets(config, ("gate_up_proj",), "down_proj", fused=2)}


class Glm4Layer(Ernie4_5Layer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_self_attn_layernorm = fast_norm(hf_layer.post_self_attn_layernorm)
        self.post_mlp_layernorm = fast_norm(hf_layer.post_mlp_layernorm)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.post_self_attn_layernorm(self.attend(self.input_layernorm(h), batch, kv, apply_lora))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h), batch, apply_lora))


class Glm4ForServing(GlmForServing):
    LAYER = Glm4Layer
