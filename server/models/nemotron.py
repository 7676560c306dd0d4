"""Llama decoders whose MLP has no gate, down(act(up x)) (their act: relu2, relu(x)^2): Nemotron
(``NemotronForCausalLM``: Nemotron-3, Minitron) and Arcee (``ArceeForCausalLM``: AFM-4.5B).

- The MLP's projections are ``up_proj`` and ``down_proj`` (LoRA targets of their own).
- Nemotron: LayerNorms of (1 + w), with biases (the model's own modules, ``NemotronLayerNorm1P``),
  RoPE on the first ``partial_rotary_factor`` of each head's dims, optional biases on attention
  and the MLP.
"""

from __future__ import annotations

from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, PlainMLPLayer, attention_targets, mlp_targets


class UngatedLayer(PlainMLPLayer):
    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.up = FusedLoRALinear.from_linears([mlp.up_proj], ("up_proj",), layer, int8)
        self.down = FusedLoRALinear.from_linears([mlp.down_proj], ("down_proj",), layer, int8)


class UngatedForServing(LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = UngatedLayer

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config), **mlp_targets(config, ("up_proj",), "down_proj")}
