"""Gemma, Gemma 2, VaultGemma and Gemma 3 (text, ``Gemma3ForCausalLM``) over a flat token batch: the Llama
decoder's projections, LoRA targets and attention, with Gemma's differences (the first Gemma has
only the embedding scale and the (1 + w) norms).

- The token embedding is scaled by sqrt(hidden) (``embed_scale``), its LoRA delta and an adapter's
  trained copy with it, as PEFT scales them.
- Norms are RMSNorm of (1 + w), after attention and after the MLP as well as before each (VaultGemma,
  Gemma 2's layer otherwise, has none after);
  Gemma 3's q and k get a per-head norm before RoPE (as Qwen3's).
- Attention is scaled by ``query_pre_attn_scalar`` ** -0.5, not head_dim ** -0.5.
- Local layers (``layer_types`` "sliding_attention") attend within ``sliding_window``; Gemma 3's
  turn q and k by a RoPE of their own base (``rope_parameters`` per layer type).
- Gemma 2 soft-caps attention scores and the logits (``attn_logit_softcapping``,
  ``final_logit_softcapping``: x -> cap * tanh(x / cap)); the decode attention kernels (C++,
  Triton) cap the scores, prefill runs in torch ops (ops/attention.py ``eager_attention``).

Bidirectional attention (Gemma 3 embedding models) is refused at start-up.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StartupError
from .batch import StepBatch
from .layers import FlatAttention
from .llama import LlamaForServing, LlamaLayer, _head_dim, fast_norm, sliding_window


class GemmaLayer(LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.pre_feedforward_layernorm = fast_norm(hf_layer.pre_feedforward_layernorm)
        # VaultGemma's layer has neither norm after a block
        self.post_attention_layernorm = self.post_attention_layernorm or nn.Identity()
        self.post_feedforward_layernorm = fast_norm(getattr(hf_layer, "post_feedforward_layernorm", None)) or nn.Identity()

    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        return FlatAttention(layer, config.num_attention_heads, config.num_key_value_heads, _head_dim(config),
                             sliding_window=sliding_window(config, layer), scale=config.query_pre_attn_scalar**-0.5,
                             softcap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        h = h + self.post_attention_layernorm(self.attend(self.input_layernorm(h), batch, kv, apply_lora))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), batch, apply_lora))


class Gemma1ForServing(LlamaForServing):
    """Gemma (the first): the Llama decoder with Gemma's embedding scale and (1 + w) norms."""

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch) * self.embed_tokens.embed_scale.to(self.embed_tokens.weight.dtype)


class GemmaForServing(Gemma1ForServing):
    LAYER = GemmaLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        if getattr(hf_model.config.get_text_config(), "use_bidirectional_attention", False):
            raise StartupError("use_bidirectional_attention is not served: generation needs causal attention")
        super().__init__(hf_model, max_model_len, int8)
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
