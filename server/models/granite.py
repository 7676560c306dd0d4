"""IBM Granite (``GraniteForCausalLM``: Granite 3.x dense) and HyperCLOVA X (``HyperCLOVAXForCausalLM``)
over a flat token batch: the Llama decoder with four scalars of its config.

- ``embedding_multiplier`` scales the token embedding, its LoRA delta and an adapter's trained copy
  with it (PEFT's sit inside the embedding module, before the scaling).
- ``residual_multiplier`` scales each attention and MLP output before it joins the residual stream.
- ``attention_multiplier`` is the attention's scale, in place of head_dim ** -0.5.
- ``logits_scaling`` divides the logits, after LoRA on lm_head (``ServingModel.logit_divisor``).

HyperCLOVA X (Granite's layer and scalars) multiplies the logits by ``logits_scaling`` instead, and
where ``use_post_norm`` norms each block's output (``post_norm1``, ``post_norm2``) before its
residual scaling.

GraniteSWA (``GraniteSWAForCausalLM``) is Granite with attention sinks (LlamaLayer takes them),
local (``sliding_attention``) and global layers, and RoPE of each layer's own base
(``layer_rope_theta``; 0: no RoPE in that layer): ``LayerThetaRoPE``.
"""

from __future__ import annotations

import torch

from .batch import StepBatch
from .layers import FlatAttention
from .llama import LlamaForServing, LlamaLayer, _head_dim, fast_norm, sliding_window


class GraniteLayer(LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.residual_multiplier = config.residual_multiplier

    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        return FlatAttention(layer, config.num_attention_heads, config.num_key_value_heads, _head_dim(config),
                             sliding_window=sliding_window(config, layer), scale=config.attention_multiplier)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.attend(self.input_layernorm(h), batch, kv, apply_lora) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora) * self.residual_multiplier


class GraniteForServing(LlamaForServing):
    LAYER = GraniteLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_divisor = self.config.logits_scaling

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch) * self.config.embedding_multiplier


class HyperCLOVAXLayer(GraniteLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_norm1, self.post_norm2 = fast_norm(hf_layer.post_norm1), fast_norm(hf_layer.post_norm2)  # or Identity

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.post_norm1(self.attend(self.input_layernorm(h), batch, kv, apply_lora)) * self.residual_multiplier
        return h + self.post_norm2(self.mlp(self.post_attention_layernorm(h), batch, apply_lora)) * self.residual_multiplier


class HyperCLOVAXForServing(GraniteForServing):
    LAYER = HyperCLOVAXLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_divisor, self.logit_multiplier = None, self.config.logits_scaling


class LayerThetaRoPE:
    """RoPE tables by each layer's own base (``layer_rope_theta``), each as the Hugging Face model's
    rotary module for that base computes it; a layer whose base is 0 turns nothing (LlamaLayer's
    ``use_rope``) and is given the global table, unused."""

    @staticmethod
    def rope_kinds(config) -> list:
        return [theta or None for theta in config.layer_rope_theta]

    def rope_table(self, inner, max_model_len: int, kind):
        if kind is None:
            return super().rope_table(inner, max_model_len, None)
        rotary = next(r for r in inner.rotary_embs if r.config.rope_parameters["rope_theta"] == kind)
        return self.rotary_table(rotary, max_model_len)


class GraniteSWAForServing(LayerThetaRoPE, GraniteForServing):
    pass
