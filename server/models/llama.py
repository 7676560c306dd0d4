"""Llama-family decoder (LLaMA, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2, SmolLM3) over a flat token batch.

Built from a loaded Hugging Face model, sharing its embedding, norms and lm_head, with the
attention and MLP projections fused (q|k|v and gate|up) so that a step makes few large matmuls.
Grouped-query attention, RoPE (any HF scaling: the cos/sin table comes from HF's own rotary
module), Qwen2's q/k/v biases, Qwen3's per-head RMSNorm of q and k (before RoPE) and sliding
windows (Mistral's, or per layer as Qwen3's ``layer_types``), SmolLM3's layers without RoPE
(``no_rope_layers``), and Phi-3's single q|k|v and gate|up linears (LoRA targets of their own) with
RoPE on part of each head, are handled here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .base import ServingModel
from .batch import StepBatch
from .layers import FlatAttention, FusedLoRALinear

ATTN_KINDS = ("q_proj", "k_proj", "v_proj")
MLP_UP_KINDS = ("gate_proj", "up_proj")


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [.., rotary] with its first half negated, so that HF's rotate_half(x) * sin is
    roll(x, rotary / 2) * signed_sin(sin), bit for bit (a sign flip is exact): one op for four."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x, cos, sin, rotary: int):
    """x [T, heads, hd] with RoPE on its first ``rotary`` dims of each head (cos, and sin through
    ``signed_sin``, [T, 1, rotary]): HF's x * cos + rotate_half(x) * sin."""
    if rotary == x.shape[-1]:
        return x * cos + x.roll(rotary // 2, -1) * sin
    turned = x[..., :rotary]
    return torch.cat((turned * cos + turned.roll(rotary // 2, -1) * sin, x[..., rotary:]), dim=-1)


# Hugging Face's RMSNorms, computed in float32: w * (x * rsqrt(mean(x^2) + eps)), Gemma's with 1 + w
LLAMA_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                             "GraniteRMSNorm", "SmolLM3RMSNorm", "Olmo2RMSNorm", "Olmo3RMSNorm", "MixtralRMSNorm",
                             "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "OlmoeRMSNorm", "GraniteMoeRMSNorm",
                             "GlmRMSNorm", "Glm4RMSNorm", "HeliumRMSNorm", "ArceeRMSNorm",
                             "Exaone4RMSNorm", "HunYuanDenseV1RMSNorm",
                             "HyperCLOVAXRMSNorm", "CwmRMSNorm", "ApertusRMSNorm", "GptOssRMSNorm",
                             "GraniteSWARMSNorm", "GraniteMoeSWARMSNorm", "Glm4MoeRMSNorm", "Dots1RMSNorm",
                             "MiniMaxM2RMSNorm", "FlexOlmoRMSNorm", "Ernie4_5_MoeRMSNorm", "HunYuanMoEV1RMSNorm",
                             "Llama4TextRMSNorm", "SolarOpenRMSNorm", "ExaoneMoeRMSNorm", "DeepseekV3RMSNorm",
                             "Glm4MoeLiteRMSNorm", "AXK1RMSNorm", "YoutuRMSNorm",
                             "DeepseekV2RMSNorm", "MiniCPM3RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm",
                             "Qwen3VLTextRMSNorm", "Qwen3VLMoeTextRMSNorm", "Glm4vRMSNorm", "Glm4vMoeTextRMSNorm",
                             "Lfm2RMSNorm", "Lfm2MoeRMSNorm", "Lfm3RMSNorm", "GraniteMoeHybridRMSNorm",
                             "NemotronHRMSNorm", "BambaRMSNorm", "FalconH1RMSNorm",
                             "Mamba2RMSNorm", "MambaRMSNorm", "OlmoHybridRMSNorm", "FalconMambaRMSNorm", "JambaRMSNorm"})
GEMMA_RMS_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "VaultGemmaRMSNorm", "Qwen3_5RMSNorm",
                             "Qwen3_5MoeRMSNorm", "Qwen3NextRMSNorm"})


class RMSNorm(nn.Module):
    """HF's RMSNorm over the last dim as torch's one op, ``F.rms_norm``: bit for bit the same in
    float32 on a CPU, without five Python-level ops a call (1-2 ms of a small model's step)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps, self.shape = eps, (weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


def fast_norm(norm: nn.Module | None) -> nn.Module | None:
    """``norm`` as an RMSNorm where that is exact (HF's norm of a float32 model on a CPU; in other
    dtypes HF casts where the fused op does not), else itself."""
    weight = getattr(norm, "weight", None)  # OLMo 1's LayerNorms have none
    if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return norm
    if type(norm).__name__ in LLAMA_RMS_NORMS:
        return RMSNorm(norm.weight.detach(), norm.variance_epsilon)
    if type(norm).__name__ in GEMMA_RMS_NORMS:
        return RMSNorm(1.0 + norm.weight.detach(), norm.eps)  # HF's 1.0 + w, once
    return norm


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # GPT-NeoX's: no GQA


def sliding_window(config, layer: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] != "sliding_attention":
        return None
    return window


def attention_targets(config, out: str = "o_proj", attn: str = "model.layers.{i}.self_attn."
                      ) -> dict[str, tuple[str, int, int]]:
    """The LoRA targets (``ServingModel.lora_targets``) of an attention with separate q_proj,
    k_proj and v_proj and an output projection ``out``, under the module name template ``attn``."""
    hidden, head_dim = config.hidden_size, _head_dim(config)
    q, kv = config.num_attention_heads * head_dim, _kv_heads(config) * head_dim
    return {"q_proj": (attn + "q_proj", hidden, q), "k_proj": (attn + "k_proj", hidden, kv),
            "v_proj": (attn + "v_proj", hidden, kv), out: (attn + out, q, hidden)}


def mlp_targets(config, up: tuple[str, ...], down: str, fused: int = 1, mlp: str = "model.layers.{i}.mlp.",
                inter: int | None = None) -> dict[str, tuple[str, int, int]]:
    """The LoRA targets of an MLP under the template ``mlp``: each of ``up`` from the hidden size to
    ``fused`` x the intermediate size (``inter``, default the config's; fused 2 where gate and up
    are one linear), then ``down`` back."""
    hidden, inter = config.hidden_size, inter or config.intermediate_size
    return {**{kind: (mlp + kind, hidden, fused * inter) for kind in up}, down: (mlp + down, inter, hidden)}


def rope_split(inner, config, max_model_len: int) -> int | None:
    """``ServingModel.rope_split`` of a Hugging Face model whose rotary module changes its
    frequencies with the sequence's length: longrope (Phi-3's 128k models, Phi-3.5, Phi-4-mini)
    past ``original_max_position_embeddings``, dynamic NTK past ``max_position_embeddings``; None
    for a static RoPE, or where max_model_len stays within that context."""
    rotary = getattr(inner, "rotary_emb", None)
    kind = getattr(rotary, "rope_type", None)
    if not isinstance(kind, str):  # none, or one per layer type
        return None
    if kind == "longrope":
        split = config.rope_parameters["original_max_position_embeddings"]
    elif "dynamic" in kind:  # its frequencies for the longest sequence stand in for every longer one
        split = rotary.original_max_seq_len
    else:
        return None
    return split if max_model_len > split else None


def rope_row(position: int, split: int, long_rope: bool) -> int:
    """A row's row of a split RoPE table (``ServingModel.rope_split``): Hugging Face's generate
    turns a prompt longer than ``split`` (``long_rope``; in Phi-3 also a sequence that outgrew it,
    recomputed) by the long frequencies throughout, and each later token by the long ones once its
    position reaches ``split``."""
    return position + split if long_rope or position >= split else position


class LlamaLayer(nn.Module):
    rope = staticmethod(_rope)  # Cohere's turns interleaved pairs (CohereLayer)
    qk_norm_whole = False  # OLMo 2's norms of q and k: over all heads' dims at once (Olmo2Layer)
    parallel = False  # one norm before attention and the MLP side by side (Cohere's; StableLM's option)
    MLP = "mlp"  # the Hugging Face layer's MLP (Granite MoE's: block_sparse_moe)

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__()
        attn, mlp = hf_layer.self_attn, getattr(hf_layer, self.MLP)
        self.input_layernorm = fast_norm(getattr(hf_layer, "input_layernorm", None))  # OLMo 2 has none
        self.post_attention_layernorm = fast_norm(getattr(hf_layer, "post_attention_layernorm", None))  # Cohere: none
        if hasattr(attn, "qkv_proj"):  # Phi-3: one linear each, one LoRA target each
            self.qkv = FusedLoRALinear.from_linears([attn.qkv_proj], ("qkv_proj",), layer, int8)
        else:
            self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        self.o_proj = FusedLoRALinear.from_linears([attn.o_proj], ("o_proj",), layer, int8)
        self.init_mlp(mlp, layer, int8)
        # norms of q and k before RoPE: Qwen3's (and Gemma 3's) per head, OLMo 2's over all heads' dims at once
        self.q_norm, self.k_norm = fast_norm(getattr(attn, "q_norm", None)), fast_norm(getattr(attn, "k_norm", None))
        # the model's own activation where its MLP has one (Apertus' xIELU has trained parameters)
        self.act = getattr(mlp, "act_fn", None) or ACT2FN[getattr(config, "hidden_activation", None) or config.hidden_act]
        self.init_attention(config, layer, cos, sin)
        self.attention.set_sinks(getattr(attn, "sinks", None))  # GPT-OSS's and GraniteSWA's

    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        """The MLP's projections: gate|up (Phi-3's one linear) and down."""
        if hasattr(mlp, "gate_up_proj"):
            self.gate_up = FusedLoRALinear.from_linears([mlp.gate_up_proj], ("gate_up_proj",), layer, int8)
        else:
            self.gate_up = FusedLoRALinear.from_linears([mlp.gate_proj, mlp.up_proj], MLP_UP_KINDS, layer, int8)
        self.down_proj = FusedLoRALinear.from_linears([mlp.down_proj], ("down_proj",), layer, int8)

    def init_attention(self, config, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """What ``attend`` reads besides the projections and q/k norms."""
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, _kv_heads(config), _head_dim(config)
        self.attention = self.make_attention(config, layer)
        self.cos, self.sin = cos, sin  # [max_len, rotary dim] (sin through signed_sin), shared by all layers; None: no RoPE
        self.rotary = 0 if cos is None else cos.shape[-1]  # the first dims of each head RoPE turns: all, or Phi-3's partial_rotary_factor
        no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3's: 0 for a layer without RoPE (NoPE)
        thetas = getattr(config, "layer_rope_theta", None)  # GraniteSWA's: each layer's RoPE base, 0 for NoPE
        self.use_rope = cos is not None and (no_rope is None or bool(no_rope[layer])) and (
            thetas is None or bool(thetas[layer]))

    @staticmethod
    def make_attention(config, layer: int) -> FlatAttention:
        return FlatAttention(layer, config.num_attention_heads, _kv_heads(config), _head_dim(config),
                             sliding_window=sliding_window(config, layer))

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        if self.parallel:  # summed in HF's order: the residual, attention, then the MLP
            x = self.input_layernorm(h)
            return h + self.attend(x, batch, kv, apply_lora) + self.mlp(x, batch, apply_lora)
        h = h + self.attend(self.input_layernorm(h), batch, kv, apply_lora)
        return h + self.mlp(self.post_attention_layernorm(h), batch, apply_lora)

    def attend(self, x, batch: StepBatch, kv, apply_lora):
        """Attention of the normed input x [T, hidden], through o_proj."""
        q, k, v = self.qkv_heads(self.qkv(x, batch.lora, apply_lora), batch)
        return self.o_proj(self.attention(self.scale_queries(q, batch), k, v, batch, kv), batch.lora, apply_lora)

    def qkv_heads(self, qkv: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv's columns [T, (heads + 2 kv_heads) hd] (q, then k, then v) -> q [T, heads, hd], k and v
        [T, kv_heads, hd], q and k normed and turned by RoPE. A family with another layout overrides it."""
        T, heads, kv_heads, hd = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        q_end, k_end = heads * hd, (heads + kv_heads) * hd
        v = qkv[:, k_end:].view(T, kv_heads, hd)
        if self.q_norm is None and self.use_rope:  # q and k side by side in qkv: one RoPE over both
            cos, sin = self.rope_rows(batch)
            qk = self.rope(qkv[:, :k_end].view(T, heads + kv_heads, hd), cos, sin, self.rotary)
            return qk[:, :heads], qk[:, heads:], v
        q, k = qkv[:, :q_end], qkv[:, q_end:k_end]
        if self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(T, heads, hd), k.view(T, kv_heads, hd)
        if self.q_norm is not None and not self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        return (*self.rope_qk(q, k, batch), v) if self.use_rope else (q, k, v)

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, hd] and k [T, kv_heads, hd] turned by RoPE at the batch's positions."""
        cos, sin = self.rope_rows(batch)
        return self.rope(q, cos, sin, self.rotary), self.rope(k, cos, sin, self.rotary)

    def scale_queries(self, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """q [T, heads, hd] after RoPE, scaled where a family scales it by position (Ministral 3's)."""
        return q

    def rope_rows(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary] at the batch's positions: once per step and table, shared by layers."""
        key = ("rope", id(self.cos))
        rope = batch.masks.get(key)
        if rope is None:
            rows = batch.positions if batch.rope_positions is None else batch.rope_positions
            rope = batch.masks[key] = (self.cos[rows][:, None], self.sin[rows][:, None])
        return rope

    def mlp(self, x, batch: StepBatch, apply_lora):
        """down(act(gate x) * up x) of the normed input x."""
        gate_up = self.gate_up(x, batch.lora, apply_lora)
        inter = gate_up.shape[1] // 2
        return self.down_proj(self.act(gate_up[:, :inter]) * gate_up[:, inter:], batch.lora, apply_lora)


class QKNormsAfterRoPE:
    """A layer mixin: q and k normed per head after RoPE, by ``q_norm_after`` and ``k_norm_after``."""

    def qkv_heads(self, qkv: torch.Tensor, batch: StepBatch):
        q, k, v = super().qkv_heads(qkv, batch)
        return self.q_norm_after(q), self.k_norm_after(k), v


class PlainMLPLayer(LlamaLayer):
    """A layer whose MLP has no gate, down(act(up x)) (Phi's fc1/fc2, GPT-NeoX's, StarCoder2's
    c_fc/c_proj): a family's ``__init__`` sets ``up`` and ``down``."""

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj, self.up, self.down]

    def mlp(self, x, batch: StepBatch, apply_lora):
        return self.down(self.act(self.up(x, batch.lora, apply_lora)), batch.lora, apply_lora)


class LlamaForServing(ServingModel):
    EMBEDDING = ("model.embed_tokens", "embed_tokens")
    FUSED_KINDS = (ATTN_KINDS, MLP_UP_KINDS)
    LAYER = LlamaLayer  # a family's own decoder layer (Granite, OLMo 2, Phi, StableLM, GPT-NeoX)
    INNER = "model"  # the Hugging Face model's decoder (GPT-NeoX's: gpt_neox; a vision-language checkpoint's: vision_language.py)
    LAYERS = "layers"  # the decoder's layers (Falcon's: h)
    FINAL_NORM = "norm"  # the inner model's norm before lm_head (Phi's: final_layernorm)
    SIGNED_SIN = True  # the sin table as _rope's roll takes it (signed_sin); Cohere's interleaved RoPE: as HF's

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        config = self.config = hf_model.config.get_text_config()  # a vision-language model's decoder's
        inner = hf_model.get_submodule(self.INNER)
        setattr(self, self.EMBEDDING[1], getattr(inner, self.EMBEDDING[1]))
        self.final_norm = fast_norm(getattr(inner, self.FINAL_NORM))
        self.lm_head = hf_model.lm_head
        kinds = self.rope_kinds(config)
        tables = {}
        self.rope_split = rope_split(inner, config, max_model_len)
        for j, kind in enumerate(dict.fromkeys(kinds)):
            # split: the short frequencies' rows, then the long ones' (ServingModel.rope_split), in that
            # order, as the rotary module switches on the length it is called with
            short = None if self.rope_split is None else self.rope_table(inner, self.rope_split, kind)
            cos, sin = self.rope_table(inner, max_model_len, kind)
            if cos is None:  # no positions encoded: every layer's use_rope is off (init_attention)
                tables[kind] = None, None
                continue
            if short is not None:
                cos, sin = torch.cat((short[0], cos)), torch.cat((short[1], sin))
            name = "" if kind is None else f"_{j}"
            self.register_buffer(f"cos{name}", cos, persistent=False)
            self.register_buffer(f"sin{name}", signed_sin(sin) if self.SIGNED_SIN else sin, persistent=False)
            tables[kind] = getattr(self, f"cos{name}"), getattr(self, f"sin{name}")
        self.layers = nn.ModuleList(self.LAYER(layer, config, i, *tables[kinds[i]], int8)
                                    for i, layer in enumerate(getattr(inner, self.LAYERS)))
        self.kv_spec = (config.num_hidden_layers, _kv_heads(config), _head_dim(config))

    @staticmethod
    def rope_kinds(config) -> list:
        """Each layer's RoPE table, by a key ``rope_table`` takes: one table (None), or one per layer
        type where the config keys RoPE by type (Gemma 3's, OLMo 3's)."""
        types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
        by_type = all(kind in (getattr(config, "rope_parameters", None) or {}) for kind in types)
        return types if by_type else [None] * config.num_hidden_layers

    def rope_table(self, inner, max_model_len: int, kind) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_model_len, rotary dim] in the model's dtype, as the Hugging Face model's
        rotary module computes them (of layer type ``kind``, where the config keys RoPE by type).
        None for a decoder without one, which encodes no positions (Granite 4.0-H's without
        position_embedding_type, Nemotron-H's, Jamba's, OLMo Hybrid's without a RoPE base)."""
        if getattr(inner, "rotary_emb", None) is None:
            return None, None
        return self.rotary_table(inner.rotary_emb, max_model_len, *([] if kind is None else [kind]))

    def rotary_table(self, rotary, max_model_len: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """A Hugging Face rotary module's cos and sin at positions [0, max_model_len)."""
        dummy = self.lm_head.weight.new_empty(0)
        positions = torch.arange(max_model_len, device=dummy.device)[None]
        cos, sin = rotary(dummy, positions, *args)  # [1, max_len, hd]
        return cos[0].to(dummy.dtype), sin[0].to(dummy.dtype)

    @staticmethod
    def lora_targets(config):
        return {**attention_targets(config), **mlp_targets(config, MLP_UP_KINDS, "down_proj")}

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch)


class Phi3ForServing(LlamaForServing):
    """Phi-3 and Phi-4-mini: q|k|v and gate|up stored as one linear each (``qkv_proj``,
    ``gate_up_proj``), which adapters target whole; a longrope sequence is recomputed by the long
    frequencies when it outgrows the short context, as Hugging Face's Phi-3 generates."""

    FUSED_KINDS = ()
    RECOMPUTE_AT_ROPE_SPLIT = True

    @staticmethod
    def lora_targets(config):
        targets = attention_targets(config)
        (_, hidden, q), (_, _, kv) = targets["q_proj"], targets["k_proj"]
        return {"qkv_proj": ("model.layers.{i}.self_attn.qkv_proj", hidden, q + 2 * kv), "o_proj": targets["o_proj"],
                **mlp_targets(config, ("gate_up_proj",), "down_proj", fused=2)}
