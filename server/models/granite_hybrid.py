"""Granite 4.0's hybrids (``GraniteMoeHybridForCausalLM``: Granite 4.0-H, dense or with experts):
Mamba-2 layers and attention layers under Granite's four scalars (granite.py).

A Mamba-2 layer (``mamba``, ``layer_types`` "linear_attention") projects the normed input by
``in_proj`` into a gate z, x|B|C and the step dt; x|B|C go through a depthwise causal convolution
and SiLU; the selective state space (ops/ssd.py) maps x to y by a [heads, head dim, state] state
per sequence (float32; with the convolution's last inputs, recurrent_state.py); y, gated by SiLU(z)
and RMS-normed by groups (Hugging Face's module), goes through ``out_proj`` (mamba2.py). Attention layers are
Granite's, with RoPE or none (``position_embedding_type``). Each layer's MLP is the shared MLP
(``shared_mlp``: ``input_linear``, gate|up as one linear, and ``output_linear``), plus, where the
config has experts, a mixture of them run as Hugging Face's module (no LoRA on it). LoRA targets:
q_proj, k_proj, v_proj, o_proj; in_proj, out_proj; input_linear, output_linear.
"""

from __future__ import annotations

from torch import nn

from .base import RecurrentLayers
from .batch import StepBatch
from .granite import GraniteForServing, GraniteLayer
from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaLayer, attention_targets, fast_norm
from .mamba2 import Mamba2Mixer, mamba2_targets
from .moe import MoELayer

MAMBA = "linear_attention"  # the layer type of a Mamba-2 layer in the config's layer_types


class SharedMLP:
    """A layer mixin: Granite's shared MLP (LoRA targets), plus the experts' mixture where the
    layer has one (``moe``)."""

    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.gate_up = FusedLoRALinear.from_linears([mlp.input_linear], ("input_linear",), layer, int8)
        self.down_proj = FusedLoRALinear.from_linears([mlp.output_linear], ("output_linear",), layer, int8)
        self.act = mlp.activation

    def mlp(self, x, batch: StepBatch, apply_lora):
        shared = LlamaLayer.mlp(self, x, batch, apply_lora)
        return shared if self.moe is None else MoELayer.mlp(self, x, batch, apply_lora) + shared


class GraniteHybridAttentionLayer(SharedMLP, GraniteLayer):
    MLP = "shared_mlp"

    def __init__(self, hf_layer, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.moe = hf_layer.block_sparse_moe  # None without experts
        self.attention.layer = kv_layer  # the cache holds the attention layers' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]


class GraniteHybridMambaLayer(SharedMLP, nn.Module):
    def __init__(self, hf_layer, config, layer: int, states: int, int8: bool = False):
        nn.Module.__init__(self)
        self.input_layernorm = fast_norm(hf_layer.input_layernorm)
        self.post_attention_layernorm = fast_norm(hf_layer.post_attention_layernorm)
        self.mixer = Mamba2Mixer(hf_layer.mamba, layer, states, int8)
        self.init_mlp(hf_layer.shared_mlp, layer, int8)
        self.moe = hf_layer.block_sparse_moe
        self.residual_multiplier = config.residual_multiplier

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [*self.mixer.lora_modules(), self.gate_up, self.down_proj]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.mixer(self.input_layernorm(h), batch, kv, apply_lora) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora) * self.residual_multiplier


class GraniteMoeHybridForServing(RecurrentLayers, GraniteForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    RECURRENT_LAYER, ATTENTION_LAYER = GraniteHybridMambaLayer, GraniteHybridAttentionLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.kv_spec = (sum(layer.mamba is None for layer in hf_model.model.layers), *self.kv_spec[1:])
        self.recurrent_states = [spec for layer in hf_model.model.layers if layer.mamba is not None
                                 for spec in Mamba2Mixer.state_specs(layer.mamba)]

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each layer its own)."""
        hidden, mlp = config.hidden_size, "model.layers.{i}.shared_mlp."
        mamba = mamba2_targets(hidden, config.mamba_expand * hidden, config.mamba_n_groups, config.mamba_d_state,
                               config.mamba_n_heads, "model.layers.{i}.mamba.")
        return {**attention_targets(config), **mamba,
                "input_linear": (mlp + "input_linear", hidden, 2 * config.shared_intermediate_size),
                "output_linear": (mlp + "output_linear", config.shared_intermediate_size, hidden)}

    @classmethod
    def layer_targets(cls, config):
        targets = cls.lora_targets(config)
        kinds = {True: ("in_proj", "out_proj"), False: (*ATTN_KINDS, "o_proj")}
        return [{kind: targets[kind] for kind in (*kinds[layer_type == MAMBA], "input_linear", "output_linear")}
                for layer_type in config.layer_types]
