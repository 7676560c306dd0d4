"""GPT-NeoX (``GPTNeoXForCausalLM``: Pythia, Dolly v2, RedPajama-INCITE) over a flat token batch.

- ``query_key_value`` fused with each head's q, k, v interleaved ([heads, 3, head_dim]), as BLOOM's;
  ``dense`` after attention; a plain MLP (``dense_h_to_4h``, ``dense_4h_to_h``); biases throughout.
- RoPE on the first ``partial_rotary_factor`` of each head's dims (Hugging Face's rotate_half).
- Two LayerNorms a layer. With ``use_parallel_residual`` (the default): attention and the MLP side
  by side on differently normed copies of h, summed as Hugging Face sums them,
  (mlp(ln2(h)) + attention(ln1(h))) + h; without it, sequential.
- The token embedding is ``embed_in``; the output projection is ``lm_head`` (``embed_out`` before
  transformers 5, which renames it).

Persimmon (``PersimmonForCausalLM``: Persimmon-8B, Fuyu's decoder) has the same layer, sequential,
under Llama's module names, with q and k each normed per head by a LayerNorm before RoPE
(``qk_layernorm``) and a relu2 MLP.
"""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN

from .batch import StepBatch
from .layers import qkv_dense_projections, qkv_dense_targets
from .llama import LlamaForServing, PlainMLPLayer


class GPTNeoXLayer(PlainMLPLayer):
    ATTN = "attention"  # the Hugging Face layer's attention module (Persimmon's: self_attn)

    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn, mlp = getattr(hf_layer, self.ATTN), hf_layer.mlp
        self.input_layernorm, self.post_attention_layernorm = hf_layer.input_layernorm, hf_layer.post_attention_layernorm
        self.qkv, self.o_proj, self.up, self.down = qkv_dense_projections(attn, mlp, layer, int8)
        self.q_norm, self.k_norm = (attn.q_layernorm, attn.k_layernorm) if getattr(config, "qk_layernorm", False) \
            else (None, None)
        self.act = ACT2FN[config.hidden_act]
        self.parallel = getattr(config, "use_parallel_residual", False)
        self.init_attention(config, layer, cos, sin)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        attn = self.attend(self.input_layernorm(h), batch, kv, apply_lora)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(h), batch, apply_lora) + attn + h
        h = attn + h
        return self.mlp(self.post_attention_layernorm(h), batch, apply_lora) + h

    def qkv_heads(self, qkv, batch: StepBatch):
        q, k, v = qkv.view(qkv.shape[0], self.heads, 3, self.head_dim).unbind(2)  # each head's q, k, v side by side
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return (*self.rope_qk(q, k, batch), v)


class GPTNeoXForServing(LlamaForServing):
    EMBEDDING = ("gpt_neox.embed_in", "embed_in")
    INNER = "gpt_neox"
    FINAL_NORM = "final_layer_norm"
    FUSED_KINDS = ()
    LAYER = GPTNeoXLayer

    @classmethod
    def lora_targets(cls, config):
        d, layers = config.hidden_size, f"{cls.INNER}.layers.{{i}}."
        return qkv_dense_targets(f"{layers}{cls.LAYER.ATTN}.", layers + "mlp.", d, 3 * d, config.intermediate_size)


class PersimmonLayer(GPTNeoXLayer):
    ATTN = "self_attn"


class PersimmonForServing(GPTNeoXForServing):
    EMBEDDING = ("model.embed_tokens", "embed_tokens")
    INNER = "model"
    FINAL_NORM = "final_layernorm"
    LAYER = PersimmonLayer
