"""GPT-J (``GPTJForCausalLM``: GPT-J 6B, and models trained from it) over a flat token batch.

- One LayerNorm before a parallel block: attention(x) + mlp(x) + h of x = ln_1(h), summed in
  Hugging Face's order (Phi's block, ``PhiLayer``).
- q, k and v are separate linears without biases (LoRA targets of their own, fused into one matmul
  here); the output projection is ``out_proj``; the MLP (``fc_in``, ``fc_out``) is not gated.
- RoPE on interleaved pairs of the first ``rotary_dim`` dims of each head (Cohere's turn), from
  the model's own sinusoid table, each frequency taken twice in a row.
- lm_head has a bias.
"""

from __future__ import annotations

from .cohere import _rope_pairs
from .llama import ATTN_KINDS, LlamaForServing, attention_targets, mlp_targets
from .phi import PhiLayer


class GPTJLayer(PhiLayer):
    ATTN, NORM, OUT, UP, DOWN = "attn", "ln_1", "out_proj", "fc_in", "fc_out"
    ACT = "activation_function"
    rope = staticmethod(_rope_pairs)


class GPTJForServing(LlamaForServing):
    EMBEDDING = ("transformer.wte", "wte")
    INNER = "transformer"
    LAYERS = "h"
    FINAL_NORM = "ln_f"
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = GPTJLayer
    SIGNED_SIN = False

    def rope_table(self, inner, max_model_len: int, kind: str | None):
        """HF's table is [positions, rotary_dim] as cat(sin, cos), one column per frequency."""
        sincos = inner.rotary_emb.embed_positions[:max_model_len].to(self.lm_head.weight.dtype)
        sin, cos = sincos.chunk(2, dim=-1)
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)

    @staticmethod
    def position_limit(config) -> int:
        return config.max_position_embeddings  # the sinusoid table's rows

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config, "out_proj", "transformer.h.{i}.attn."),
                **mlp_targets(config, ("fc_in",), "fc_out", mlp="transformer.h.{i}.mlp.",
                              inter=config.n_inner or 4 * config.hidden_size)}
