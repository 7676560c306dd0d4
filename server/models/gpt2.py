"""GPT-2 over a flat token batch: learned positions, LayerNorm, and Conv1D projections (weights
stored [in, out], PEFT's ``fan_in_fan_out``) with q|k|v fused in ``c_attn``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock


def gpt2_block(block, config, layer: int, int8: bool = False) -> PreLNBlock:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    return PreLNBlock(
        block.ln_1, block.ln_2,
        FusedLoRALinear.from_conv1d(block.attn.c_attn, "c_attn", layer, int8),
        FusedLoRALinear.from_conv1d(block.attn.c_proj, "attn.c_proj", layer, int8),
        FusedLoRALinear.from_conv1d(block.mlp.c_fc, "c_fc", layer, int8),
        FusedLoRALinear.from_conv1d(block.mlp.c_proj, "mlp.c_proj", layer, int8),
        ACT2FN[config.activation_function], FlatAttention(layer, heads, heads, head_dim, scale=scale),
    )


class GPT2ForServing(ServingModel):
    """Also the skeleton of GPT-Neo and GPTBigCode: wte plus learned positions, a ``BLOCK`` each
    layer (its PreLNBlock), ln_f and lm_head."""

    EMBEDDING = ("transformer.wte", "wte")
    BLOCK = staticmethod(gpt2_block)

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        t = hf_model.transformer
        self.wte, self.wpe, self.final_norm, self.lm_head = t.wte, t.wpe, t.ln_f, hf_model.lm_head
        self.layers = nn.ModuleList(self.BLOCK(block, config, i, int8) for i, block in enumerate(t.h))
        attention = self.layers[0].attention
        self.kv_spec = (config.num_hidden_layers, attention.num_kv_heads, attention.head_dim)

    @staticmethod
    def position_limit(config) -> int:
        return config.max_position_embeddings  # learned position embeddings: one row per position

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        inner = config.n_inner or 4 * d
        p = "transformer.h.{i}."
        return {"c_attn": (p + "attn.c_attn", d, 3 * d), "attn.c_proj": (p + "attn.c_proj", d, d),
                "c_fc": (p + "mlp.c_fc", d, inner), "mlp.c_proj": (p + "mlp.c_proj", inner, d)}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch) + self.wpe(batch.positions)
