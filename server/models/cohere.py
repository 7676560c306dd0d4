"""Cohere (``CohereForCausalLM``: Command R, Aya; ``Cohere2ForCausalLM``: Command R7B, Command A)
over a flat token batch: the Llama decoder with

- LayerNorms without a bias (the model's own modules: mean-centred, in float32);
- a parallel block under one of them: h + attention(x) + mlp(x) of x = ln(h), in HF's order;
- RoPE on interleaved pairs of dims (x[2i], x[2i+1]), not on the two halves of each head;
- q and k normed per head, each head by weights of its own, where ``use_qk_norm``;
- the logits times ``logit_scale``, after LoRA on lm_head (``ServingModel.logit_multiplier``);
- Cohere 2: local layers (``layer_types`` "sliding_attention") attend within a window and turn q
  and k by RoPE; the global ones attend to everything without RoPE.
"""

from __future__ import annotations

import torch

from .llama import LlamaForServing, LlamaLayer


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int) -> torch.Tensor:
    """HF Cohere's (and GPT-J's) RoPE of x [T, heads, hd] on its first ``rotary`` dims:
    x * cos + turn(x) * sin, turn(x)[2i] = -x[2i+1] and turn(x)[2i+1] = x[2i], over cos and sin
    [T, 1, rotary] that repeat each frequency twice."""
    turned = x if rotary == x.shape[-1] else x[..., :rotary]
    out = turned * cos + torch.stack((-turned[..., 1::2], turned[..., ::2]), dim=-1).flatten(-2) * sin
    return out if rotary == x.shape[-1] else torch.cat((out, x[..., rotary:]), dim=-1)


class ComplexRoPE:
    """A serving model whose Hugging Face rotary module gives complex frequencies cos + i sin
    [.., rotary / 2], which it multiplies with x's interleaved pairs (Llama 4's, DeepSeek-V2's):
    the table ``_rope_pairs`` takes, each frequency twice in a row (the same arithmetic)."""

    SIGNED_SIN = False

    def rope_table(self, inner, max_model_len: int, kind) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = self.lm_head.weight.new_empty(0)
        freqs = inner.rotary_emb(dummy, torch.arange(max_model_len, device=dummy.device)[None])[0]  # complex [L, r/2]
        return tuple(t.float().repeat_interleave(2, dim=-1).to(dummy.dtype) for t in (freqs.real, freqs.imag))


class CohereLayer(LlamaLayer):
    rope = staticmethod(_rope_pairs)
    parallel = True


class CohereForServing(LlamaForServing):
    LAYER = CohereLayer
    SIGNED_SIN = False

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_multiplier = self.config.logit_scale


class Cohere2Layer(CohereLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.use_rope = config.layer_types[layer] == "sliding_attention"


class Cohere2ForServing(CohereForServing):
    LAYER = Cohere2Layer
