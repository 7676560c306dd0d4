"""ERNIE 4.5 dense (``Ernie4_5ForCausalLM``): the Llama decoder with RoPE on interleaved pairs of
each head's dims, as Cohere's, its table taking each frequency twice in a row (Hugging Face's
rotary module gives cat(freqs, freqs), which its RoPE re-lays that way), and optional biases
(``use_bias``)."""

from __future__ import annotations

from .cohere import _rope_pairs
from .llama import LlamaForServing, LlamaLayer


class Ernie4_5Layer(LlamaLayer):
    rope = staticmethod(_rope_pairs)


class Ernie4_5ForServing(LlamaForServing):
    LAYER = Ernie4_5Layer
    SIGNED_SIN = False

    def rope_table(self, inner, max_model_len: int, kind: str | None):
        return tuple(t[:, : t.shape[1] // 2].repeat_interleave(2, dim=1)
                     for t in super().rope_table(inner, max_model_len, kind))
