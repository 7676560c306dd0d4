"""GPTBigCode (``GPTBigCodeForCausalLM``: StarCoder, StarCoderBase, SantaCoder) over a flat token
batch: GPT-2's block with linear (not Conv1D) projections and learned positions, and
``c_attn`` holding q, k, v as one LoRA target: with ``multi_query`` (StarCoder's) q's heads, then
one key head and one value head; without it each head's q, k, v side by side ([heads, 3, head_dim]).
"""

from __future__ import annotations

from transformers.activations import ACT2FN

from .gpt2 import GPT2ForServing
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock


def _split(config):
    """qkv [T, hidden + 2 kv_dim] -> q [T, H, hd], k and v [T, KV, hd], as Hugging Face splits c_attn."""
    heads = config.num_attention_heads
    hd = config.hidden_size // heads
    if config.multi_query:
        return lambda qkv: (qkv[:, : heads * hd].view(-1, heads, hd), qkv[:, heads * hd : (heads + 1) * hd, None],
                            qkv[:, (heads + 1) * hd :, None])
    return lambda qkv: qkv.view(qkv.shape[0], heads, 3, hd).unbind(2)


def gpt_bigcode_block(block, config, layer: int, int8: bool = False) -> PreLNBlock:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    return PreLNBlock(
        block.ln_1, block.ln_2,
        FusedLoRALinear.from_linears([block.attn.c_attn], ("c_attn",), layer, int8),
        FusedLoRALinear.from_linears([block.attn.c_proj], ("attn.c_proj",), layer, int8),
        FusedLoRALinear.from_linears([block.mlp.c_fc], ("c_fc",), layer, int8),
        FusedLoRALinear.from_linears([block.mlp.c_proj], ("mlp.c_proj",), layer, int8),
        ACT2FN[config.activation_function],
        FlatAttention(layer, heads, 1 if config.multi_query else heads, head_dim,
                      scale=head_dim**-0.5 if config.scale_attn_weights else 1.0),
        split=_split(config),
    )


class GPTBigCodeForServing(GPT2ForServing):
    BLOCK = staticmethod(gpt_bigcode_block)

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        inner = config.n_inner or 4 * d
        kv = (d // config.num_attention_heads) if config.multi_query else d
        a, m = "transformer.h.{i}.attn.", "transformer.h.{i}.mlp."
        return {"c_attn": (a + "c_attn", d, d + 2 * kv), "attn.c_proj": (a + "c_proj", d, d),
                "c_fc": (m + "c_fc", d, inner), "mlp.c_proj": (m + "c_proj", inner, d)}
