"""Phi (``PhiForCausalLM``: Phi-1, Phi-1.5, Phi-2) over a flat token batch.

- One LayerNorm before a parallel block: h + (dense(attention(x)) + fc2(act(fc1(x)))) of x = ln(h),
  summed in Hugging Face's order (attention, then MLP, then the residual).
- q, k and v are separate linears with biases (LoRA targets of their own, fused into one matmul
  here, as Llama's); the output projection is ``dense``; the MLP is not gated.
- RoPE on the first ``partial_rotary_factor`` of each head's dims; with ``qk_layernorm``, q and k
  each get a LayerNorm per head (one shared by all heads) before it.
- A LayerNorm before ``lm_head``, which has a bias.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, PlainMLPLayer, attention_targets, mlp_targets


class PhiLayer(PlainMLPLayer):
    """Its own projections and norms for ``LlamaLayer.attend`` (and ``init_attention``), with Phi's
    MLP and parallel block, summed in its own order. GPT-J's layer is the same under other names."""

    ATTN, NORM, OUT, UP, DOWN = "self_attn", "input_layernorm", "dense", "fc1", "fc2"  # the HF layer's modules
    ACT = "hidden_act"  # the config's activation

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        nn.Module.__init__(self)
        attn, mlp = getattr(hf_layer, self.ATTN), hf_layer.mlp
        self.input_layernorm = getattr(hf_layer, self.NORM)
        self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        self.o_proj, self.up, self.down = (FusedLoRALinear.from_linears([getattr(module, name)], (name,), layer, int8)
                                           for module, name in ((attn, self.OUT), (mlp, self.UP), (mlp, self.DOWN)))
        self.q_norm, self.k_norm = ((attn.q_layernorm, attn.k_layernorm) if getattr(config, "qk_layernorm", False)
                                    else (None, None))
        self.act = ACT2FN[getattr(config, self.ACT)]
        self.init_attention(config, layer, cos, sin)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        x = self.input_layernorm(h)
        return self.attend(x, batch, kv, apply_lora) + self.mlp(x, batch, apply_lora) + h


class PhiForServing(LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = PhiLayer
    FINAL_NORM = "final_layernorm"

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config, "dense"), **mlp_targets(config, ("fc1",), "fc2")}
