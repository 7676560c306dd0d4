"""The decoder's one-op RMSNorm and RoPE against Hugging Face's own modules and functions, bit for
bit: they replace HF's code on the hot path, so any difference would be a silent wrong output."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from loramux.server.models.llama import (
    GEMMA_RMS_NORMS,
    LLAMA_RMS_NORMS,
    RMSNorm,
    _rope,
    fast_norm,
    signed_sin,
)

MODULES = {"Gemma": "gemma", "Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "Phi3": "phi3",
           "Gemma2": "gemma2", "Gemma3": "gemma3", "Granite": "granite", "SmolLM3": "smollm3", "Olmo2": "olmo2", "Olmo3": "olmo3",
           "Mixtral": "mixtral", "Qwen2Moe": "qwen2_moe", "Qwen3Moe": "qwen3_moe", "Olmoe": "olmoe",
           "GraniteMoe": "granitemoe", "Glm": "glm", "Glm4": "glm4", "Helium": "helium", "Arcee": "arcee",
           "Exaone4": "exaone4", "HunYuanDenseV1": "hunyuan_v1_dense", "HyperCLOVAX": "hyperclovax", "Cwm": "cwm",
           "VaultGemma": "vaultgemma", "Apertus": "apertus", "GptOss": "gpt_oss", "GraniteSWA": "granite_swa",
           "GraniteMoeSWA": "granitemoe_swa", "Glm4Moe": "glm4_moe", "Dots1": "dots1", "MiniMaxM2": "minimax_m2",
           "FlexOlmo": "flex_olmo", "Ernie4_5_Moe": "ernie4_5_moe", "HunYuanMoEV1": "hunyuan_v1_moe",
           "Llama4Text": "llama4", "SolarOpen": "solar_open", "ExaoneMoe": "exaone_moe",
           "DeepseekV3": "deepseek_v3", "Glm4MoeLite": "glm4_moe_lite", "AXK1": "axk1", "Youtu": "youtu",
           "DeepseekV2": "deepseek_v2", "MiniCPM3": "minicpm3", "Qwen2VL": "qwen2_vl", "Qwen2_5_VL": "qwen2_5_vl",
           "Qwen3VLText": "qwen3_vl", "Qwen3VLMoeText": "qwen3_vl_moe", "Glm4v": "glm4v", "Glm4vMoeText": "glm4v_moe",
           "Lfm2": "lfm2", "Lfm2Moe": "lfm2_moe", "Lfm3": "lfm3", "Qwen3_5": "qwen3_5", "Qwen3_5Moe": "qwen3_5_moe",
           "Qwen3Next": "qwen3_next", "GraniteMoeHybrid": "granitemoehybrid",
           "NemotronH": "nemotron_h", "Bamba": "bamba", "FalconH1": "falcon_h1", "Mamba2": "mamba2", "Mamba": "mamba",
           "FalconMamba": "falcon_mamba", "Jamba": "jamba",
           "OlmoHybrid": "olmo_hybrid"}


def _norm_class(name: str):
    family = name.removesuffix("RMSNorm")
    return getattr(importlib.import_module(f"transformers.models.{MODULES[family]}.modeling_{MODULES[family]}"), name)


@pytest.mark.parametrize("name", sorted(LLAMA_RMS_NORMS | GEMMA_RMS_NORMS))
def test_every_named_norm_is_a_transformers_class_the_fast_path_takes(name):
    """A class renamed upstream would silently fall back to HF's module: fail here instead."""
    assert isinstance(fast_norm(_norm_class(name)(8)), RMSNorm)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_a_float32_serving_model_takes_the_one_op_norm_everywhere(family):
    """Every norm of the decoder (each layer's, q/k's where the family has them, the final one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loramux.server.models import serving_model_class

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    hf = AutoModelForCausalLM.from_config(config).eval()
    model = serving_model_class(type(hf).__name__)(hf, 32)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert len(norms) >= 2 * len(model.layers) + 1 and all(isinstance(m, RMSNorm) for m in norms), \
        sorted({type(m).__name__ for m in norms})


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(LLAMA_RMS_NORMS | GEMMA_RMS_NORMS)), rows=st.integers(1, 40),
       heads=st.sampled_from([(), (3,)]), width=st.sampled_from([8, 64, 576, 960, 2304]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_the_one_op_norm_equals_hugging_faces_bit_for_bit(name, rows, heads, width, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    hf = _norm_class(name)(width, eps=1e-6)
    hf.weight.data = torch.randn(width, generator=gen)
    fast = fast_norm(hf)
    assert isinstance(fast, RMSNorm)
    x = torch.randn(rows, *heads, width, generator=gen) * scale
    with torch.no_grad():
        assert torch.equal(fast(x), hf(x))


def test_other_dtypes_and_norms_keep_their_own_module():
    bf16 = _norm_class("LlamaRMSNorm")(16).to(torch.bfloat16)
    layer_norm = torch.nn.LayerNorm(16)
    assert fast_norm(bf16) is bf16 and fast_norm(layer_norm) is layer_norm and fast_norm(None) is None


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 20), heads=st.integers(1, 6), head_dim=st.sampled_from([8, 32, 64, 96]),
       partial=st.sampled_from([1.0, 0.5, 0.75]), seed=st.integers(0, 2**16))
def test_rope_by_roll_equals_hugging_faces_rotate_half_bit_for_bit(tokens, heads, head_dim, partial, seed):
    """Full RoPE as Llama's apply_rotary_pos_emb, and a partial one as Phi-3's (RoPE on the first
    dims of each head, the rest passed through)."""
    gen = torch.Generator().manual_seed(seed)
    rotary = int(head_dim * partial) // 2 * 2
    x = torch.randn(tokens, heads, head_dim, generator=gen)
    freqs = torch.randn(tokens, rotary // 2, generator=gen) * 10
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # [tokens, rotary]
    if rotary == head_dim:
        want = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)[0]
    else:
        turned = x[..., :rotary]
        want = torch.cat((turned * cos[:, None] + rotate_half(turned) * sin[:, None], x[..., rotary:]), dim=-1)
    assert torch.equal(_rope(x, cos[:, None], signed_sin(sin)[:, None], rotary), want)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 20), heads=st.integers(1, 6), head_dim=st.sampled_from([8, 32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_coheres_rope_on_interleaved_pairs_equals_hugging_faces_bit_for_bit(tokens, heads, head_dim, seed):
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope

    from loramux.server.models.cohere import _rope_pairs

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=gen)
    freqs = torch.randn(tokens, head_dim // 2, generator=gen) * 10
    emb = torch.repeat_interleave(freqs, 2, dim=-1)  # each frequency twice, side by side, as Cohere's table
    want = cohere_rope(x, x, emb.cos(), emb.sin(), unsqueeze_dim=1)[0]
    assert torch.equal(_rope_pairs(x, emb.cos()[:, None], emb.sin()[:, None], head_dim), want)
