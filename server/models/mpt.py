"""MPT (``MptForCausalLM``: MPT-7B, MPT-30B and their fine-tunes) over a flat token batch.

- ALiBi instead of position embeddings, over at most ``max_seq_len`` positions: its slopes as
  transformers computes them (``alibi_bias_max`` 8 whatever the config says, which makes them
  BLOOM's), each key's bias relative to the last key (a constant per query row, which the softmax
  ignores); attention scaled by ``softmax_scale`` (default head_dim^-0.5).
- q, k and v fused in ``Wqkv`` (q, then k, then v), clamped to [-clip, clip] where ``clip_qkv``
  is set (LoRA included, as PEFT's sits inside Wqkv); ``out_proj``; a GELU MLP (``up_proj``,
  ``down_proj``); LayerNorms without biases, before attention and the MLP; no linear biases.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear, PreLNBlock


def mpt_block(block, config, layer: int, slopes: torch.Tensor, int8: bool = False) -> PreLNBlock:
    attn, heads = block.attn, config.n_heads
    head_dim, clip = config.hidden_size // heads, config.attn_config.clip_qkv

    def split(qkv: torch.Tensor):
        if clip:
            qkv = qkv.clamp(-clip, clip)
        return qkv.view(qkv.shape[0], 3, heads, head_dim).unbind(1)

    return PreLNBlock(
        block.norm_1, block.norm_2,
        FusedLoRALinear.from_linears([attn.Wqkv], ("Wqkv",), layer, int8),
        FusedLoRALinear.from_linears([attn.out_proj], ("out_proj",), layer, int8),
        FusedLoRALinear.from_linears([block.ffn.up_proj], ("up_proj",), layer, int8),
        FusedLoRALinear.from_linears([block.ffn.down_proj], ("down_proj",), layer, int8),
        block.ffn.act, FlatAttention(layer, heads, heads, head_dim, scale=attn.softmax_scale, slopes=slopes), split)


class MptForServing(ServingModel):
    EMBEDDING = ("transformer.wte", "wte")

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config
        t = hf_model.transformer
        self.wte, self.final_norm, self.lm_head = t.wte, t.norm_f, hf_model.lm_head
        # MPT's bias of key j is slope * (j - last): its slopes are minus the bias one key back
        slopes = -build_mpt_alibi_tensor(config.n_heads, 2)[:, 0, 0]
        slopes = slopes.to(self.lm_head.weight.device)
        self.layers = nn.ModuleList(mpt_block(block, config, i, slopes, int8) for i, block in enumerate(t.blocks))
        self.kv_spec = (config.n_layers, config.n_heads, config.hidden_size // config.n_heads)

    @staticmethod
    def position_limit(config) -> int:
        return config.max_seq_len  # transformers' ALiBi table covers this many positions

    @staticmethod
    def lora_targets(config):
        d = config.hidden_size
        a, m = "transformer.blocks.{i}.attn.", "transformer.blocks.{i}.ffn."
        return {"Wqkv": (a + "Wqkv", d, 3 * d), "out_proj": (a + "out_proj", d, d),
                "up_proj": (m + "up_proj", d, 4 * d), "down_proj": (m + "down_proj", 4 * d, d)}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch)
