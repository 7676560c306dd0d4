"""OLMo 1, 2 and 3 (``OlmoForCausalLM``, ``Olmo2ForCausalLM``, ``Olmo3ForCausalLM``) and EXAONE 4.0
(``Exaone4ForCausalLM``) over a flat token batch: the Llama decoder with its norms changed.

- OLMo 1: LayerNorms without weights (the model's own modules, in float32), and ``clip_qkv``: q, k
  and v (LoRA included, as PEFT's sits inside each projection) clamped to [-clip, clip].
- OLMo 2 and 3: no norm before attention or the MLP: each block's output is normed
  (``post_attention_layernorm``, ``post_feedforward_layernorm``) before it joins the residual
  stream; q and k are each normed over all heads' dims at once (RMSNorm of width heads x head_dim)
  after their projections, LoRA included, and before RoPE (``LlamaLayer.qk_norm_whole``).
- OLMo 3: local layers (``layer_types``) attend within a window, and each layer type has a RoPE of
  its own (``LlamaForServing``'s tables by type).
- EXAONE 4.0: OLMo 2's norms after each block, but q and k normed per head (Qwen3's); with a
  window set, local layers attend within it and turn q and k by RoPE, global ones do neither.
"""

from __future__ import annotations

import torch

from .batch import StepBatch
from .llama import LlamaForServing, LlamaLayer, fast_norm


class OlmoLayer(LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.clip = config.clip_qkv

    def qkv_heads(self, qkv: torch.Tensor, batch: StepBatch):
        return super().qkv_heads(qkv if self.clip is None else qkv.clamp(-self.clip, self.clip), batch)


class OlmoForServing(LlamaForServing):
    LAYER = OlmoLayer


class Olmo2Layer(LlamaLayer):
    qk_norm_whole = True

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_feedforward_layernorm = fast_norm(hf_layer.post_feedforward_layernorm)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.post_attention_layernorm(self.attend(h, batch, kv, apply_lora))
        return h + self.post_feedforward_layernorm(self.mlp(h, batch, apply_lora))


class Olmo2ForServing(LlamaForServing):
    LAYER = Olmo2Layer


def exaone_rope(config, layer: int) -> bool:
    """EXAONE's: with a window set, only the local layers turn q and k by RoPE."""
    return config.sliding_window is None or config.layer_types[layer] == "sliding_attention"


class Exaone4Layer(Olmo2Layer):
    qk_norm_whole = False

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.use_rope = exaone_rope(config, layer)


class Exaone4ForServing(LlamaForServing):
    LAYER = Exaone4Layer
