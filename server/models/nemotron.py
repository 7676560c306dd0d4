"""Llama decoders whose MLP has no gate, down(act(up x)): Nemotron (``NemotronForCausalLM``:
Nemotron-3, Minitron), Arcee (``ArceeForCausalLM``: AFM-4.5B) and Jais 2 (``Jais2ForCausalLM``),
whose act is relu2, relu(x)^2, and Apertus (``ApertusForCausalLM``), whose xIELU has trained
parameters (the model's own module runs it).

- The MLP's projections are ``up_proj`` and ``down_proj`` (LoRA targets of their own).
- Nemotron: LayerNorms of (1 + w), with biases (the model's own modules, ``NemotronLayerNorm1P``),
  RoPE on the first ``partial_rotary_factor`` of each head's dims, optional biases on attention
  and the MLP.
- Jais 2: LayerNorms, biases.
- Apertus: its norms named ``attention_layernorm`` and ``feedforward_layernorm``, q and k normed
  per head before RoPE (Qwen3's).
"""

from __future__ import annotations

import torch

from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, PlainMLPLayer, attention_targets, fast_norm, mlp_targets


class UngatedLayer(PlainMLPLayer):
    UP, DOWN = "up_proj", "down_proj"  # the MLP's two linears (nanochat's: fc1, fc2)

    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.up = FusedLoRALinear.from_linears([getattr(mlp, self.UP)], (self.UP,), layer, int8)
        self.down = FusedLoRALinear.from_linears([getattr(mlp, self.DOWN)], (self.DOWN,), layer, int8)


class UngatedForServing(LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = UngatedLayer

    @classmethod
    def lora_targets(cls, config):
        return {**attention_targets(config), **mlp_targets(config, (cls.LAYER.UP,), cls.LAYER.DOWN)}


class ApertusLayer(UngatedLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.input_layernorm = fast_norm(hf_layer.attention_layernorm)
        self.post_attention_layernorm = fast_norm(hf_layer.feedforward_layernorm)


class ApertusForServing(UngatedForServing):
    LAYER = ApertusLayer
