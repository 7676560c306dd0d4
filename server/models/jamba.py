"""Jamba (AI21: Jamba 1.5, 1.6, 1.7, Jamba Reasoning) and Bamba (Bamba-9B): Llama-like layers
that mostly mix tokens by a Mamba mixer instead of attention.

A layer mixes tokens by its mixer (``mamba``) or by attention (its K/V in the paged cache), under
``input_layernorm``; then runs its feed-forward (``feed_forward``) under ``pre_ff_layernorm``: a
SwiGLU MLP (LoRA targets) or, in Jamba's every ``expert_layer_period``-th layer, a mixture of
experts (Hugging Face's module on the step's rows, as moe.py runs them). The last norm is
``final_layernorm``.

- Jamba: Mamba's mixer (mamba.py, its step, B and C RMS-normed), attention every
  ``attn_layer_period`` layers without positions encoded. LoRA targets: q_proj, k_proj, v_proj,
  o_proj; in_proj, x_proj, out_proj; gate_proj, up_proj, down_proj of the dense MLPs.
- Bamba: Mamba-2's mixer (mamba2.py), attention at ``attn_layer_indices`` with RoPE on half of
  each head. LoRA targets: q_proj, k_proj, v_proj, o_proj; in_proj, out_proj; gate_proj,
  up_proj, down_proj.
"""

from __future__ import annotations

from torch import nn

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
from .mamba import MambaMixer, mixer_targets
from .mamba2 import Mamba2Mixer, mamba2_targets
from .moe import DenseOrExperts

MLP = (*MLP_UP_KINDS, "down_proj")


class JambaAttentionLayer(DenseOrExperts, LlamaLayer):
    MLP = "feed_forward"

    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_attention_layernorm = fast_norm(hf_layer.pre_ff_layernorm)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, *self.mlp_modules()]


class JambaMambaLayer(DenseOrExperts, nn.Module):
    MIXER = MambaMixer

    def __init__(self, hf_layer, config, layer: int, states: int, int8: bool = False):
        nn.Module.__init__(self)
        self.input_layernorm = fast_norm(hf_layer.input_layernorm)
        self.pre_ff_layernorm = fast_norm(hf_layer.pre_ff_layernorm)
        self.mixer = self.MIXER(hf_layer.mamba, layer, states, int8)
        self.init_mlp(hf_layer.feed_forward, layer, int8)
        self.act = getattr(hf_layer.feed_forward, "act_fn", None)

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [*self.mixer.lora_modules(), *self.mlp_modules()]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.mixer(self.input_layernorm(h), batch, kv, apply_lora)
        return h + self.mlp(self.pre_ff_layernorm(h), batch, apply_lora)


class JambaForServing(RecurrentLayers, LlamaForServing):
    FINAL_NORM = "final_layernorm"
    RECURRENT_LAYER, ATTENTION_LAYER = JambaMambaLayer, JambaAttentionLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        mixers = [layer.mamba for layer in hf_model.model.layers if getattr(layer, "mamba", None) is not None]
        self.kv_spec = (len(hf_model.model.layers) - len(mixers), *self.kv_spec[1:])
        self.recurrent_states = [spec for mixer in mixers for spec in self.RECURRENT_LAYER.MIXER.state_specs(mixer)]

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        mamba = mixer_targets(config.hidden_size, config.mamba_expand * config.hidden_size, config.mamba_dt_rank,
                              config.mamba_d_state, "model.layers.{i}.mamba.")
        return {**attention_targets(config), **mamba,
                **mlp_targets(config, MLP_UP_KINDS, "down_proj", mlp="model.layers.{i}.feed_forward.")}

    @classmethod
    def layer_targets(cls, config):
        """A Mamba layer's mixer's targets, an attention layer's q/k/v/o, and the MLP's three where
        it is dense."""
        targets = cls.lora_targets(config)
        mixer = tuple(kind for kind in targets if kind not in (*ATTN_KINDS, "o_proj", *MLP))
        experts = getattr(config, "layers_num_experts", None) or [1] * config.num_hidden_layers
        return [{kind: targets[kind] for kind in ((*mixer,) if kind == cls.RECURRENT else (*ATTN_KINDS, "o_proj"))
                 + (MLP if count == 1 else ())}
                for kind, count in zip(config.layer_types, experts, strict=True)]


class BambaMambaLayer(JambaMambaLayer):
    MIXER = Mamba2Mixer


class BambaForServing(JambaForServing):
    RECURRENT_LAYER = BambaMambaLayer

    @staticmethod
    def lora_targets(config):
        mamba = mamba2_targets(config.hidden_size, config.mamba_expand * config.hidden_size, config.mamba_n_groups,
                               config.mamba_d_state, config.mamba_n_heads, "model.layers.{i}.mamba.")
        return {**attention_targets(config), **mamba,
                **mlp_targets(config, MLP_UP_KINDS, "down_proj", mlp="model.layers.{i}.feed_forward.")}
