"""Falcon-H1 (TII: 0.5B to 34B): attention and Mamba-2 side by side in every layer, under MuP multipliers.

Each layer runs its normed input through a Mamba-2 mixer (``mamba``, mamba2.py: its input scaled by
``ssm_in_multiplier``, its projection's columns by the MuP vector from ``ssm_multipliers``, its
gated norm optional: ``mamba_rms_norm``) and, scaled by ``attention_in_multiplier``, through
Llama's attention (keys scaled by ``key_multiplier`` before RoPE), and adds both, scaled by
``ssm_out_multiplier`` and ``attention_out_multiplier``, to the residual stream; then a SwiGLU MLP
(``feed_forward``, its gate scaled before the activation and its output after it by
``mlp_multipliers``) under ``pre_ff_layernorm``. The token embedding is scaled by
``embedding_multiplier``, the logits by ``lm_head_multiplier`` (after LoRA on lm_head, as PEFT's
sits inside it). LoRA targets: q_proj, k_proj, v_proj, o_proj; in_proj, out_proj; gate_proj,
up_proj, down_proj.
"""

from __future__ import annotations

import torch

from .base import RecurrentLayers
from .batch import StepBatch
from .llama import MLP_UP_KINDS, LlamaForServing, LlamaLayer, attention_targets, fast_norm, mlp_targets
from .mamba2 import Mamba2Mixer, mamba2_targets


class FalconH1Layer(LlamaLayer):
    MLP = "feed_forward"

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.post_attention_layernorm = fast_norm(hf_layer.pre_ff_layernorm)
        self.mixer = Mamba2Mixer(hf_layer.mamba, layer, 2 * layer, int8)
        self.attention_in, self.attention_out = config.attention_in_multiplier, config.attention_out_multiplier
        self.ssm_out, self.key_multiplier = config.ssm_out_multiplier, config.key_multiplier
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def lora_modules(self):
        return [self.qkv, self.o_proj, *self.mixer.lora_modules(), self.gate_up, self.down_proj]

    def qkv_heads(self, qkv: torch.Tensor, batch: StepBatch):
        q_end = self.heads * self.head_dim
        qkv[:, q_end : q_end + self.kv_heads * self.head_dim] *= self.key_multiplier  # the keys, before RoPE
        return super().qkv_heads(qkv, batch)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        x = self.input_layernorm(h)
        mixed = self.mixer(x, batch, kv, apply_lora) * self.ssm_out
        h = h + (mixed + self.attend(x * self.attention_in, batch, kv, apply_lora) * self.attention_out)
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora)

    def mlp(self, x, batch: StepBatch, apply_lora):
        gate, up = self.gate_up(x, batch.lora, apply_lora).chunk(2, dim=1)
        return self.down_proj(up * self.act(gate * self.gate_multiplier), batch.lora, apply_lora) * self.down_multiplier


class FalconH1ForServing(RecurrentLayers, LlamaForServing):
    LAYER = FalconH1Layer
    FINAL_NORM = "final_layernorm"

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_multiplier = self.config.lm_head_multiplier
        self.recurrent_states = [spec for layer in hf_model.model.layers for spec in Mamba2Mixer.state_specs(layer.mamba)]

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch) * self.config.embedding_multiplier

    @staticmethod
    def lora_targets(config):
        mamba = mamba2_targets(config.hidden_size, config.mamba_d_ssm or config.mamba_expand * config.hidden_size,
                               config.mamba_n_groups, config.mamba_d_state, config.mamba_n_heads, "model.layers.{i}.mamba.")
        return {**attention_targets(config), **mamba,
                **mlp_targets(config, MLP_UP_KINDS, "down_proj", mlp="model.layers.{i}.feed_forward.")}
