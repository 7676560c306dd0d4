"""GPT-Neo over a flat token batch: learned positions, unscaled attention (no 1/sqrt(d)), and
layers that alternate global attention with a local sliding window (``attention_layers``)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock

ATTN_KINDS = ("q_proj", "k_proj", "v_proj")


def gpt_neo_block(block, config, layer: int, int8: bool = False) -> PreLNBlock:
    attn = block.attn.attention
    heads = config.num_attention_heads
    window = config.window_size if config.attention_layers[layer] == "local" else None
    return PreLNBlock(
        block.ln_1, block.ln_2,
        FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8),
        FusedLoRALinear.from_linears([attn.out_proj], ("out_proj",), layer, int8),
        FusedLoRALinear.from_linears([block.mlp.c_fc], ("c_fc",), layer, int8),
        FusedLoRALinear.from_linears([block.mlp.c_proj], ("c_proj",), layer, int8),
        ACT2FN[config.activation_function],
        FlatAttention(layer, heads, heads, config.hidden_size // heads, scale=1.0, sliding_window=window),
    )


class GPTNeoForServing(ServingModel):
    EMBEDDING = ("transformer.wte", "wte")
    FUSED_KINDS = (ATTN_KINDS,)

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        t = hf_model.transformer
        self.wte, self.wpe, self.final_norm, self.lm_head = t.wte, t.wpe, t.ln_f, hf_model.lm_head
        self.layers = nn.ModuleList(gpt_neo_block(block, config, i, int8) for i, block in enumerate(t.h))
        heads = config.num_attention_heads
        self.kv_spec = (config.num_hidden_layers, heads, config.hidden_size // heads)

    @staticmethod
    def position_limit(config) -> int:
        return config.max_position_embeddings  # learned position embeddings: one row per position

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        inner = config.intermediate_size or 4 * d
        a, m = "transformer.h.{i}.attn.attention.", "transformer.h.{i}.mlp."
        return {"q_proj": (a + "q_proj", d, d), "k_proj": (a + "k_proj", d, d), "v_proj": (a + "v_proj", d, d),
                "out_proj": (a + "out_proj", d, d), "c_fc": (m + "c_fc", d, inner), "c_proj": (m + "c_proj", inner, d)}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch) + self.wpe(batch.positions)
