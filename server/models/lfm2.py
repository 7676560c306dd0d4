"""LFM2 and LFM3 (Liquid AI): hybrids of attention layers and gated short-convolution layers.

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
parameters, which PEFT's target_modules do not reach). LFM3's attention names its output
projection ``o_proj`` (and its q/k norms ``q_norm``, ``k_norm``), gates each head's output by the
sigmoid of ``g_proj`` of its input (``use_attention_gate``), takes windows and RoPE by layer type;
each block's output is normed before it joins the residual stream (``use_sandwich_norm``). The
decoder's last norm is ``embedding_norm``. LoRA targets: q_proj, k_proj, v_proj, out_proj (LFM3:
o_proj, g_proj), in_proj, and w1, w3, w2 of the dense MLPs (LFM2's ``out_proj`` is both mixers'
output, one kind: its shape is the same).
"""

from __future__ import annotations

import torch
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


class SandwichNorms:
    """A layer mixin: LFM3's norms of each block's output before it joins the residual stream
    (``post_operator_norm``, ``post_ffn_norm``; LFM2 has none, nor LFM3 without use_sandwich_norm)."""

    def init_sandwich(self, hf_layer) -> None:
        self.post_operator_norm = fast_norm(getattr(hf_layer, "post_operator_norm", None)) or nn.Identity()
        self.post_ffn_norm = fast_norm(getattr(hf_layer, "post_ffn_norm", None)) or nn.Identity()

    def add_mlp(self, h, batch: StepBatch, apply_lora):
        return h + self.post_ffn_norm(self.mlp(self.ffn_norm(h), batch, apply_lora))


class Lfm2AttentionLayer(SandwichNorms, FeedForward, LlamaLayer):
    """Grouped-query attention with per-head q/k norms; LFM3's: its output projection ``o_proj``,
    an output gate per head (``g_proj``: sigmoid of a linear of the input), windows by layer type."""

    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn = hf_layer.self_attn
        self.input_layernorm, self.ffn_norm = fast_norm(hf_layer.operator_norm), fast_norm(hf_layer.ffn_norm)
        self.init_sandwich(hf_layer)
        self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        out = "out_proj" if hasattr(attn, "out_proj") else "o_proj"  # LFM2's, LFM3's
        self.o_proj = FusedLoRALinear.from_linears([getattr(attn, out)], (out,), layer, int8)
        gate = getattr(attn, "g_proj", None)
        self.gate = None if gate is None else FusedLoRALinear.from_linears([gate], ("g_proj",), layer, int8)
        self.init_mlp(hf_layer.feed_forward, layer, int8)
        norms = ("q_layernorm", "k_layernorm") if hasattr(attn, "q_layernorm") else ("q_norm", "k_norm")
        self.q_norm, self.k_norm = (fast_norm(getattr(attn, name)) for name in norms)
        self.init_attention(config, layer, cos, sin)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, *([] if self.gate is None else [self.gate]), *self.mlp_modules()]

    def attend(self, x, batch: StepBatch, kv, apply_lora):
        if self.gate is None:
            return super().attend(x, batch, kv, apply_lora)
        q, k, v = self.qkv_heads(self.qkv(x, batch.lora, apply_lora), batch)
        o = self.attention(q, k, v, batch, kv).view(x.shape[0], self.heads, self.head_dim)
        o = o * torch.sigmoid(self.gate(x, batch.lora, apply_lora))[..., None]
        return self.o_proj(o.view(x.shape[0], -1), batch.lora, apply_lora)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.post_operator_norm(self.attend(self.input_layernorm(h), batch, kv, apply_lora))
        return self.add_mlp(h, batch, apply_lora)


class Lfm2ConvLayer(SandwichNorms, FeedForward, nn.Module):
    def __init__(self, hf_layer, config, layer: int, state: int, int8: bool = False):
        nn.Module.__init__(self)
        conv = hf_layer.conv
        self.operator_norm, self.ffn_norm = fast_norm(hf_layer.operator_norm), fast_norm(hf_layer.ffn_norm)
        self.init_sandwich(hf_layer)
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
        y = short_conv(b * x, batch, kv.states.states[self.state], self.conv_weight, self.conv_bias,
                       kv.states.kernel)
        h = h + self.post_operator_norm(self.out_proj(c * y, batch.lora, apply_lora))
        return self.add_mlp(h, batch, apply_lora)


class Lfm2ForServing(RecurrentLayers, LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS, MLP_UP)
    FINAL_NORM = "embedding_norm"
    RECURRENT, STATES = CONV, 1
    RECURRENT_LAYER, ATTENTION_LAYER = Lfm2ConvLayer, Lfm2AttentionLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        config = self.config
        convs = config.layer_types.count(CONV)
        self.kv_spec = (config.num_hidden_layers - convs, *self.kv_spec[1:])
        self.recurrent_states = [((config.hidden_size, config.conv_L_cache - 1), None)] * convs

    @staticmethod
    def rope_kinds(config) -> list:
        """LFM3's tables by attention layer type (a convolution layer's: any, unread); LFM2's one."""
        types = [kind for kind in config.layer_types if kind != CONV]
        if not all(kind in (getattr(config, "rope_parameters", None) or {}) for kind in types):
            return [None] * config.num_hidden_layers
        return [types[0] if kind == CONV else kind for kind in config.layer_types]

    def rope_table(self, inner, max_model_len: int, kind):
        rotary = getattr(inner, "rotary_emb", None) or inner.pos_emb  # LFM2-MoE's name
        return self.rotary_table(rotary, max_model_len, *([] if kind is None else [kind]))

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        hidden, lfm3 = config.hidden_size, config.model_type == "lfm3"
        attention = attention_targets(config, "o_proj" if lfm3 else "out_proj")
        if getattr(config, "use_attention_gate", False):
            attention["g_proj"] = ("model.layers.{i}.self_attn.g_proj", hidden, config.num_attention_heads)
        return {**attention, "in_proj": ("model.layers.{i}.conv.in_proj", hidden, 3 * hidden),
                **mlp_targets(config, MLP_UP, "w2", mlp="model.layers.{i}.feed_forward.", inter=_intermediate(config))}

    @classmethod
    def layer_targets(cls, config):
        """An attention layer's q, k, v, its output projection (and LFM3's gate), a convolution
        layer's in_proj and out_proj, and the MLP's w1, w3, w2 where it is dense."""
        targets, hidden = cls.lora_targets(config), config.hidden_size
        conv = {"in_proj": targets["in_proj"], "out_proj": ("model.layers.{i}.conv.out_proj", hidden, hidden)}
        attention = {kind: target for kind, target in targets.items() if ".self_attn." in target[0]}
        mlp = {kind: targets[kind] for kind in (*MLP_UP, "w2")}
        return [{**(conv if kind == CONV else attention), **(mlp if _dense(config, i) else {})}
                for i, kind in enumerate(config.layer_types)]
