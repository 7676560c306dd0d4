"""Llama 4 (``Llama4ForCausalLM``: the text model of Llama 4 Scout and Maverick) over a flat token
batch: the MoE decoder (moe.py; each layer's ``feed_forward``, a routed expert beside a shared one
or a dense MLP, as Hugging Face's own module) with Llama 4's attention.

- RoPE on interleaved pairs of each head's dims (Hugging Face multiplies complex numbers; the table
  takes each frequency twice in a row, as ERNIE 4.5's), in the layers ``no_rope_layers`` marks; the
  others (NoPE) attend to everything.
- In RoPE layers, q and k normed per head after RoPE by a weightless RMSNorm (``use_qk_norm``), and
  attention within chunks of ``attention_chunk_size`` positions (keys of the query's own chunk).
- In NoPE layers, queries scaled by position (``attn_temperature_tuning``):
  q * (1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))).
"""

from __future__ import annotations

import torch
from torch import nn

from .batch import StepBatch
from .cohere import ComplexRoPE, _rope_pairs
from .layers import FlatAttention
from .llama import QKNormsAfterRoPE, _head_dim, _kv_heads
from .moe import MoEForServing, MoELayer


class Llama4Layer(QKNormsAfterRoPE, MoELayer):
    rope = staticmethod(_rope_pairs)
    MLP = "feed_forward"

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        # the model's own weightless norm, in RoPE layers alone
        self.q_norm_after = self.k_norm_after = getattr(hf_layer.self_attn, "qk_norm", None) or nn.Identity()
        self.temperature = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale

    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        chunked = config.layer_types[layer] == "chunked_attention"
        return FlatAttention(layer, config.num_attention_heads, _kv_heads(config), _head_dim(config),
                             chunk_size=config.attention_chunk_size if chunked else None)

    def scale_queries(self, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if not self.temperature:
            return q
        scale = batch.masks.get("llama4 query scale")
        if scale is None:  # once per step, shared by the NoPE layers; in float32, as Hugging Face computes it
            pos = batch.positions.float()
            scale = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            scale = batch.masks["llama4 query scale"] = scale[:, None, None]
        return (q * scale).to(q.dtype)


class Llama4ForServing(ComplexRoPE, MoEForServing):
    LAYER = Llama4Layer
