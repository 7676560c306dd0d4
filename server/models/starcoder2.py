"""StarCoder2 (``Starcoder2ForCausalLM``) over a flat token batch: the Llama decoder with
LayerNorms, biases on every projection (``use_bias``), a plain MLP (``c_fc``, ``c_proj``) and a
sliding window (``sliding_window``)."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, PlainMLPLayer, attention_targets, mlp_targets


class Starcoder2Layer(PlainMLPLayer):
    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_layernorm, self.post_attention_layernorm = hf_layer.input_layernorm, hf_layer.post_attention_layernorm
        self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        self.o_proj = FusedLoRALinear.from_linears([attn.o_proj], ("o_proj",), layer, int8)
        self.up = FusedLoRALinear.from_linears([mlp.c_fc], ("c_fc",), layer, int8)
        self.down = FusedLoRALinear.from_linears([mlp.c_proj], ("c_proj",), layer, int8)
        self.q_norm = self.k_norm = None
        self.act = ACT2FN[config.hidden_act]
        self.init_attention(config, layer, cos, sin)


class Starcoder2ForServing(LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = Starcoder2Layer

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config), **mlp_targets(config, ("c_fc",), "c_proj")}
