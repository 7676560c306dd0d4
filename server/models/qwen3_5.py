"""Qwen3.5 (dense and MoE), Qwen3-Next and OLMo Hybrid: hybrids of gated DeltaNet and attention.

Each layer mixes tokens by one of two operators under ``input_layernorm`` (Gemma-style RMSNorms,
1 + w), then runs its MLP under ``post_attention_layernorm``:

- gated DeltaNet (``linear_attn``, ``layer_types`` "linear_attention"): ``in_proj_qkv`` through a
  depthwise causal convolution of width ``linear_conv_kernel_dim`` and SiLU gives q, k (key heads)
  and v (value heads, each key head serving value / key heads of them); ``in_proj_b`` the write
  strength beta = sigmoid(b), ``in_proj_a`` the decay g = -exp(A_log) softplus(a + dt_bias); the
  gated delta rule (ops/gated_delta.py) reads and writes a state per head; its output, RMS-normed
  per head and gated by SiLU(``in_proj_z``), goes through ``out_proj``. A sequence's state is the
  convolution's last inputs and the rule's [heads, dk, dv] state (float32), recurrent_state.py;
- gated attention (``self_attn``): ``q_proj`` gives each head's query and an output gate side by
  side; per-head q/k norms, RoPE on part of each head (its multimodal RoPE is plain RoPE for
  text), and o_proj(attention * sigmoid(gate)); its K/V in the paged cache.

The MLP is SwiGLU (gate_proj, up_proj, down_proj), or in Qwen3.5-MoE a mixture of experts with a
shared expert, run as Hugging Face's module on the step's rows (no LoRA on it, as moe.py). LoRA
targets: q_proj, k_proj, v_proj, o_proj; in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (one input:
shrunk together), out_proj; the dense MLP's three. Qwen3-Next's layers are Qwen3.5-MoE's, but its
DeltaNet projections are two linears, ``in_proj_qkvz`` and ``in_proj_ba``, laid out by key head,
and ``mlp_only_layers`` and ``decoder_sparse_step`` may leave some MLPs dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gated_delta import gated_delta, prepare
from ..ops.short_conv import short_conv
from .base import RecurrentLayers
from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import (
    ATTN_KINDS,
    MLP_UP_KINDS,
    LlamaForServing,
    LlamaLayer,
    attention_targets,
    fast_norm,
    mlp_targets,
)
from .moe import DenseOrExperts
from .olmo import Olmo2Layer

IN_KINDS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
NEXT_IN_KINDS = ("in_proj_qkvz", "in_proj_ba")  # Qwen3-Next's
# OLMo Hybrid's: q, k, v (shapes unlike its attention's q_proj, k_proj, v_proj: kinds of their own), the gate
OLMO_IN = ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")
OLMO_IN_KINDS = ("linear_attn.q_proj", "linear_attn.k_proj", "linear_attn.v_proj", "g_proj", "b_proj", "a_proj")
OLMO_OUT = "linear_attn.o_proj"
LINEAR = "linear_attention"  # the layer type of a gated DeltaNet layer in the config's layer_types


def _dense(config, layer: int) -> bool:
    """Whether the layer's MLP is dense: every layer of Qwen3.5; Qwen3-Next's and Qwen3.5-MoE's
    (experts in every ``decoder_sparse_step``-th layer, but ``mlp_only_layers``) where they say so."""
    if not getattr(config, "num_experts", 0):
        return True
    return layer in (getattr(config, "mlp_only_layers", None) or ()) or \
        (layer + 1) % getattr(config, "decoder_sparse_step", 1) != 0


class GatedAttentionLayer(DenseOrExperts, LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, *self.mlp_modules()]

    def attend(self, x, batch: StepBatch, kv, apply_lora):
        qkv = self.qkv(x, batch.lora, apply_lora)
        T, heads, kv_heads, hd = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        q_end, k_end = 2 * heads * hd, (2 * heads + kv_heads) * hd
        q, gate = qkv[:, :q_end].view(T, heads, 2 * hd).split(hd, dim=-1)  # each head's query, then its gate
        k, v = qkv[:, q_end:k_end].view(T, kv_heads, hd), qkv[:, k_end:].view(T, kv_heads, hd)
        q, k = self.rope_qk(self.q_norm(q), self.k_norm(k), batch)
        o = self.attention(q, k, v, batch, kv)
        return self.o_proj(o * torch.sigmoid(gate.reshape(T, heads * hd)), batch.lora, apply_lora)


class GatedDeltaNetLayer(DenseOrExperts, nn.Module):
    def __init__(self, hf_layer, config, layer: int, states: int, int8: bool = False):
        nn.Module.__init__(self)
        net = hf_layer.linear_attn
        self.input_layernorm = fast_norm(hf_layer.input_layernorm)
        self.post_attention_layernorm = fast_norm(hf_layer.post_attention_layernorm)
        if hasattr(net, "in_proj_qkvz"):  # Qwen3-Next's: two linears, laid out by key head
            self.in_proj = FusedLoRALinear.from_linears([net.in_proj_qkvz, net.in_proj_ba], NEXT_IN_KINDS, layer, int8)
        elif hasattr(net, "g_proj"):  # OLMo Hybrid's: one linear each
            self.in_proj = FusedLoRALinear.from_linears([getattr(net, name) for name in OLMO_IN], OLMO_IN_KINDS, layer,
                                                        int8)
        else:
            self.in_proj = FusedLoRALinear.from_linears([net.in_proj_qkv, net.in_proj_z, net.in_proj_b, net.in_proj_a],
                                                        IN_KINDS, layer, int8)
        out = ("out_proj", net.out_proj) if hasattr(net, "out_proj") else (OLMO_OUT, net.o_proj)
        self.out_proj = FusedLoRALinear.from_linears([out[1]], (out[0],), layer, int8)
        self.init_mlp(hf_layer.mlp, layer, int8)
        self.act = getattr(hf_layer.mlp, "act_fn", F.silu)
        self.conv_weight, self.conv_bias = net.conv1d.weight, net.conv1d.bias  # [conv dim, 1, K], None
        self.conv_act = {"silu": F.silu, "swish": F.silu}[net.activation]
        self.register_buffer("A", -net.A_log.detach().float().exp(), persistent=False)  # -exp(A_log): once, not a step
        self.dt_bias = net.dt_bias
        self.norm = getattr(net, "norm", None) or net.o_norm  # HF's gated RMSNorm
        self.beta_scale = 2.0 if getattr(net, "allow_neg_eigval", False) else None  # OLMo Hybrid's: beta in (0, 2)
        self.key_heads, self.value_heads, self.dk, self.dv = net.num_k_heads, net.num_v_heads, net.head_k_dim, net.head_v_dim
        self.states = states  # the convolution's state, then the rule's: indices among the recurrent states

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.in_proj, self.out_proj, *self.mlp_modules()]

    def project(self, x, batch: StepBatch, apply_lora) -> tuple[torch.Tensor, ...]:
        """The input projections of x [T, hidden]: q|k|v [T, 2 key dim + value dim] (the
        convolution's channels), z [T, value dim], b and a [T, value heads]."""
        T, key_dim, value_dim, heads = x.shape[0], self.key_heads * self.dk, self.value_heads * self.dv, self.value_heads
        y = self.in_proj(x, batch.lora, apply_lora)
        if self.in_proj.kinds != NEXT_IN_KINDS:  # Qwen3.5's four linears, OLMo Hybrid's six: q|k|v, z, b, a
            return y.split([2 * key_dim + value_dim, value_dim, heads, heads], dim=1)
        # Qwen3-Next's: per key head, its q, k, then its value heads' v and z; then per key head their b, then a
        share = heads // self.key_heads
        qkvz, ba = y.split([2 * key_dim + 2 * value_dim, 2 * heads], dim=1)
        q, k, v, z = qkvz.view(T, self.key_heads, -1).split([self.dk, self.dk, share * self.dv, share * self.dv], dim=2)
        b, a = ba.view(T, self.key_heads, 2 * share).split(share, dim=2)
        return (torch.cat([t.reshape(T, -1) for t in (q, k, v)], dim=1), z.reshape(T, value_dim), b.reshape(T, heads),
                a.reshape(T, heads))

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        x = self.input_layernorm(h)
        T, key_dim, value_dim = h.shape[0], self.key_heads * self.dk, self.value_heads * self.dv
        qkv, z, b, a = self.project(x, batch, apply_lora)
        conv_state, state = (kv.states.states[self.states + j] for j in (0, 1))
        mixed = self.conv_act(short_conv(qkv, batch, conv_state, self.conv_weight, self.conv_bias,
                                         kv.states.kernel))
        q, k, v = mixed.split([key_dim, key_dim, value_dim], dim=1)
        q, k = prepare(q.reshape(T, self.key_heads, self.dk), k.reshape(T, self.key_heads, self.dk), self.value_heads)
        beta = b.sigmoid() if self.beta_scale is None else b.sigmoid() * self.beta_scale
        beta = beta.float()
        g = self.A * F.softplus(a.float() + self.dt_bias)  # as HF's: in float32
        o = gated_delta(q, k, v.reshape(T, self.value_heads, self.dv), g, beta, batch, state,
                        kv.states.kernel).to(h.dtype)
        o = self.norm(o.reshape(-1, self.dv), z.reshape(-1, self.dv)).reshape(T, value_dim)
        h = h + self.out_proj(o, batch.lora, apply_lora)
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora)


class Qwen3_5ForServing(RecurrentLayers, LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS, MLP_UP_KINDS, IN_KINDS, NEXT_IN_KINDS)
    RECURRENT_LAYER, ATTENTION_LAYER = GatedDeltaNetLayer, GatedAttentionLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        config = self.config
        self.kv_spec = (config.layer_types.count("full_attention"), *self.kv_spec[1:])
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        per_layer = [((conv_dim, config.linear_conv_kernel_dim - 1), None),
                     ((config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim),
                      torch.float32)]
        self.recurrent_states = per_layer * config.layer_types.count(LINEAR)

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        attention = attention_targets(config)
        template, hidden, q = attention["q_proj"]
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        net, heads = "model.layers.{i}.linear_attn.", config.linear_num_value_heads
        if config.model_type == "qwen3_next":
            linear = {"in_proj_qkvz": (net + "in_proj_qkvz", hidden, 2 * key_dim + 2 * value_dim),
                      "in_proj_ba": (net + "in_proj_ba", hidden, 2 * heads)}
        else:
            linear = {"in_proj_qkv": (net + "in_proj_qkv", hidden, 2 * key_dim + value_dim),
                      "in_proj_z": (net + "in_proj_z", hidden, value_dim), "in_proj_b": (net + "in_proj_b", hidden, heads),
                      "in_proj_a": (net + "in_proj_a", hidden, heads)}
        linear["out_proj"] = (net + "out_proj", value_dim, hidden)
        dense = any(_dense(config, i) for i in range(config.num_hidden_layers))
        mlp = mlp_targets(config, MLP_UP_KINDS, "down_proj") if dense else {}
        return {**attention, "q_proj": (template, hidden, 2 * q), **linear, **mlp}

    @classmethod
    def layer_targets(cls, config):
        """A gated DeltaNet layer's in_proj_* and out_proj, an attention layer's q/k/v/o, and the
        MLP's three where it is dense."""
        targets = cls.lora_targets(config)
        by_path = {path: {kind: t for kind, t in targets.items() if path in t[0]}
                   for path in (".linear_attn.", ".self_attn.", ".mlp.")}
        return [{**by_path[".linear_attn." if layer_type == LINEAR else ".self_attn."],
                 **(by_path[".mlp."] if _dense(config, i) else {})} for i, layer_type in enumerate(config.layer_types)]


class OlmoHybridAttentionLayer(Olmo2Layer):
    """OLMo Hybrid's attention layers: OLMo 2's (q and k normed over all heads, norms after each
    block), RoPE only where the config gives it a base (else the model has no rotary module)."""

    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone


class OlmoHybridForServing(Qwen3_5ForServing):
    """OLMo Hybrid (AI2): gated DeltaNet layers (q, k, v, the output gate ``g_proj``, ``b_proj`` and
    ``a_proj`` one linear each, beta in (0, 2) where ``linear_allow_neg_eigval``; ``o_proj``) and
    OLMo 2's attention layers. Its DeltaNet's q/k/v/o have shapes unlike its attention's, so they
    are kinds of their own: ``linear_attn.q_proj`` and so on (what ``ServerInfo.lora_targets`` lists)."""

    FUSED_KINDS = (ATTN_KINDS, MLP_UP_KINDS, OLMO_IN_KINDS)
    ATTENTION_LAYER = OlmoHybridAttentionLayer

    @staticmethod
    def lora_targets(config):
        hidden, heads = config.hidden_size, config.linear_num_value_heads
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = heads * config.linear_value_head_dim
        net = "model.layers.{i}.linear_attn."
        shapes = {"q_proj": (hidden, key_dim), "k_proj": (hidden, key_dim), "v_proj": (hidden, value_dim),
                  "g_proj": (hidden, value_dim), "b_proj": (hidden, heads), "a_proj": (hidden, heads)}
        linear = {kind: (net + name, *shapes[name]) for name, kind in zip(OLMO_IN, OLMO_IN_KINDS, strict=True)}
        return {**attention_targets(config), **linear, OLMO_OUT: (net + "o_proj", value_dim, hidden),
                **mlp_targets(config, MLP_UP_KINDS, "down_proj")}
