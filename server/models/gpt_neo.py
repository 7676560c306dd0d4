"""GPT-Neo over a flat token batch: learned positions, unscaled attention (no 1/sqrt(d)), and
layers that alternate global attention with a local sliding window (``attention_layers``)."""

from __future__ import annotations

from transformers.activations import ACT2FN

from .gpt2 import GPT2ForServing
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock
from .llama import attention_targets, mlp_targets

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


class GPTNeoForServing(GPT2ForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    BLOCK = staticmethod(gpt_neo_block)

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config, "out_proj", "transformer.h.{i}.attn.attention."),
                **mlp_targets(config, ("c_fc",), "c_proj", mlp="transformer.h.{i}.mlp.",
                              inter=config.intermediate_size or 4 * config.hidden_size)}
