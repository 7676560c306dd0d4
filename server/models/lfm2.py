"""LFM2 (Liquid AI): a hybrid of attention layers and gated short-convolution layers.

Each layer mixes tokens by one of two operators under ``operator_norm``, then runs a SwiGLU MLP
(``feed_forward``: w1, w3, w2) under ``ffn_norm``:

- attention (``self_attn``): grouped-query attention with per-head RMSNorms of q and k
  (``q_layernorm``, ``k_layernorm``) before RoPE, and ``out_proj``; its K/V in the paged cache;
- a short convolution (``conv``): ``in_proj`` gives B, C and x [T, hidden] each, and
      y = out_proj(C * conv(B * x))
  with ``conv`` a depthwise causal convolution over the last ``conv_L_cache`` tokens of the
  sequence (ops/short_conv.py), whose last inputs are the sequence's recurrent state
  (recurrent_state.py): no K/V.

LFM2-MoE's layers past ``num_dense_layers`` replace the MLP by a mixture of experts (Hugging Face's
module on the step's rows, as moe.py runs them; transformers 5 stores the experts as 3-D
parameters, which PEFT's target_modules do not reach). The decoder's last norm is
``embedding_norm``. LoRA targets: q_proj, k_proj, v_proj, out_proj, in_proj, and w1, w3, w2 of the
dense MLPs (``out_proj`` is both mixers' output, one kind: its shape is the same).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops.short_conv import short_conv
from .base import RecurrentLayers
from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, LlamaLayer, attention_targets, fast_norm, mlp_targets
from .moe import DenseOrExperts

MLP_UP = ("w1", "w3")
CONV = "conv"  # the layer type of a short-convolution layer in the config's layer_types


def _intermediate(config) -> int:
    """The dense MLP's width, as Hugging Face's Lfm2MLP derives it from the config (LFM2-MoE's: as given)."""
    inter = config.intermediate_size
    if getattr(config, "block_auto_adjust_ff_dim", False):
        inter = int(2 * inter / 3)
        if config.block_ffn_dim_multiplier is not None:
            inter = int(config.block_ffn_dim_multiplier * inter)
            inter = config.block_multiple_of * -(-inter // config.block_multiple_of)
    return inter


def _dense(config, layer: int) -> bool:
    """Whether the layer's feed-forward is a dense MLP, not LFM2-MoE's experts (past num_dense_layers)."""
    return layer < getattr(config, "num_dense_layers", config.num_hidden_layers)


class FeedForward(DenseOrExperts):
    """LFM2's SwiGLU MLP (``feed_forward``: w1, w3, w2), or LFM2-MoE's experts."""

    DENSE = "w1"

    def init_dense(self, mlp, layer: int, int8: bool) -> None:
        self.gate_up = FusedLoRALinear.from_linears([mlp.w1, mlp.w3], MLP_UP, layer, int8)
        self.down_proj = FusedLoRALinear.from_linears([mlp.w2], ("w2",), layer, int8)
        self.act = F.silu


class Lfm2AttentionLayer(FeedForward, LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn = hf_layer.self_attn
        self.input_layernorm, self.post_attention_layernorm = fast_norm(hf_layer.operator_norm), fast_norm(hf_layer.ffn_norm)
        self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        self.o_proj = FusedLoRALinear.from_linears([attn.out_proj], ("out_proj",), layer, int8)
        self.init_mlp(hf_layer.feed_forward, layer, int8)
        self.q_norm, self.k_norm = fast_norm(attn.q_layernorm), fast_norm(attn.k_layernorm)
        self.init_attention(config, layer, cos, sin)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, *self.mlp_modules()]


class Lfm2ConvLayer(FeedForward, nn.Module):
    def __init__(self, hf_layer, config, layer: int, state: int, int8: bool = False):
        nn.Module.__init__(self)
        conv = hf_layer.conv
        self.operator_norm, self.ffn_norm = fast_norm(hf_layer.operator_norm), fast_norm(hf_layer.ffn_norm)
        self.in_proj = FusedLoRALinear.from_linears([conv.in_proj], ("in_proj",), layer, int8)
        self.out_proj = FusedLoRALinear.from_linears([conv.out_proj], ("out_proj",), layer, int8)
        self.init_mlp(hf_layer.feed_forward, layer, int8)
        self.conv_weight, self.conv_bias = conv.conv.weight, conv.conv.bias  # [hidden, 1, K], [hidden] or None
        self.state = state  # this layer's index among the recurrent states

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.in_proj, self.out_proj, *self.mlp_modules()]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        bcx = self.in_proj(self.operator_norm(h), batch.lora, apply_lora)  # [T, 3 hidden]: B, C, x
        b, c, x = bcx.chunk(3, dim=1)
        y = short_conv(b * x, batch.prefill, batch.num_prefill_rows, batch.state_slots, kv.states.states[self.state],
                       self.conv_weight, self.conv_bias)
        h = h + self.out_proj(c * y, batch.lora, apply_lora)
        return h + self.mlp(self.ffn_norm(h), batch, apply_lora)


class Lfm2ForServing(RecurrentLayers, LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS, MLP_UP)
    FINAL_NORM = "embedding_norm"
    RECURRENT, STATES = CONV, 1
    RECURRENT_LAYER, ATTENTION_LAYER = Lfm2ConvLayer, Lfm2AttentionLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        config = self.config
        attention = [i for i, kind in enumerate(config.layer_types) if kind != CONV]
        self.kv_spec = (len(attention), *self.kv_spec[1:])
        convs = config.num_hidden_layers - len(attention)
        self.recurrent_states = [((config.hidden_size, config.conv_L_cache - 1), None)] * convs

    def rope_table(self, inner, max_model_len: int, kind):
        return self.rotary_table(getattr(inner, "rotary_emb", None) or inner.pos_emb, max_model_len)  # LFM2-MoE's name

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        hidden = config.hidden_size
        return {**attention_targets(config, "out_proj"), "in_proj": ("model.layers.{i}.conv.in_proj", hidden, 3 * hidden),
                **mlp_targets(config, MLP_UP, "w2", mlp="model.layers.{i}.feed_forward.", inter=_intermediate(config))}

    @classmethod
    def layer_targets(cls, config):
        """An attention layer's q, k, v and out_proj, a convolution layer's in_proj and out_proj,
        and the MLP's w1, w3, w2 where it is dense."""
        targets, hidden = cls.lora_targets(config), config.hidden_size
        conv = {"in_proj": targets["in_proj"], "out_proj": ("model.layers.{i}.conv.out_proj", hidden, hidden)}
        attention = {kind: targets[kind] for kind in (*ATTN_KINDS, "out_proj")}
        mlp = {kind: targets[kind] for kind in (*MLP_UP, "w2")}
        return [{**(conv if kind == CONV else attention), **(mlp if _dense(config, i) else {})}
                for i, kind in enumerate(config.layer_types)]
