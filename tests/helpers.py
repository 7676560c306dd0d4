"""Builders for tiny random-weight models and PEFT adapters. Nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import torch

CHAT_TEMPLATE = (  # a chat_template_kwargs variable it reads: preamble; and documents
    "{% if preamble is defined %}{{ preamble }}\n{% endif %}"
    "{% for d in documents or [] %}<doc>{{ d['text'] }}</doc>\n{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Once upon a time there was a little server that batched many adapters together.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé wörds, 東京 and emoji 🚀 too.",
    "LoRA adds a low-rank update B A to a frozen weight W, scaled by alpha over r.",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 384, extra_specials: tuple[str, ...] = (),
                    chat_template: str = CHAT_TEMPLATE, extra_tokens: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None,
                                   pad_token="<|endoftext|>")
    if extra_specials:  # ids from vocab_size on, as a model's added special tokens (Mistral's [TOOL_CALLS])
        fast.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    if extra_tokens:  # added tokens that are not special (Qwen3's <think> and </think>)
        fast.add_tokens(list(extra_tokens))
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast


def build_llama(out: Path, seed: int = 0, extra_specials: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE,
                extra_tokens: tuple[str, ...] = (), **overrides) -> Path:
    """A 2-layer random Llama with grouped-query attention, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, extra_specials=extra_specials, chat_template=chat_template, extra_tokens=extra_tokens)
    cfg = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def _family_config(family: str, vocab: int, eos: int, pad: int):
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
                  initializer_range=0.2, tie_word_embeddings=False)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    if family == "mistral":  # a tiny sliding window so that prompts longer than it exercise it
        return tf.MistralConfig(**common, **llama_like, sliding_window=6, architectures=["MistralForCausalLM"])
    if family == "ministral":  # Ministral 8B's: a sliding layer, then a full one
        return tf.MinistralConfig(**common, **llama_like, head_dim=16, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"],
                                  architectures=["MinistralForCausalLM"])
    if family == "ministral3":  # queries scaled by position past an original context of 8 positions
        return tf.Ministral3Config(**common, **llama_like, head_dim=16,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "llama_4_scaling_beta": 0.5, "original_max_position_embeddings": 8},
                                   architectures=["Ministral3ForCausalLM"])
    if family == "seed_oss":  # biases on q/k/v, on o_proj and on the MLP, each its own option
        return tf.SeedOssConfig(**common, **llama_like, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                                architectures=["SeedOssForCausalLM"])
    if family == "ernie4_5":  # RoPE on interleaved pairs, biases
        return tf.Ernie4_5Config(**common, **llama_like, use_bias=True, architectures=["Ernie4_5ForCausalLM"])
    if family == "helium":  # RoPE on interleaved pairs, attention scaled by 1 / sqrt(head_dim)
        return tf.HeliumConfig(**common, **{**llama_like, "num_attention_heads": 2, "num_key_value_heads": 1},
                               head_dim=32, architectures=["HeliumForCausalLM"])
    if family in ("glm", "glm4"):  # gate|up as one linear, RoPE on interleaved pairs of half of each head, q/k/v biases
        config = tf.GlmConfig if family == "glm" else tf.Glm4Config  # GLM-4: norms after each block too
        return config(**common, **llama_like, head_dim=16, architectures=["GlmForCausalLM" if family == "glm"
                                                                          else "Glm4ForCausalLM"])
    if family == "nemotron":  # (1 + w) LayerNorms, a relu2 MLP without a gate, RoPE on half of each head, biases
        return tf.NemotronConfig(**common, **llama_like, attention_bias=True, mlp_bias=True,
                                 architectures=["NemotronForCausalLM"])
    if family == "apertus":  # xIELU (trained parameters), per-head q/k norms, norms of other names
        return tf.ApertusConfig(**common, **llama_like, architectures=["ApertusForCausalLM"])
    if family == "arcee":  # a relu2 MLP without a gate
        return tf.ArceeConfig(**common, **llama_like, architectures=["ArceeForCausalLM"])
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2Config(**common, **llama_like, use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":  # per-head q/k norms, a head_dim other than hidden / heads, a sliding second layer
        return tf.Qwen3Config(**common, **llama_like, head_dim=32, use_sliding_window=True, sliding_window=6,
                              max_window_layers=1, architectures=["Qwen3ForCausalLM"])
    if family == "mixtral":  # 4 experts, 2 a token
        return tf.MixtralConfig(**common, **llama_like, num_local_experts=4, num_experts_per_tok=2,
                                architectures=["MixtralForCausalLM"])
    if family == "qwen2_moe":  # q/k/v biases, a gated shared expert beside 4 routed ones
        return tf.Qwen2MoeConfig(**common, **llama_like, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                 num_experts=4, num_experts_per_tok=2, use_sliding_window=False,
                                 architectures=["Qwen2MoeForCausalLM"])
    if family == "olmoe":  # q and k normed over all heads' dims, 4 experts
        return tf.OlmoeConfig(**common, **llama_like, num_experts=4, num_experts_per_tok=2,
                              architectures=["OlmoeForCausalLM"])
    if family == "granitemoe":  # Granite's four scalars, 4 experts
        return tf.GraniteMoeConfig(**common, **llama_like, num_local_experts=4, num_experts_per_tok=2,
                                   embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.09,
                                   logits_scaling=4.0, architectures=["GraniteMoeForCausalLM"])
    if family == "glm4_moe":  # RoPE on half of each head, per-head q/k norms, q/k/v biases, a dense first layer, a shared expert
        return tf.Glm4MoeConfig(**common, **llama_like, head_dim=16, use_qk_norm=True, attention_bias=True,
                                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                first_k_dense_replace=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                          "partial_rotary_factor": 0.5},
                                architectures=["Glm4MoeForCausalLM"])
    if family == "dots1":  # per-head q/k norms, a dense first layer, a shared expert, a sliding first layer
        return tf.Dots1Config(**common, **llama_like, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              n_shared_experts=1, first_k_dense_replace=1, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"], architectures=["Dots1ForCausalLM"])
    if family == "minimax_m2":  # q and k normed over all heads' dims, RoPE on half of each head
        return tf.MiniMaxM2Config(**common, **llama_like, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5},
                                  architectures=["MiniMaxM2ForCausalLM"])
    if family == "flex_olmo":  # OLMo 2's norms after each block and over all heads' q/k dims, 4 experts
        return tf.FlexOlmoConfig(**common, **llama_like, num_experts=4, num_experts_per_tok=2,
                                 architectures=["FlexOlmoForCausalLM"])
    if family == "ernie4_5_moe":  # interleaved RoPE, biases, a dense first layer, a shared expert
        return tf.Ernie4_5_MoeConfig(**common, **llama_like, use_bias=True, moe_num_experts=4, moe_k=2,
                                     moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
                                     architectures=["Ernie4_5_MoeForCausalLM"])
    if family == "hunyuan_moe":  # q/k norms after RoPE, a shared MLP beside 4 experts
        return tf.HunYuanMoEV1Config(**common, **llama_like, head_dim=16, num_experts=4, moe_topk=2,
                                     architectures=["HunYuanMoEV1ForCausalLM"])
    if family == "llama4":  # chunks of 5 positions in RoPE layers, a NoPE layer with temperature, MoE then dense
        return tf.Llama4TextConfig(**common, **{**llama_like, "num_hidden_layers": 4}, head_dim=16,
                                   intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
                                   interleave_moe_layer_step=2, attention_chunk_size=5, no_rope_layer_interval=2,
                                   floor_scale=4, attn_scale=0.5, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0},
                                   architectures=["Llama4ForCausalLM"])
    if family == "solar_open":  # a shared expert beside 4
        return tf.SolarOpenConfig(**common, **llama_like, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, n_shared_experts=1, architectures=["SolarOpenForCausalLM"])
    if family in ("phimoe", "phimoe_longrope"):  # LayerNorms, q/k/v/o biases, 4 experts; longrope past 16 positions
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
                "short_mscale": 1.1, "long_mscale": 1.3}
        return tf.PhimoeConfig(**common, **llama_like, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                               router_jitter_noise=0.0, **({"rope_parameters": rope} if family == "phimoe_longrope"
                                                           else {}), architectures=["PhimoeForCausalLM"])
    if family == "exaone_moe":  # per-head q/k norms, RoPE in the local layer only, a dense first layer, a shared expert
        return tf.ExaoneMoeConfig(**common, **llama_like, sliding_window=6, layer_types=["sliding_attention",
                                                                                         "full_attention"],
                                  first_k_dense_replace=1, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, num_shared_experts=1, architectures=["ExaoneMoeForCausalLM"])
    if family in ("deepseek_v3", "deepseek_v3_q"):  # MLA (q through q_a/q_b and interleaved RoPE, or q_proj), yarn
        q = dict(q_lora_rank=24) if family == "deepseek_v3" else dict(q_lora_rank=None, rope_interleave=False)
        return tf.DeepseekV3Config(**common, **{**llama_like, "num_key_value_heads": 4}, **q, kv_lora_rank=16,
                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                   moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 128, "mscale": 1.0,
                                                    "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0},
                                   architectures=["DeepseekV3ForCausalLM"])
    if family == "deepseek_v2":  # MLA with q_proj (V2-Lite's), RoPE as complex numbers, a dense first layer
        return tf.DeepseekV2Config(**common, **{**llama_like, "num_key_value_heads": 4}, q_lora_rank=None,
                                   kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                   n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   n_shared_experts=1, first_k_dense_replace=1, architectures=["DeepseekV2ForCausalLM"])
    if family == "minicpm3":  # MLA (RoPE on halves), dense; its embedding, residual and logit scales
        return tf.MiniCPM3Config(**common, **{**llama_like, "num_key_value_heads": 4}, q_lora_rank=24, kv_lora_rank=16,
                                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, scale_emb=3.0, scale_depth=0.7,
                                 dim_model_base=16, architectures=["MiniCPM3ForCausalLM"])
    if family in ("glm4_moe_lite", "axk1", "youtu"):  # MLA as DeepSeek-V3's; MoE (a dense first layer), or dense
        mla = dict(**common, **{**llama_like, "num_key_value_heads": 4}, q_lora_rank=24, kv_lora_rank=16,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=20)
        moe = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                   mlp_layer_types=["dense", "sparse"], n_group=1, topk_group=1)
        if family == "youtu":
            return tf.YoutuConfig(**mla, embedding_initializer_range=0.2,
                                  architectures=["YoutuForCausalLM"])
        config = tf.Glm4MoeLiteConfig if family == "glm4_moe_lite" else tf.AXK1Config
        return config(**mla, **moe, architectures=["Glm4MoeLiteForCausalLM" if family == "glm4_moe_lite"
                                                   else "AXK1ForCausalLM"])
    if family == "nanochat":  # weightless norms (one after the embedding), RoPE the other way, q/k norms after it, relu2, capped logits
        return tf.NanoChatConfig(**common, **llama_like, final_logit_softcapping=3.0, architectures=["NanoChatForCausalLM"])
    if family in VISION_LANGUAGE_FAMILIES:
        return _vision_language_config(family, vocab, eos, pad)
    if family in ("granite_swa", "granitemoe_swa"):  # Granite's scalars, sinks, a local then a global layer, RoPE by layer
        swa = dict(**common, **llama_like, embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.09,
                   logits_scaling=4.0, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
        if family == "granite_swa":  # the global layer without RoPE
            return tf.GraniteSWAConfig(**swa, layer_rope_theta=[10000.0, 0], architectures=["GraniteSWAForCausalLM"])
        return tf.GraniteMoeSWAConfig(**swa, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
                                      layer_rope_theta=[500.0, 10000.0], architectures=["GraniteMoeSWAForCausalLM"])
    if family == "qwen3_moe":  # 4 experts, 2 a token, unnormalised top-k weights, q/k norms, a dense second layer
        return tf.Qwen3MoeConfig(**common, **llama_like, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=False, mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"])
    if family == "gpt_oss":  # attention sinks, biases, a local then a global layer, YaRN, 4 experts' clamped SwiGLU
        return tf.GptOssConfig(**common, **{**llama_like, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=6, swiglu_limit=1.0,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 128},
                               architectures=["GptOssForCausalLM"])
    if family == "phi":  # a parallel block under one LayerNorm, RoPE on half of each head, q/k LayerNorms
        return tf.PhiConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=512, partial_rotary_factor=0.5, qk_layernorm=True,
                            architectures=["PhiForCausalLM"])
    if family == "phi3":  # q|k|v and gate|up as one linear each, RoPE on half of each head, a sliding window
        return tf.Phi3Config(**common, **llama_like, partial_rotary_factor=0.5, sliding_window=6,
                             architectures=["Phi3ForCausalLM"])
    if family == "phi3_longrope":  # RoPE's short factors within 16 positions, its long ones past them (Phi-3.5's)
        return tf.Phi3Config(**common, **llama_like, architectures=["Phi3ForCausalLM"], original_max_position_embeddings=16,
                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                              "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.5, 4.0, 9.0, 30.0],
                                              "original_max_position_embeddings": 16})
    if family == "llama_dynamic":  # dynamic NTK RoPE past 16 positions
        return tf.LlamaConfig(**common, **{**llama_like, "max_position_embeddings": 16}, architectures=["LlamaForCausalLM"],
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    if family == "gemma":  # the first: a scaled embedding, (1 + w) norms, a head_dim apart from hidden / heads
        return tf.GemmaConfig(**common, **llama_like, head_dim=32, architectures=["GemmaForCausalLM"])
    if family == "gemma2":  # soft-capped scores (a cap small enough to bite) and logits, a local then a global layer
        return tf.Gemma2Config(**common, **llama_like, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
                               final_logit_softcapping=3.0, architectures=["Gemma2ForCausalLM"])
    if family == "vaultgemma":  # Gemma 2's layer without the norms after each block
        return tf.VaultGemmaConfig(**common, **llama_like, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
                                   final_logit_softcapping=3.0, architectures=["VaultGemmaForCausalLM"])
    if family == "gemma3":  # a local layer (its own RoPE base, a window) then a global one, q/k norms, 4 norms
        return tf.Gemma3TextConfig(**common, **llama_like, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"],
                                   architectures=["Gemma3ForCausalLM"])
    if family == "smollm3":  # a layer without RoPE (NoPE) after one with it and a window, as SmolLM3's
        return tf.SmolLM3Config(**common, **llama_like, no_rope_layers=[1, 0], use_sliding_window=True,
                                sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                                architectures=["SmolLM3ForCausalLM"])
    if family == "cohere":  # mean-centred LayerNorms, a parallel block, interleaved RoPE, per-head q/k norms
        return tf.CohereConfig(**common, **llama_like, use_qk_norm=True, logit_scale=0.5,
                               architectures=["CohereForCausalLM"])
    if family == "cohere2":  # a local layer (a window, RoPE) then a global one (no RoPE)
        return tf.Cohere2Config(**common, **llama_like, sliding_window=6, logit_scale=0.5,
                                layer_types=["sliding_attention", "full_attention"],
                                architectures=["Cohere2ForCausalLM"])
    if family == "stablelm":  # LayerNorms, a parallel block, q/k/v biases, per-head q/k norms, a quarter of RoPE
        return tf.StableLmConfig(**common, **llama_like, partial_rotary_factor=0.25, use_qkv_bias=True,
                                 qk_layernorm=True, use_parallel_residual=True, architectures=["StableLmForCausalLM"])
    if family == "olmo2":  # norms after each block, not before; q and k normed over all heads' dims
        return tf.Olmo2Config(**common, **llama_like, architectures=["Olmo2ForCausalLM"])
    if family == "olmo3":  # OLMo 2's norms, a local layer (a window, its RoPE base) then a global one
        return tf.Olmo3Config(**common, **llama_like, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "default", "rope_theta": 500000.0}},
                              architectures=["Olmo3ForCausalLM"])
    if family == "olmo":  # LayerNorms without weights, q/k/v clamped (a clip small enough to bite)
        return tf.OlmoConfig(**common, **llama_like, clip_qkv=2.0, architectures=["OlmoForCausalLM"])
    if family == "exaone4":  # OLMo 2's norms, per-head q/k norms, a local layer (a window, RoPE) then a global one (no RoPE)
        return tf.Exaone4Config(**common, **llama_like, sliding_window=6, sliding_window_pattern=2,
                                architectures=["Exaone4ForCausalLM"])
    if family == "hunyuan":  # per-head q/k norms after RoPE, a fixed NTK alpha
        return tf.HunYuanDenseV1Config(**common, **llama_like, head_dim=16,
                                       rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 2.0,
                                                        "factor": 1.0},
                                       architectures=["HunYuanDenseV1ForCausalLM"])
    if family == "hyperclovax":  # Granite's scalars, norms after each block, the logits times logits_scaling
        return tf.HyperCLOVAXConfig(**common, **llama_like, embedding_multiplier=6.0, residual_multiplier=0.3,
                                    attention_multiplier=0.09, logits_scaling=0.25,
                                    architectures=["HyperCLOVAXForCausalLM"])
    if family == "cwm":  # a global layer, then a sliding one
        return tf.CwmConfig(**{**common, "bos_token_id": eos}, **llama_like, sliding_window=6, layer_types=["full_attention", "sliding_attention"],
                            architectures=["CwmForCausalLM"])
    if family == "jais2":  # LayerNorms, a relu2 MLP without a gate, biases
        return tf.Jais2Config(**common, **llama_like, architectures=["Jais2ForCausalLM"])
    if family == "granite":  # its four scalars away from 1 (attention's from head_dim ** -0.5), biases
        return tf.GraniteConfig(**common, **llama_like, embedding_multiplier=6.0, residual_multiplier=0.3,
                                attention_multiplier=0.09, logits_scaling=4.0, attention_bias=True, mlp_bias=True,
                                architectures=["GraniteForCausalLM"])
    if family == "gpt2":
        return tf.GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                             architectures=["GPT2LMHeadModel"])
    if family == "gpt_neo":  # alternating global / local (window 5) attention
        return tf.GPTNeoConfig(**common, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                               attention_types=[[["global", "local"], 1]], window_size=5,
                               max_position_embeddings=512, architectures=["GPTNeoForCausalLM"])
    if family == "gpt_neox":  # a quarter of each head under RoPE; parallel attention and MLP
        return tf.GPTNeoXConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=512,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.25},
                                architectures=["GPTNeoXForCausalLM"])
    if family == "gpt_neox_seq":  # the sequential block (use_parallel_residual off), all of each head under RoPE
        return tf.GPTNeoXConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 1.0},
                                architectures=["GPTNeoXForCausalLM"])
    if family == "gptj":  # a parallel block under one LayerNorm, RoPE on interleaved pairs of a quarter of each head
        return tf.GPTJConfig(**common, n_embd=64, n_layer=2, n_head=4, rotary_dim=4, n_positions=512,
                             architectures=["GPTJForCausalLM"])
    opt = dict(**common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
               max_position_embeddings=512, architectures=["OPTForCausalLM"])
    if family == "opt":  # LayerNorms before attention and the MLP, q scaled after its projection
        return tf.OPTConfig(**opt, word_embed_proj_dim=64)
    if family == "opt_350m":  # LayerNorms after each residual sum, embeddings projected in and out
        return tf.OPTConfig(**opt, word_embed_proj_dim=32, do_layer_norm_before=False)
    if family == "persimmon":  # GPT-NeoX's fused per-head q/k/v, sequential, per-head q/k LayerNorms, half of RoPE
        return tf.PersimmonConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, qk_layernorm=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5},
                                  architectures=["PersimmonForCausalLM"])
    if family == "starcoder2":  # LayerNorms, biases, a plain MLP, grouped-query attention, a sliding window
        return tf.Starcoder2Config(**common, **llama_like, sliding_window=6, use_bias=True,
                                   architectures=["Starcoder2ForCausalLM"])
    if family == "gpt_bigcode":  # multi-query attention: one key and value head in c_attn
        return tf.GPTBigCodeConfig(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True,
                                   architectures=["GPTBigCodeForCausalLM"])
    if family == "gpt_bigcode_mha":  # each head's q, k, v side by side in c_attn
        return tf.GPTBigCodeConfig(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=False,
                                   architectures=["GPTBigCodeForCausalLM"])
    falcon = dict(**common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                  max_position_embeddings=512, architectures=["FalconForCausalLM"])
    if family == "falcon":  # 40B's: grouped key/value heads, a LayerNorm each for attention and the MLP
        return tf.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2)
    if family == "falcon_7b":  # multi-query, attention and the MLP on one LayerNorm
        return tf.FalconConfig(**falcon)
    if family == "falcon_seq":  # each head's q, k, v side by side, a sequential block, biases
        return tf.FalconConfig(**falcon, multi_query=False, parallel_attn=False, bias=True)
    if family == "mpt":  # ALiBi over 6 heads (not a power of two), q/k/v clamped (a clip that bites)
        return tf.MptConfig(**common, d_model=48, n_layers=2, n_heads=6, max_seq_len=512,
                            attn_config={"clip_qkv": 2.0}, architectures=["MptForCausalLM"])
    if family == "lfm2":  # short-convolution layers (biased) around an attention layer; the MLP's width derived
        return tf.Lfm2Config(**common, **{**llama_like, "num_hidden_layers": 3},
                             layer_types=["conv", "full_attention", "conv"], conv_bias=True, conv_L_cache=3,
                             block_ffn_dim_multiplier=1.5, block_multiple_of=16, architectures=["Lfm2ForCausalLM"])
    if family == "lfm3":  # LFM2's layers with gated, windowed attention, RoPE by layer type, sandwich norms
        return tf.Lfm3Config(**common, **{**llama_like, "num_hidden_layers": 4}, head_dim=16, conv_L_cache=4,
                             layer_types=["conv", "sliding_attention", "conv", "full_attention"], sliding_window=6,
                             architectures=["Lfm3ForCausalLM"])  # its default RoPE: proportional on full layers
    if family == "lfm2_moe":  # a dense first layer, then experts (sigmoid routing, an expert bias)
        return tf.Lfm2MoeConfig(**common, **{**llama_like, "num_hidden_layers": 3},
                                layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, architectures=["Lfm2MoeForCausalLM"])
    if family in ("qwen3_5", "qwen3_5_moe"):  # gated DeltaNet layers (4 value heads over 2 key heads) around gated attention
        qwen = dict(**common, **{**llama_like, "num_hidden_layers": 3}, head_dim=32,
                    layer_types=["linear_attention", "full_attention", "linear_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [2, 1, 1]})
        if family == "qwen3_5":
            return tf.Qwen3_5TextConfig(**qwen, architectures=["Qwen3_5ForCausalLM"])
        qwen.pop("intermediate_size")  # every layer's MLP: 4 experts, 2 a token, and a gated shared expert
        return tf.Qwen3_5MoeTextConfig(**qwen, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32, architectures=["Qwen3_5MoeForCausalLM"])
    if family == "olmo_hybrid":  # gated DeltaNet (its own q/k/v/o shapes) beside OLMo 2's attention, with RoPE
        return tf.OlmoHybridConfig(**common, **{**llama_like, "num_hidden_layers": 4, "num_key_value_heads": 4},
                                   layer_types=["linear_attention", "full_attention", "linear_attention",
                                                "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                                   linear_key_head_dim=16, linear_value_head_dim=8,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   architectures=["OlmoHybridForCausalLM"])
    if family == "qwen3_next":  # Qwen3.5-MoE's layers, DeltaNet's projections by key head, a dense first MLP
        return tf.Qwen3NextConfig(**common, **{**llama_like, "num_hidden_layers": 3}, head_dim=32,
                                  layer_types=["linear_attention", "full_attention", "linear_attention"],
                                  linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
                                  linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=32, mlp_only_layers=[0],
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.25},
                                  architectures=["Qwen3NextForCausalLM"])
    if family in ("granitemoehybrid", "granitemoehybrid_moe"):  # Mamba-2 layers around attention, Granite's scalars
        granite = dict(**common, **{**llama_like, "num_hidden_layers": 3},
                       layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_n_heads=8,
                       mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
                       shared_intermediate_size=64, embedding_multiplier=2.0, residual_multiplier=0.5,
                       attention_multiplier=0.2, logits_scaling=3.0, architectures=["GraniteMoeHybridForCausalLM"])
        if family == "granitemoehybrid":  # Granite 4.0-H's: no positions encoded, no experts
            return tf.GraniteMoeHybridConfig(**granite, position_embedding_type=None, num_local_experts=0)
        return tf.GraniteMoeHybridConfig(**{**granite, "intermediate_size": 32}, position_embedding_type="rope",
                                         num_local_experts=4, num_experts_per_tok=2)
    if family in ("nemotron_h", "nemotron_h_moe"):  # single-operator blocks: Mamba-2, a relu2 MLP, attention without RoPE
        blocks = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp" if family == "nemotron_h" else "moe"]
        return tf.NemotronHConfig(**{k: v for k, v in common.items() if k != "bos_token_id"}, hidden_size=64,
                                  layers_block_type=blocks, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
                                  ssm_state_size=8, conv_kernel=4, chunk_size=16, n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                  moe_shared_expert_intermediate_size=32, max_position_embeddings=512,
                                  architectures=["NemotronHForCausalLM"])
    if family == "bamba":  # Llama's layers, Mamba-2 in all but the attention one (RoPE on half of each head)
        return tf.BambaConfig(**common, **{**llama_like, "num_hidden_layers": 3}, attn_layer_indices=[1],
                              mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_head=16, mamba_d_conv=4,
                              mamba_expand=2, mamba_chunk_size=16, architectures=["BambaForCausalLM"])
    if family in ("falcon_h1", "falcon_h1_norm"):  # attention beside Mamba-2 in each layer, every multiplier off 1
        falcon = dict(**common, **llama_like, mamba_d_ssm=64, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
                      mamba_d_conv=4, mamba_chunk_size=16, lm_head_multiplier=0.5, embedding_multiplier=2.0,
                      mlp_multipliers=[0.8, 1.2], key_multiplier=0.7, attention_out_multiplier=0.9,
                      attention_in_multiplier=1.1, ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7], ssm_in_multiplier=1.3,
                      ssm_out_multiplier=0.6, architectures=["FalconH1ForCausalLM"])
        if family == "falcon_h1":
            return tf.FalconH1Config(**falcon, mamba_rms_norm=False)
        return tf.FalconH1Config(**falcon, mamba_rms_norm=True, mamba_norm_before_gate=False)  # the gated norm
    if family == "mamba2":  # Mamba-2 alone: no attention, no K/V
        return tf.Mamba2Config(**common, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=2,
                               state_size=8, expand=2, conv_kernel=4, chunk_size=16, architectures=["Mamba2ForCausalLM"])
    if family in ("mamba", "falcon_mamba"):  # Mamba-1 alone (Falcon Mamba's: weightless norms of the step, B and C)
        config = tf.MambaConfig if family == "mamba" else tf.FalconMambaConfig
        return config(**common, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                      time_step_rank=8, architectures=["MambaForCausalLM" if family == "mamba" else
                                                       "FalconMambaForCausalLM"])
    if family == "jamba":  # Mamba-1 layers (normed step, B and C), attention in the third, experts in every second
        return tf.JambaConfig(**common, **{**llama_like, "num_hidden_layers": 4}, attn_layer_period=4,
                              attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                              num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                              mamba_dt_rank=8, use_mamba_kernels=False, architectures=["JambaForCausalLM"])
    if family == "bloom":
        return tf.BloomConfig(**common, hidden_size=64, n_layer=2, n_head=4, architectures=["BloomForCausalLM"])
    raise ValueError(family)


# Vision-language checkpoints served for text: family -> the text family of their decoder.
VISION_LANGUAGE_FAMILIES = {"gemma3_vlm": "gemma3", "mistral3_vlm": "mistral", "llava": "mistral",
                            "llava_onevision": "qwen2", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
                            "internvl": "qwen3", "aya_vision": "cohere2", "smolvlm": "mistral",
                            "llava_next": "qwen2", "idefics3": "mistral", "qwen3_vl_moe": "qwen3_moe",
                            "ministral3_vlm": "ministral3", "glm4v": "glm4", "glm4v_moe": "glm4_moe", "lfm2_vl": "lfm2",
                            "qwen3_5_vl": "qwen3_5", "qwen3_5_moe_vl": "qwen3_5_moe", "lfm3_vl": "lfm3"}


def _vision_language_config(family: str, vocab: int, eos: int, pad: int):
    """A vision-language checkpoint with a tiny vision tower beside its text family's test config;
    its image tokens the vocabulary's last ids."""
    import transformers as tf

    text = _family_config(VISION_LANGUAGE_FAMILIES[family], vocab, eos, pad).to_dict()
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                 patch_size=14)
    top = dict(tie_word_embeddings=False, architectures=[VISION_LANGUAGE_ARCHITECTURES[family]])
    if family == "gemma3_vlm":
        return tf.Gemma3Config(text_config=text, vision_config=tf.SiglipVisionConfig(**tower).to_dict(),
                               mm_tokens_per_image=4, image_token_index=vocab - 3, boi_token_index=vocab - 2,
                               eoi_token_index=vocab - 1, **top)
    if family in ("mistral3_vlm", "ministral3_vlm"):  # Mistral Small 3.1/3.2, Ministral 3: a Pixtral tower (q/k/v/o and gate/up/down of its own)
        return tf.Mistral3Config(text_config=text, vision_config=dict(model_type="pixtral", head_dim=16, **tower),
                                 image_token_index=vocab - 1, **top)
    if family in ("llava", "llava_next", "llava_onevision", "aya_vision", "internvl"):
        vision = dict(model_type="clip_vision_model", **tower) if family in ("llava", "llava_next") else \
            {**tower, "image_size": [28, 28], "patch_size": [14, 14]} if family == "internvl" else \
            dict(model_type="siglip_vision_model", **tower)
        config = {"llava": tf.LlavaConfig, "llava_next": tf.LlavaNextConfig, "llava_onevision": tf.LlavaOnevisionConfig,
                  "aya_vision": tf.AyaVisionConfig, "internvl": tf.InternVLConfig}[family]
        return config(text_config=text, vision_config=vision, image_token_id=vocab - 1, **top)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):  # multimodal RoPE: for text, each section at one position
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
        text = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                            **({"mrope_interleaved": True} if family != "qwen2_vl" else {})}}
        text.pop("model_type")
        vision = dict(depth=1, num_heads=2, **({"embed_dim": 32, "hidden_size": text["hidden_size"]}
                                               if family == "qwen2_vl" else
                                               {"hidden_size": 32, "out_hidden_size": text["hidden_size"],
                                                "intermediate_size": 64}))
        if family.startswith("qwen3_vl"):  # its decoder has no sliding window (nor Qwen3's options for one)
            vision["deepstack_visual_indexes"] = [0]
            for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
                text.pop(key, None)
            if family == "qwen3_vl_moe":  # every layer's MLP sparse, as Qwen3-VL-30B-A3B's
                text["mlp_only_layers"] = []
        config = {"qwen2_vl": tf.Qwen2VLConfig, "qwen2_5_vl": tf.Qwen2_5_VLConfig, "qwen3_vl": tf.Qwen3VLConfig,
                  "qwen3_vl_moe": tf.Qwen3VLMoeConfig}[family]
        return config(text_config=text, vision_config=vision, image_token_id=vocab - 1, video_token_id=vocab - 2,
                      vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4, **top)
    if family in ("glm4v", "glm4v_moe"):  # GLM-4.1V (GLM-4's decoder), GLM-4.5V (GLM-4.5's, no q/k norms): RoPE multimodal
        text = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                            "mrope_section": [2, 1, 1]}}
        for key in ("model_type", "use_qk_norm"):
            text.pop(key, None)
        ids = dict(zip(("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                        "video_start_token_id", "video_end_token_id"), range(vocab - 1, vocab - 7, -1), strict=True))
        config = tf.Glm4vConfig if family == "glm4v" else tf.Glm4vMoeConfig
        return config(text_config=text, vision_config=dict(depth=1, hidden_size=32, out_hidden_size=text["hidden_size"],
                                                           intermediate_size=64, num_heads=2), **ids, **top)
    if family in ("qwen3_5_vl", "qwen3_5_moe_vl"):  # Qwen3.5's checkpoints: all of them image-text-to-text
        text.pop("model_type")
        config = tf.Qwen3_5Config if family == "qwen3_5_vl" else tf.Qwen3_5MoeConfig
        return config(text_config=text, vision_config=dict(depth=1, hidden_size=32, out_hidden_size=text["hidden_size"],
                                                           intermediate_size=64, num_heads=2),
                      image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                      vision_end_token_id=vocab - 4, **top)
    if family == "lfm3_vl":  # LFM3-VL: a vision encoder of its own (attention and short convolutions)
        return tf.Lfm3VlConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                     num_hidden_layers=2, num_attention_heads=2,
                                                                     num_key_value_heads=1),
                               image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                               **top)
    if family == "lfm2_vl":  # LFM2-VL: a SigLIP2 tower, a projector of its own
        vision = dict(model_type="siglip2_vision_model", **{k: v for k, v in tower.items() if k != "image_size"})
        return tf.Lfm2VlConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                               projector_hidden_size=32, **top)
    if family in ("smolvlm", "idefics3"):  # the decoder at model.text_model, a connector for a projector
        config = tf.SmolVLMConfig if family == "smolvlm" else tf.Idefics3Config
        return config(text_config=text, vision_config=tower, image_token_id=vocab - 1, scale_factor=2, **top)
    raise ValueError(family)


VISION_LANGUAGE_ARCHITECTURES = {
    "gemma3_vlm": "Gemma3ForConditionalGeneration", "mistral3_vlm": "Mistral3ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
    "aya_vision": "AyaVisionForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "ministral3_vlm": "Mistral3ForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration", "glm4v_moe": "Glm4vMoeForConditionalGeneration",
    "lfm2_vl": "Lfm2VlForConditionalGeneration", "qwen3_5_vl": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe_vl": "Qwen3_5MoeForConditionalGeneration", "lfm3_vl": "Lfm3VlForConditionalGeneration"}


def folder_digest(folder) -> tuple[str, int]:
    """(a hash of the files under ``folder``, names and contents; their bytes)."""
    import hashlib

    digest, size = hashlib.blake2b(), 0
    for f in sorted(f for f in Path(folder).rglob("*") if f.is_file()):
        data = f.read_bytes()
        digest.update(str(f.relative_to(folder)).encode() + b"\0" + data)
        size += len(data)
    return digest.hexdigest(), size


class SavedFolderCache:
    """What was read from a saved folder, kept by its contents (a hash of its files: a test may
    rewrite one in place within a clock tick; a template's copies in other folders share one
    read), least recently used first out past ``max_bytes`` of files read; a caller gets its own
    deep copy. The PEFT oracle and the adapter builders load the same few models again and again,
    in one test file after another, and transformers' ``from_pretrained`` takes 3-5x a copy of a
    tiny model's time."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.kept = max_bytes, {}  # key -> (value, bytes read)

    def get(self, folder, what: str, load):
        import copy

        digest, size = folder_digest(folder)
        key = (what, digest)
        self.kept[key] = self.kept.pop(key) if key in self.kept else (load(), size)
        while sum(n for _, n in self.kept.values()) > self.max_bytes and len(self.kept) > 1:
            del self.kept[next(iter(self.kept))]
        return copy.deepcopy(self.kept[key][0])


_saved_folders = SavedFolderCache()


def saved_config(folder):
    """``AutoConfig.from_pretrained(folder)``, through the cache (named by ``folder``, as read)."""
    from transformers import AutoConfig

    config = _saved_folders.get(folder, "config", lambda: AutoConfig.from_pretrained(folder))
    config.name_or_path = str(folder)
    return config


def auto_model(source, **kwargs):
    """A Hugging Face model from a saved folder (a path) or a config, by the Auto class the server
    loads it with (a vision-language checkpoint's is image-text-to-text), a quantized checkpoint
    dequantized as the server loads it (offline, transformers' kernels for it cannot be fetched).
    A folder's is read once per contents and arguments (SavedFolderCache)."""
    from loramux.server.model_loader import auto_model_class, dequantizing

    if isinstance(source, (str, Path)):
        def load():
            config = saved_config(source)
            return auto_model_class(config).from_pretrained(source, config=config, **dequantizing(config), **kwargs)

        model = _saved_folders.get(source, f"model {sorted(kwargs.items())}", load)
        model.config.name_or_path = model.name_or_path = str(source)  # as read from there
        return model
    return auto_model_class(source).from_config(source, **kwargs)


class BuiltTemplates:
    """Folders a deterministic builder made, kept in a folder of this process's own, copied out
    again for the same arguments, with the random number generator left as the build left it: the
    same family's model is built by a dozen test files, in the same worker."""

    def __init__(self):
        self._root, self._built = None, {}

    def copy(self, key, out: Path, build) -> Path:
        import tempfile

        if key not in self._built:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="loramux-templates-")  # removed at exit
            template = Path(self._root.name) / str(len(self._built))
            build(template)
            self._built[key] = (template, torch.get_rng_state())
        template, rng = self._built[key]
        shutil.copytree(template, out, dirs_exist_ok=True)
        torch.set_rng_state(rng)
        return out


_family_models = BuiltTemplates()


def build_family_model(family: str, out: Path, seed: int = 0) -> Path:
    """A 2-layer random model of ``family``, saved with its tokenizer (built once a process, then
    copied). A family newer than the installed transformers (the GPU machine's may be older than
    the CPU's) skips the test."""
    return _family_models.copy((family, seed), out, lambda folder: _build_family_model(family, folder, seed))


def _build_family_model(family: str, out: Path, seed: int) -> Path:
    import pytest
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    try:
        config = _family_config(family, len(tok), tok.eos_token_id, tok.pad_token_id)
    except AttributeError as e:
        if not str(e).startswith(("module transformers has no attribute", "module 'transformers' has no attribute")):
            raise
        pytest.skip(f"transformers {transformers.__version__} lacks {family}'s config: {e}")
    model = auto_model(config)
    with torch.no_grad():  # norms' weights and biases off their init (1, 0): a norm or bias in the wrong place shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.eval().save_pretrained(out, safe_serialization=True)
    return out


def int8_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` saved again with every decoder projection that ``--quantization int8`` serves
    as int8 replaced by its dequantized weight q * s (ops/quantize.py; GPT-2's Conv1D [in, out]
    by columns): PEFT over this copy is the oracle of the int8 server."""
    from transformers.pytorch_utils import Conv1D

    from loramux.server.models import serving_model_class
    from loramux.server.ops.quantize import dequantize_int8, quantize_int8

    model = auto_model(model_dir, dtype=torch.float32).eval()
    layout = serving_model_class(model.config.architectures[0], model.config).layout_from_config(model.config)
    with torch.no_grad():
        for name in layout.modules:
            module = model.get_submodule(name)
            w = module.weight.T if isinstance(module, Conv1D) else module.weight  # [out, in]
            w.copy_(dequantize_int8(*quantize_int8(w)))
    model.save_pretrained(out, safe_serialization=True)
    return out


def mxfp4_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` (GPT-OSS) saved again as gpt-oss's checkpoints ship: each expert projection
    [E, in, out] in MXFP4, blocks of 32 inputs of an output sharing a power-of-two scale (uint8, bias
    127), each value one of FP4's 16 (two a byte, the even index in the low nibble), as
    ``<name>_blocks`` [E, out, in / 32, 16] and ``<name>_scales`` [E, out, in / 32]; a
    quantization_config that says so."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import FP4_VALUES

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    grid = torch.tensor(FP4_VALUES)
    for name in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = weights.pop(name).transpose(1, 2).float()  # [E, out, in]
        groups = w.reshape(*w.shape[:2], -1, 32)
        exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0))
        codes = (groups / torch.exp2(exp)[..., None] - grid.view(-1, 1, 1, 1, 1)).abs().argmin(0).to(torch.uint8)
        weights[name + "_blocks"] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        weights[name + "_scales"] = (exp + 127).to(torch.uint8)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def fp8_copy(model_dir: Path, out: Path, block: int = 32) -> Path:
    """``model_dir`` saved again as FP8 releases ship (DeepSeek-V3, Qwen3-FP8): each decoder
    projection's weight in float8 (e4m3) by blocks of ``block`` x ``block`` with a float32 scale
    each (``weight_scale_inv``, the block's max over FP8's), and a quantization_config saying so."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    top = torch.finfo(torch.float8_e4m3fn).max
    for name in [k for k in weights if ".layers." in k and k.endswith("proj.weight")]:
        w = weights[name].float()
        rows, cols = w.shape
        blocks = w.reshape(rows // block, block, cols // block, block)
        scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / top  # [rows / block, cols / block]
        weights[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        weights[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def compressed_copy(model_dir: Path, out: Path, kind: str = "fp8") -> Path:
    """``model_dir`` saved again as llm-compressor writes a compressed-tensors checkpoint, each
    decoder projection's weight quantized symmetrically: FP8-dynamic (``kind`` "fp8": float8 e4m3
    with a scale an output row, ``weight_scale`` [out, 1]; activations per token at run time), W8A8
    ("int8": the same in int8) or W4A16 ("int4": int4 by groups of 32 inputs, ``weight_scale``
    [out, in / 32], packed eight to an int32 in ``weight_packed``, with ``weight_shape``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    group = 32 if kind == "int4" else None
    for name in [k for k in weights if ".layers." in k and k.endswith("proj.weight")]:
        w = weights.pop(name).float()
        blocks = w.reshape(w.shape[0], -1, group or w.shape[1])  # [out, groups, inputs of a group]
        if kind == "fp8":
            scale = blocks.abs().amax(-1).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
            q = (blocks / scale[..., None]).reshape(w.shape).to(torch.float8_e4m3fn)
        else:
            top = 127 if kind == "int8" else 7
            scale = blocks.abs().amax(-1).clamp_min(1e-12) / top
            q = torch.round(blocks / scale[..., None]).clamp(-top - 1, top).reshape(w.shape).to(torch.int8)
        stem = name.removesuffix("weight")
        if kind == "int4":
            weights.update({stem + "weight_packed": pack_to_int32(q, 4), stem + "weight_shape": torch.tensor(w.shape)})
        else:
            weights[name] = q
        weights[stem + "weight_scale"] = scale
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    bits, fmt = {"fp8": (8, "float-quantized"), "int8": (8, "int-quantized"), "int4": (4, "pack-quantized")}[kind]
    args = {"num_bits": bits, "type": "float" if kind == "fp8" else "int", "symmetric": True, "dynamic": False}
    scheme = {"targets": ["Linear"], "weights": {**args, "strategy": "group", "group_size": group} if group
              else {**args, "strategy": "channel"}}
    if kind != "int4":  # W4A16 leaves activations alone
        scheme["input_activations"] = {**args, "strategy": "token", "dynamic": True}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt,
                                     "quantization_status": "compressed", "ignore": ["lm_head"],
                                     "config_groups": {"group_0": scheme}}
    (out / "config.json").write_text(json.dumps(config))
    return out


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN_PROJ = ALL_PROJ[:4]

# The target-module names users train on, per family (mixed ranks and targets).
FAMILY_ADAPTERS = {
    "mistral": {"qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                "all-r16": dict(r=16, lora_alpha=16, target_modules=ALL_PROJ)},
    "qwen2": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
              "mlp-r4-rslora": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                    use_rslora=True)},
    "qwen3": {"qko-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
              "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "mixtral": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN_PROJ)},
    "qwen2_moe": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                  "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN_PROJ)},
    "olmoe": {"qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
              "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN_PROJ)},
    "qwen3_moe": {"qko-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
                  "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN_PROJ)},
    "gpt_oss": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                "attn-r4": dict(r=4, lora_alpha=8, target_modules=ATTN_PROJ)},
    "phi": {"qv-dense-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "dense"]),
            "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])},
    "deepseek_v3": {"q-kvb-r8": dict(r=8, lora_alpha=16, target_modules=["q_b_proj", "kv_b_proj"]),
                    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                       "kv_b_proj", "o_proj"])},
    "deepseek_v3_q": {"q-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "kv_a_proj_with_mqa"]),
                      "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "kv_b_proj", "o_proj"])},
    "youtu": {"q-kvb-r8": dict(r=8, lora_alpha=16, target_modules=["q_b_proj", "kv_b_proj"]),
              "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                                "o_proj", "gate_proj", "up_proj", "down_proj"])},
    "nanochat": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                 "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"])},
    "phi3": {"qkv-r8": dict(r=8, lora_alpha=16, target_modules=["qkv_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])},
    "gemma": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
              "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])},
    "gemma2": {"qko-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
               "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])},
    "gemma3": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
               "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "smollm3": {"qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
                "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "cohere": {"qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
               "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "cohere2": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])},
    "stablelm": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                 "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "olmo2": {"qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
              "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "olmo3": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
              "mlp-r4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])},
    "glm4": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj",
                                                               "down_proj"])},
    "nemotron": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                 "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                                   "down_proj"])},
    "olmo": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "granite": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                "all-r4": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)},
    "gpt2": {"c_attn-r4": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
             "all-r8": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)},
    "gpt_neo": {"qvo-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "out_proj"]),
                "mlp-r4": dict(r=4, lora_alpha=4, target_modules=["c_fc", "c_proj"])},
    "gpt_neox": {"qkv-r8": dict(r=8, lora_alpha=16, target_modules=["query_key_value"]),
                 "rest-r4": dict(r=4, lora_alpha=8, target_modules=["dense", "dense_h_to_4h", "dense_4h_to_h"])},
    "gptj": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in",
                                                               "fc_out"])},
    "opt": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])},
    "starcoder2": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                   "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "c_fc",
                                                                     "c_proj"])},
    "gpt_bigcode": {"c_attn-r8": dict(r=8, lora_alpha=16, target_modules=["c_attn"]),
                    "all-r4": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])},
    "falcon": {"qkv-r8": dict(r=8, lora_alpha=16, target_modules=["query_key_value"]),
               "rest-r4": dict(r=4, lora_alpha=8, target_modules=["dense", "dense_h_to_4h", "dense_4h_to_h"])},
    "mpt": {"qkv-r8": dict(r=8, lora_alpha=16, target_modules=["Wqkv"]),
            "rest-r4": dict(r=4, lora_alpha=8, target_modules=["out_proj", "up_proj", "down_proj"])},
    "lfm2": {"qv-conv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj", "out_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1",
                                                               "w3", "w2"])},
    "lfm3": {"qv-conv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "g_proj", "in_proj"]),
             "all-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "in_proj",
                                                               "out_proj", "w1", "w3", "w2"])},
    "qwen3_5": {"qv-net-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj_qkv", "in_proj_z",
                                                                      "out_proj"]),
                "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ALL_PROJ, "in_proj_qkv", "in_proj_z", "in_proj_b",
                                                                  "in_proj_a", "out_proj"])},
    "qwen3_5_moe": {"qk-net-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "in_proj_qkv"]),
                    "attn-net-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj_qkv", "in_proj_z",
                                                                           "in_proj_b", "in_proj_a", "out_proj"])},
    "olmo_hybrid": {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "g_proj"]),
                    "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ALL_PROJ, "g_proj", "a_proj", "b_proj"])},
    "qwen3_next": {"qv-qkvz-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj_qkvz"]),
                   # not the MLP: PEFT turns its names into target_parameters on the experts (refused)
                   "attn-net-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj_qkvz", "in_proj_ba",
                                                                          "out_proj"])},
    "granitemoehybrid": {"qv-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj",
                                                                                "out_proj"]),
                         "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj", "out_proj",
                                                                           "input_linear", "output_linear"])},
    # PEFT refuses out_proj on Nemotron-H's Mamba layers (Mamba's fused kernels skip it)
    "nemotron_h": {"qv-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj"]),
                   "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj", "up_proj", "down_proj"])},
    # not the MLP's names: the experts' shared expert has linears of those names (not served)
    "nemotron_h_moe": {"qk-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "in_proj"]),
                       "attn-mamba-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj"])},
    "bamba": {"qv-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj", "out_proj"]),
              "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ALL_PROJ, "in_proj", "out_proj"])},
    # PEFT refuses out_proj on Falcon-H1's Mamba layers, as on Nemotron-H's
    "falcon_h1": {"qv-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj"]),
                  "all-r4": dict(r=4, lora_alpha=8, target_modules=[*ALL_PROJ, "in_proj"])},
    # PEFT refuses out_proj on Mamba-2 (as on Nemotron-H)
    "mamba2": {"in-r8": dict(r=8, lora_alpha=16, target_modules=["in_proj"]),
               "in-r4-rslora": dict(r=4, lora_alpha=8, target_modules=["in_proj"], use_rslora=True)},
    # PEFT refuses out_proj on Mamba; Hugging Face's mixer ignores LoRA on dt_proj (refused here)
    "mamba": {"in-x-r8": dict(r=8, lora_alpha=16, target_modules=["in_proj", "x_proj"]),
              "in-r4": dict(r=4, lora_alpha=8, target_modules=["in_proj"])},
    # the dense MLPs' names only where the experts' are not: PEFT turns them into target_parameters on experts
    "jamba": {"qv-mamba-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "in_proj", "x_proj"]),
              "attn-mamba-r4": dict(r=4, lora_alpha=8, target_modules=[*ATTN_PROJ, "in_proj", "x_proj", "out_proj"])},
    "bloom": {"qkv-r8": dict(r=8, lora_alpha=16, target_modules=["query_key_value"]),
              "rest-r4": dict(r=4, lora_alpha=8, target_modules=["dense", "dense_h_to_4h", "dense_4h_to_h"])},
}


# Other configs of a family that test_families.py also serves (with that family's adapters).
CONFIG_VARIANTS = {"ministral": "mistral", "ministral3": "mistral", "seed_oss": "mistral", "ernie4_5": "mistral",
                   "granitemoe": "mixtral", "llama4": "mixtral", "glm4_moe": "mixtral", "dots1": "mixtral",
                   "minimax_m2": "mixtral", "solar_open": "mixtral", "phimoe": "mixtral", "phimoe_longrope": "mixtral",
                   "exaone_moe": "mixtral", "flex_olmo": "mixtral", "ernie4_5_moe": "mixtral", "hunyuan_moe": "mixtral",
                   "glm4_moe_lite": "deepseek_v3", "axk1": "deepseek_v3", "deepseek_v2": "deepseek_v3_q",
                   "minicpm3": "youtu", "granitemoe_swa": "mixtral", "granite_swa": "granite", "gpt_neox_seq": "gpt_neox",
                   "gpt_bigcode_mha": "gpt_bigcode", "falcon_7b": "falcon", "falcon_seq": "falcon", "opt_350m": "opt",
                   "glm": "glm4", "helium": "mistral", "arcee": "nemotron",
                   "exaone4": "mistral", "hunyuan": "mistral", "vaultgemma": "gemma2", "hyperclovax": "granite",
                   "cwm": "mistral", "jais2": "nemotron", "apertus": "nemotron",
                   "phi3_longrope": "phi3", "lfm2_moe": "lfm2", "granitemoehybrid_moe": "granitemoehybrid", "falcon_h1_norm": "falcon_h1",
                   "falcon_mamba": "mamba", "persimmon": "gpt_neox", **VISION_LANGUAGE_FAMILIES}

BIASED_HEAD = {"phi", "gptj"}  # families whose lm_head has a bias: trained or resized copies of it are refused

# Mixed ranks, targets (list and regex), rsLoRA, rank/alpha patterns, layers_to_transform.
ADAPTER_VARIANTS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=ALL_PROJ),
    "all-r16-rslora": dict(r=16, lora_alpha=8, target_modules=ALL_PROJ, use_rslora=True),
    "attn-r64": dict(r=64, lora_alpha=32, target_modules=ATTN_PROJ),
    "pattern-r16": dict(r=16, lora_alpha=16, target_modules=ALL_PROJ, rank_pattern={"v_proj": 4, "down_proj": 8},
                        alpha_pattern={"q_proj": 64}),
    "regex-mlp-r8": dict(r=8, lora_alpha=4, target_modules=r".*\.mlp\.(gate|up|down)_proj"),
    "layer1-r4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1]),
}


def save_adapter(peft_model, out: Path, **kwargs) -> Path:
    """``peft_model.save_pretrained(out, **kwargs)`` less the README model card, which nothing
    here reads and which costs half of a tiny adapter's build (a Jinja template compiled a save)."""
    peft_model.create_or_update_model_card = lambda output_dir: None
    peft_model.save_pretrained(out, **kwargs)
    return out


def build_adapter(model_dir: Path, out: Path, seed: int, scale: float = 0.3, rows_scale: float = 1.0,
                  **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, saved as PEFT saves it; trainable
    tokens' rows (trainable_token_indices) random with ``rows_scale``, about the embedding's scale,
    and fully trained modules (modules_to_save) the base layer plus noise of that scale."""
    from peft import LoraConfig, get_peft_model

    base = auto_model(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: near the base rows' norms, where training keeps it
                p.mul_(1 + torch.randn(p.shape, generator=gen) * scale)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "trainable_tokens_delta" in name:  # trainable tokens' new rows
                p.copy_(torch.randn(p.shape, generator=gen) * rows_scale)
            elif "modules_to_save" in name:  # a fully trained copy of a layer
                p.add_(torch.randn(p.shape, generator=gen) * rows_scale)
    save_adapter(peft_model, out)
    return out


def tokens_only_adapter(model: Path, path: Path, seed: int, tokens: list[int]) -> Path:
    """PEFT's TrainableTokensConfig alone (peft_type TRAINABLE_TOKENS), its rows random."""
    from peft import TrainableTokensConfig, get_peft_model

    peft_model = get_peft_model(auto_model(model, dtype=torch.float32),
                                TrainableTokensConfig(token_indices=list(tokens)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    save_adapter(peft_model, path)
    return path


def rewrite_adapter(path: Path, root: Path, name: str, config: dict | None = None, tensors=None) -> Path:
    """A copy of the adapter at ``path`` as ``root / name``, with ``config``'s fields set in its
    config and its tensors passed through ``tensors`` (callable(dict) -> dict), if given."""
    from safetensors.torch import load_file, save_file

    out = root / name
    out.mkdir()
    raw = json.loads((path / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**raw, **(config or {})}))
    weights = load_file(path / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, out / "adapter_model.safetensors")
    return out


def added_tokens_adapter(model_dir: Path, out: Path, seed: int, added: tuple[str, ...] = ("zebra", "quokka"),
                         specials: tuple[str, ...] = ("<tool>", "</tool>"), save_embedding_layers="auto",
                         tokenizer_changes=None, **lora_kwargs) -> Path:
    """A PEFT adapter trained on a resized vocabulary, as users make one: the base tokenizer with
    ``added`` tokens and ``specials`` (ids from the base vocabulary on), the model resized to it
    (``resize_token_embeddings``), LoRA (``lora_kwargs``, with modules_to_save if given) random as
    in ``build_adapter``, saved by PEFT (``save_embedding_layers``: its default writes the
    resized embedding layers) with the tokenizer beside it. ``tokenizer_changes``:
    callable(tokenizer) run before it is saved (an EOS or a chat template of its own)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(list(added))
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if tokenizer_changes is not None:
        tokenizer_changes(tok)
    base = auto_model(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    peft_model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    save_adapter(peft_model, out, save_embedding_layers=save_embedding_layers)
    tok.save_pretrained(out)
    return out


def reference_base(model_dir: Path):
    """The oracle's base model: HF's, in float32, eval mode. Gemma 2 runs HF's eager attention, its
    only path that soft-caps the scores: transformers 5.17 still let it take SDPA, which drops the cap."""
    capped = getattr(saved_config(model_dir), "attn_logit_softcapping", None) is not None
    return auto_model(model_dir, dtype=torch.float32, **({"attn_implementation": "eager"} if capped else {})).eval()


def peft_model(model_dir: Path, adapter_dir: Path | None):
    """The base model in float32 with the adapter loaded by PEFT (None: alone); an adapter trained
    on a resized vocabulary (its full embedding or lm_head of another size) gets the model resized
    to it first, as its users load it."""
    import re

    from peft import PeftModel
    from safetensors import safe_open

    from loramux.adapters.config import EMBEDDINGS, HEAD

    model = reference_base(model_dir)
    if adapter_dir is None:
        return model
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as f:
        rows = {f.get_slice(k).get_shape()[0] for k in f.keys()
                if re.search(rf"\.({'|'.join((*EMBEDDINGS, HEAD))})(\.token_adapter\.base_layer)?\.weight$", k)}
    if rows and rows != {model.get_input_embeddings().weight.shape[0]}:
        model.resize_token_embeddings(max(rows), mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


_PLAIN = (type(None), int, float, str)  # bool is an int


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or isinstance(value, (list, tuple)) and all(map(_plain, value))


_generated: dict[tuple, list[int]] = {}  # peft_generate's answers, by what determines them


def peft_generate(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int,
                  **gen_kwargs) -> list[list[int]]:
    """Each prompt generated alone (batch of one), greedy, float32: the oracle. An answer is kept by
    the model's and the adapter's contents, the prompt and the arguments, so the test files and
    parametrisations that ask the same question (the same built model, adapter and prompts, through
    another op backend or feature) have the oracle run once a worker: it is most of a parity test's
    time."""
    if not all(_plain(v) for v in gen_kwargs.values()):  # an argument without a value-like repr: no keeping
        return _peft_generate(model_dir, adapter_dir, prompts, max_new_tokens, **gen_kwargs)
    asked = (folder_digest(model_dir)[0], adapter_dir and folder_digest(adapter_dir)[0], max_new_tokens,
             repr(sorted(gen_kwargs.items())))
    keys = [(*asked, tuple(ids)) for ids in prompts]
    missing = list(dict.fromkeys(k for k in keys if k not in _generated))
    if missing:
        for key, out in zip(missing, _peft_generate(model_dir, adapter_dir, [list(k[-1]) for k in missing],
                                                    max_new_tokens, **gen_kwargs), strict=True):
            _generated[key] = out
    return [list(_generated[k]) for k in keys]


def _peft_generate(model_dir, adapter_dir, prompts, max_new_tokens, **gen_kwargs) -> list[list[int]]:
    model = peft_model(model_dir, adapter_dir)
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, **gen_kwargs)
            outs.append(y[0, len(ids):].tolist())
    return outs


def peft_cat_generate(model_dir: Path, adapters: dict[str, Path], parts: list[tuple[str, float]],
                      prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """PEFT's greedy tokens (no EOS) for add_weighted_adapter(combination_type="cat") of ``parts``
    [(name in ``adapters``, weight)], each prompt alone."""
    from peft import PeftModel

    base = reference_base(model_dir)
    (first, _), *rest = parts
    model = PeftModel.from_pretrained(base, adapters[first], adapter_name=first)
    for name, _ in rest:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter([n for n, _ in parts], [w for _, w in parts], "mix", combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None)
            outs.append(y[0, len(ids):].tolist())
    return outs


def peft_logprobs(model_dir: Path, adapter_dir: Path | None, prompt: list[int], scored: list[int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(scored), vocab]: PEFT's log-softmax at each position of ``prompt + scored`` that
    predicts a token of ``scored`` (one forward pass; float32: the oracle of every logprob; another
    ``dtype``: the model and adapter cast to it, as PEFT serves a half-precision model, or float64
    to score a float32 server against the exact values)."""
    model = peft_model(model_dir, adapter_dir).to(dtype)
    if dtype == torch.float64:  # MoE experts: transformers' grouped matmul takes no float64
        model.config._experts_implementation = "eager"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + scored])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)


SUBNORMAL_ELEMENTS = 1 << 22  # far past torch's grain for one thread: every thread of a team takes a part


def subnormals_made() -> int:
    """How many of a parallel op's products are subnormal (1e-30 x 1e-10 = 1e-40), not flushed."""
    return (torch.full((SUBNORMAL_ELEMENTS,), 1e-30) * 1e-10).count_nonzero().item()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def tiny_layout(model_dir: Path):
    """The LoRA layout of a saved model, from its config alone."""
    from transformers import AutoConfig

    from loramux.server.models import lora_layout

    return lora_layout(AutoConfig.from_pretrained(model_dir))


def pinned_base_linear(op_backend: str = "auto") -> str:
    """--base-linear for a parity test: its default (auto) picks paths by timing them, so a test pins
    one: the C++ kernel's few-row path beside the C++ LoRA ops (cpp, or auto on a CPU where they
    load), torch's matmul beside any other."""
    from loramux.server.ops.cpu_kernel import load_kernels

    cpu = not torch.cuda.is_available()
    return "kernel" if op_backend in ("auto", "cpp") and cpu and load_kernels() is not None else "torch"


def check_step_in_slots(run, bank: torch.Tensor, slots: list[int], definition_of) -> None:
    """A kernel step on the states in their slots (ops/recurrent.py ``in_slots``): ``run(bank,
    slots tensor)`` gives each row's output; ``definition_of(row, its state before)`` gives that
    row's (output, final state). Each row's output and its slot's new state are the definition's,
    every other slot of ``bank`` untouched."""
    before = bank.clone()
    out = run(bank, torch.tensor(slots))
    for d, slot in enumerate(slots):
        expected, final = definition_of(d, before[slot])
        torch.testing.assert_close(out[d].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bank[slot].double(), final, rtol=1e-5, atol=1e-5)
    others = [i for i in range(bank.shape[0]) if i not in slots]
    assert torch.equal(bank[others], before[others])


def _kernel_param():
    """pytest's parameter ``True`` (id "cpp") of a test run on the C++ kernel and the torch ops:
    skipped where the kernel is not built."""
    import pytest

    from loramux.server.ops.cpu_kernel import load_kernels

    return pytest.param(True, id="cpp", marks=pytest.mark.skipif(load_kernels() is None,
                                                                reason="the C++ kernel is not built"))


KERNEL = _kernel_param()
StepChunk = namedtuple("StepChunk", "row_start num_tokens state_saves")  # a prefill chunk, as the recurrent ops read it
StepRows = namedtuple("StepRows", "prefill num_prefill_rows state_slots decode_state_run")  # a StepBatch's


def chunks_cut_by_saves(data, lengths: list[int]) -> tuple[list, dict[int, tuple[int, int]]]:
    """Prefill chunks of ``lengths`` tokens, one after another in a step's rows (chunk i's state in
    slot i), each cut by state saves at positions hypothesis's ``data`` draws, into slots after the
    chunks' own: the chunks, and each save's slot -> (its chunk, the tokens before it)."""
    from hypothesis import strategies as st

    chunks, saved, row = [], {}, 0
    for i, n in enumerate(lengths):
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1) if n > 1 else st.just(set())))
        saves = tuple((c, len(lengths) + len(saved) + j) for j, c in enumerate(cuts))
        saved.update({slot: (i, c) for c, slot in saves})
        chunks.append(StepChunk(row, n, saves))
        row += n
    return chunks, saved


def check_chunks_and_saves(out, state, chunks, saved, defined, tol: float) -> None:
    """A recurrent op's run over ``chunks`` cut by ``saved`` (``chunks_cut_by_saves``): each chunk's
    rows of ``out``, its final state (slot i) and every saved state as ``defined(i, n)`` gives them:
    chunk i's outputs [n, ...] (float64) and its state after its first n tokens (all for None)."""
    for i, chunk in enumerate(chunks):
        expected, final = defined(i, None)
        torch.testing.assert_close(out[chunk.row_start : chunk.row_start + chunk.num_tokens].double(), expected,
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(state[i].double(), final, rtol=tol, atol=tol)
    for slot, (i, n) in saved.items():
        torch.testing.assert_close(state[slot].double(), defined(i, n)[1], rtol=tol, atol=tol)


def step_rows(chunks, decode_slots: list[int], chunk_slots: list[int]) -> StepRows:
    """A step's rows as the runner builds them for the torch ops: decode rows over consecutive
    slots are run in place (ops/recurrent.py)."""
    from loramux.server.runner import _consecutive

    return StepRows(chunks, sum(c.num_tokens for c in chunks), torch.tensor(chunk_slots + decode_slots),
                    _consecutive(decode_slots))
