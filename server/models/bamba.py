"""Bamba (IBM and partners' Bamba-9B): Llama's layers, but most of them mix tokens by Mamba-2.

A layer is a Mamba-2 layer (``mamba``, mamba2.py) or, at ``attn_layer_indices``, Llama's attention
with RoPE on half of each head; each then runs a SwiGLU MLP (``feed_forward``) under
``pre_ff_layernorm``. The last norm is ``final_layernorm``. LoRA targets: q_proj, k_proj, v_proj,
o_proj; in_proj, out_proj; gate_proj, up_proj, down_proj.
"""

from __future__ import annotations

from torch import nn

from .base import RecurrentLayers
from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import MLP_UP_KINDS, LlamaForServing, LlamaLayer, attention_targets, fast_norm, mlp_targets
from .mamba2 import Mamba2Mixer

MAMBA = "linear_attention"  # the layer type of a Mamba-2 layer in the config's layers_block_type


class BambaAttentionLayer(LlamaLayer):
    MLP = "feed_forward"

    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_attention_layernorm = fast_norm(hf_layer.pre_ff_layernorm)
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone


class BambaMambaLayer(nn.Module):
    mlp = LlamaLayer.mlp

    def __init__(self, hf_layer, layer: int, states: int, int8: bool = False):
        super().__init__()
        self.input_layernorm, self.pre_ff_layernorm = fast_norm(hf_layer.input_layernorm), fast_norm(hf_layer.pre_ff_layernorm)
        self.mixer = Mamba2Mixer(hf_layer.mamba, layer, states, int8)
        LlamaLayer.init_mlp(self, hf_layer.feed_forward, layer, int8)
        self.act = hf_layer.feed_forward.act_fn

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.mixer.in_proj, self.mixer.out_proj, self.gate_up, self.down_proj]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.mixer(self.input_layernorm(h), batch, kv, apply_lora)
        return h + self.mlp(self.pre_ff_layernorm(h), batch, apply_lora)


class BambaForServing(RecurrentLayers, LlamaForServing):
    FINAL_NORM = "final_layernorm"

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        types = self.config.layers_block_type
        self.kv_spec = (len(types) - types.count(MAMBA), *self.kv_spec[1:])
        self.recurrent_states = [spec for layer in hf_model.model.layers if layer.block_type == MAMBA
                                 for spec in Mamba2Mixer.state_specs(layer.mamba)]

    def LAYER(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):  # noqa: N802 - LlamaForServing's hook
        mamba = config.layers_block_type[:layer].count(MAMBA)
        if config.layers_block_type[layer] == MAMBA:
            return BambaMambaLayer(hf_layer, layer, 2 * mamba, int8)
        return BambaAttentionLayer(hf_layer, config, layer, layer - mamba, cos, sin, int8)

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        hidden, inner = config.hidden_size, config.mamba_expand * config.hidden_size
        projection = 2 * inner + 2 * config.mamba_n_groups * config.mamba_d_state + config.mamba_n_heads
        mamba = "model.layers.{i}.mamba."
        return {**attention_targets(config), "in_proj": (mamba + "in_proj", hidden, projection),
                "out_proj": (mamba + "out_proj", inner, hidden),
                **mlp_targets(config, MLP_UP_KINDS, "down_proj", mlp="model.layers.{i}.feed_forward.")}

    @classmethod
    def layer_targets(cls, config):
        targets = cls.lora_targets(config)
        mixing = {True: ("in_proj", "out_proj"), False: ("q_proj", "k_proj", "v_proj", "o_proj")}
        return [{kind: targets[kind] for kind in (*mixing[block == MAMBA], *MLP_UP_KINDS, "down_proj")}
                for block in config.layers_block_type]
