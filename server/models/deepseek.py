"""Multi-head latent attention (MLA) decoders over a flat token batch: DeepSeek-V2
(``DeepseekV2ForCausalLM``: V2, V2-Lite, Coder-V2), DeepSeek-V3 (``DeepseekV3ForCausalLM``:
DeepSeek-V3, R1, Kimi K2, Moonlight), GLM-4.7-Flash
(``Glm4MoeLiteForCausalLM``) and A.X K1 (``AXK1ForCausalLM``) over the MoE decoder (moe.py; the
dense layers and the routed and shared experts as Hugging Face's own modules), and two dense ones
whose MLP projections are LoRA targets too (``DenseMLALayer``): Youtu-LLM (``YoutuForCausalLM``) and
MiniCPM3 (``MiniCPM3ForCausalLM``: the embedding scaled by ``scale_emb``, each block's output by
``scale_depth / sqrt(layers)``, the logits divided by ``hidden_size / dim_model_base``).

MLA's projections, each a LoRA target of its own:

    q = q_b_proj(norm(q_a_proj(x)))  (or q_proj(x) where ``q_lora_rank`` is None)   [T, H, nope + rope]
    latent, k_rope = kv_a_proj_with_mqa(x)                          [T, kv_lora_rank], [T, rope]
    k_nope, v = kv_b_proj(norm(latent))                             [T, H, nope], [T, H, v_head_dim]
    k = [k_nope, RoPE(k_rope) for every head];  q = [q_nope, RoPE(q_rope)]
    out = o_proj(attention(q, k, v))

RoPE turns the last ``qk_rope_head_dim`` dims of q and the one shared k_rope, on interleaved pairs
where ``rope_interleave`` (as Hugging Face computes it, writing the pairs' first and second members
as halves, the same permutation for q and k); DeepSeek-V2's always on interleaved pairs, as complex
numbers (``DeepseekV2Layer``). The paged cache keeps each head's expanded k and v
(v padded with zeros to k's width, so that one head dim serves both): more memory than the latent
alone, in exchange for the attention kernels every family shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .batch import StepBatch
from .cohere import ComplexRoPE, _rope_pairs
from .gemma import Gemma1ForServing
from .granite import GraniteLayer
from .layers import FlatAttention, FusedLoRALinear
from .llama import MLP_UP_KINDS, LlamaLayer, fast_norm, mlp_targets
from .moe import MoEForServing, MoELayer

KINDS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def mla_dims(config) -> tuple[int, int, int, int]:
    """(nope, rope, v, cached): per-head dims of q/k without and with RoPE, of v, and the cache's."""
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    return nope, rope, v, max(nope + rope, v)


class MLALayer(MoELayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        nn.Module.__init__(self)  # not LlamaLayer's: no q/k/v projections
        attn = hf_layer.self_attn
        self.input_layernorm = fast_norm(hf_layer.input_layernorm)
        self.post_attention_layernorm = fast_norm(hf_layer.post_attention_layernorm)
        self.projections = nn.ModuleDict({
            kind: FusedLoRALinear.from_linears([getattr(attn, kind)], (kind,), layer, int8)
            for kind in KINDS if getattr(attn, kind, None) is not None})
        self.q_a_layernorm = fast_norm(attn.q_a_layernorm)  # None without q_lora_rank
        self.kv_a_layernorm = fast_norm(attn.kv_a_layernorm)
        self.init_mlp(hf_layer.mlp, layer, int8)
        self.heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim, self.cached = mla_dims(config)
        self.kv_lora_rank, self.interleave = config.kv_lora_rank, bool(getattr(config, "rope_interleave", False))
        self.attention = FlatAttention(layer, self.heads, self.heads, self.cached, scale=attn.scaling)
        self.cos, self.sin = cos, sin  # [max_len, rope]: rope_rows reads them

    def lora_modules(self) -> list[FusedLoRALinear]:
        return list(self.projections.values())

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of x [T, heads, rope] as Hugging Face's DeepSeek-V3 computes it (cos [T, 1, rope], and
        sin through the family's table: ``signed_sin`` for ``_rope``, as it is for ``_rope_pairs``)."""
        if not self.interleave:
            return self.rope(x, cos, sin, x.shape[-1])
        half = x.shape[-1] // 2
        c, s = cos[..., half:], sin[..., half:]  # each frequency once (signed_sin keeps this half's sign)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def attend(self, x, batch: StepBatch, kv, apply_lora):
        p, T, H = self.projections, x.shape[0], self.heads
        if "q_proj" in p:
            q = p["q_proj"](x, batch.lora, apply_lora)
        else:
            q = p["q_b_proj"](self.q_a_layernorm(p["q_a_proj"](x, batch.lora, apply_lora)), batch.lora, apply_lora)
        q = q.view(T, H, self.nope + self.rope_dim)
        latent, k_rope = p["kv_a_proj_with_mqa"](x, batch.lora, apply_lora).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = p["kv_b_proj"](self.kv_a_layernorm(latent), batch.lora, apply_lora).view(
            T, H, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        cos, sin = self.rope_rows(batch)
        q = torch.cat((q[..., : self.nope], self.turn(q[..., self.nope :], cos, sin)), dim=-1)
        k = torch.cat((k_nope, self.turn(k_rope[:, None], cos, sin).expand(T, H, self.rope_dim)), dim=-1)
        pad = self.cached - q.shape[-1]  # zeros change no score
        q, k, v = F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, self.cached - self.v_dim))
        out = self.attention(q, k, v, batch, kv).view(T, H, self.cached)[..., : self.v_dim]
        return p["o_proj"](out.reshape(T, H * self.v_dim), batch.lora, apply_lora)


class DeepseekV2Layer(MLALayer):
    rope = staticmethod(_rope_pairs)  # HF's complex multiply of interleaved pairs (ComplexRoPE's table)


class DenseMLALayer(MLALayer):
    """MLA over Llama's gated MLP (gate|up, down: LoRA targets)."""

    init_mlp, mlp = LlamaLayer.init_mlp, LlamaLayer.mlp

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.act = hf_layer.mlp.act_fn

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [*super().lora_modules(), self.gate_up, self.down_proj]


class DeepseekV3ForServing(MoEForServing):
    FUSED_KINDS = ()  # each projection has an input of its own
    LAYER = MLALayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        config = self.config
        self.kv_spec = (config.num_hidden_layers, config.num_attention_heads, mla_dims(config)[3])

    @staticmethod
    def lora_targets(config):
        attn = "model.layers.{i}.self_attn."
        hidden, H = config.hidden_size, config.num_attention_heads
        nope, rope, v, _ = mla_dims(config)
        if config.q_lora_rank is None:
            targets = {"q_proj": (attn + "q_proj", hidden, H * (nope + rope))}
        else:
            targets = {"q_a_proj": (attn + "q_a_proj", hidden, config.q_lora_rank),
                       "q_b_proj": (attn + "q_b_proj", config.q_lora_rank, H * (nope + rope))}
        return {**targets, "kv_a_proj_with_mqa": (attn + "kv_a_proj_with_mqa", hidden, config.kv_lora_rank + rope),
                "kv_b_proj": (attn + "kv_b_proj", config.kv_lora_rank, H * (nope + v)),
                "o_proj": (attn + "o_proj", H * v, hidden)}


class DenseMLAForServing(DeepseekV3ForServing):
    FUSED_KINDS = (MLP_UP_KINDS,)
    LAYER = DenseMLALayer
    CUDA_GRAPHS = True

    @staticmethod
    def lora_targets(config):
        return {**DeepseekV3ForServing.lora_targets(config), **mlp_targets(config, MLP_UP_KINDS, "down_proj")}


class DeepseekV2ForServing(ComplexRoPE, DeepseekV3ForServing):
    LAYER = DeepseekV2Layer


class MiniCPM3Layer(DenseMLALayer):
    forward = GraniteLayer.forward  # each block's output scaled before the residual sum

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.residual_multiplier = config.scale_depth / math.sqrt(config.num_hidden_layers)


class MiniCPM3ForServing(DenseMLAForServing):
    LAYER = MiniCPM3Layer
    embed = Gemma1ForServing.embed  # the embedding module's own scale (scale_emb), as Gemma's

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_divisor = self.config.logits_scaling  # Hugging Face divides the hidden states before lm_head
