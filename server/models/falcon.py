"""Falcon (``FalconForCausalLM``: Falcon 7B, 40B, 180B, 10B) over a flat token batch.

- ``query_key_value`` holds q, k, v as one LoRA target, laid out by the config: the new decoder
  architecture (40B, 180B) groups each key/value head with its query heads ([kv, q/kv + 2, hd]);
  ``multi_query`` (7B) has the query heads, then one key head and one value head; otherwise each
  head's q, k, v lie side by side ([heads, 3, hd]).
- RoPE on the whole head; ALiBi (Falcon-RW) is refused at start-up.
- Attention and the MLP (``dense_h_to_4h``, ``dense_4h_to_h``) side by side, h + (mlp + attention),
  on one LayerNorm's output or, in the new architecture with ``num_ln_in_parallel_attn`` 2, each on
  its own (``ln_attn``, ``ln_mlp``); sequential where ``parallel_attn`` is off.
"""

from __future__ import annotations

from torch import nn

from ..config import StartupError
from .batch import StepBatch
from .layers import qkv_dense_projections, qkv_dense_targets
from .llama import LlamaForServing, PlainMLPLayer


class FalconLayer(PlainMLPLayer):
    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn, mlp = hf_layer.self_attention, hf_layer.mlp
        self.new_architecture = config.new_decoder_architecture
        two_norms = self.new_architecture and config.num_ln_in_parallel_attn == 2
        self.input_layernorm = hf_layer.ln_attn if two_norms else hf_layer.input_layernorm
        # the MLP's own norm: ln_mlp, or the sequential block's; None: it shares the attention's
        self.post_attention_layernorm = hf_layer.ln_mlp if two_norms else getattr(hf_layer, "post_attention_layernorm",
                                                                                   None)
        self.parallel = self.new_architecture or config.parallel_attn
        self.qkv, self.o_proj, self.up, self.down = qkv_dense_projections(attn, mlp, layer, int8)
        self.act, self.multi_query = mlp.act, config.multi_query
        self.q_norm = self.k_norm = None
        self.init_attention(config, layer, cos, sin)

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        x = self.input_layernorm(h)
        attn = self.attend(x, batch, kv, apply_lora)
        if self.parallel:
            y = x if self.post_attention_layernorm is None else self.post_attention_layernorm(h)
            return h + (self.mlp(y, batch, apply_lora) + attn)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora)

    def qkv_heads(self, qkv, batch: StepBatch):
        if self.multi_query and not self.new_architecture:  # q's heads, then k's, then v's: Llama's columns
            return super().qkv_heads(qkv, batch)
        T, heads, kv_heads, hd = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.new_architecture:
            grouped = qkv.view(T, kv_heads, heads // kv_heads + 2, hd)
            q, k, v = grouped[:, :, :-2].flatten(1, 2), grouped[:, :, -2], grouped[:, :, -1]
        else:
            q, k, v = qkv.view(T, heads, 3, hd).unbind(2)
        return (*self.rope_qk(q, k, batch), v)


class FalconForServing(LlamaForServing):
    EMBEDDING = ("transformer.word_embeddings", "word_embeddings")
    INNER, LAYERS, FINAL_NORM = "transformer", "h", "ln_f"
    FUSED_KINDS = ()
    LAYER = FalconLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        if hf_model.config.alibi:
            raise StartupError("Falcon's ALiBi (alibi: true, as Falcon-RW's) is not served")
        super().__init__(hf_model, max_model_len, int8)

    @staticmethod
    def lora_targets(config):
        d, hd = config.hidden_size, config.hidden_size // config.num_attention_heads
        qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
        return qkv_dense_targets("transformer.h.{i}.self_attention.", "transformer.h.{i}.mlp.", d, qkv,
                                 config.ffn_hidden_size)
