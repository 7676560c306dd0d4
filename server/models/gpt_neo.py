"""GPT-Neo over a flat token batch: learned positions, unscaled attention (no 1/sqrt(d)), and
layers that alternate global attention with a local sliding window (``attention_layers``)."""

from __future__ import annotations

from transformers.activations import ACT2FN

from .gpt2 import GPT2ForServing
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


class GPTNeoForServing(GPT2ForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    BLOCK = staticmethod(gpt_neo_block)

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        inner = config.intermediate_size or 4 * d
        a, m = "transformer.h.{i}.attn.attention.", "transformer.h.{i}.mlp."
        return {"q_proj": (a + "q_proj", d, d), "k_proj": (a + "k_proj", d, d), "v_proj": (a + "v_proj", d, d),
                "out_proj": (a + "out_proj", d, d), "c_fc": (m + "c_fc", d, inner), "c_proj": (m + "c_proj", inner, d)}
