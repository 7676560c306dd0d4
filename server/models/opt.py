"""OPT (``OPTForCausalLM``: OPT 125M to 66B, Galactica) over a flat token batch.

- Learned positions, offset by 2 (row p + 2 of ``embed_positions`` for position p).
- Where ``word_embed_proj_dim`` differs from the hidden size (OPT-350M), the token embedding is
  projected in (``project_in``) and the decoder's output projected out (``project_out``).
- q, k, v and ``out_proj`` with biases (``enable_bias``), q scaled by head_dim^-0.5 after its
  projection (LoRA included, as PEFT's sits inside q_proj), so attention itself is unscaled; a ReLU
  MLP (``fc1``, ``fc2``).
- LayerNorms before attention and the MLP (``do_layer_norm_before``), or after each residual sum
  (OPT-350M), and a final LayerNorm only in the first case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock
from .llama import ATTN_KINDS, attention_targets, mlp_targets

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding's


class OPTBlock(PreLNBlock):
    def __init__(self, hf_layer, config, layer: int, int8: bool = False):
        attn = hf_layer.self_attn
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        scaling = attn.scaling

        def split(qkv: torch.Tensor):
            q, k, v = qkv.view(qkv.shape[0], 3, heads, head_dim).unbind(1)
            return q * scaling, k, v

        super().__init__(
            hf_layer.self_attn_layer_norm, hf_layer.final_layer_norm,
            FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8),
            FusedLoRALinear.from_linears([attn.out_proj], ("out_proj",), layer, int8),
            FusedLoRALinear.from_linears([hf_layer.fc1], ("fc1",), layer, int8),
            FusedLoRALinear.from_linears([hf_layer.fc2], ("fc2",), layer, int8),
            ACT2FN[config.activation_function], FlatAttention(layer, heads, heads, head_dim, scale=1.0), split)
        self.norm_before = config.do_layer_norm_before

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        if self.norm_before:
            return super().forward(h, batch, kv, apply_lora)
        q, k, v = self.split(self.qkv(h, batch.lora, apply_lora))
        h = self.ln_1(h + self.out(self.attention(q, k, v, batch, kv), batch.lora, apply_lora))
        return self.ln_2(h + self.proj(self.act(self.fc(h, batch.lora, apply_lora)), batch.lora, apply_lora))


class OPTForServing(ServingModel):
    EMBEDDING = ("model.decoder.embed_tokens", "embed_tokens")
    FUSED_KINDS = (ATTN_KINDS,)

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        decoder = hf_model.model.decoder
        self.embed_tokens, self.embed_positions, self.lm_head = decoder.embed_tokens, decoder.embed_positions, hf_model.lm_head
        self.project_in = decoder.project_in
        # the decoder's output: its final LayerNorm and projection out, each where the model has it
        self.final_norm = nn.Sequential(*(m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None))
        self.layers = nn.ModuleList(OPTBlock(layer, config, i, int8) for i, layer in enumerate(decoder.layers))
        attention = self.layers[0].attention
        self.kv_spec = (config.num_hidden_layers, attention.num_kv_heads, attention.head_dim)

    @staticmethod
    def position_limit(config) -> int:
        return config.max_position_embeddings

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config, "out_proj", "model.decoder.layers.{i}.self_attn."),
                **mlp_targets(config, ("fc1",), "fc2", mlp="model.decoder.layers.{i}.", inter=config.ffn_dim)}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        e = self.embed_with_lora(batch)
        if self.project_in is not None:
            e = self.project_in(e)
        return e + F.embedding(batch.positions + POSITION_OFFSET, self.embed_positions.weight)
