"""Per-family serving models. Each builds from a loaded Hugging Face model."""

from __future__ import annotations

from .bloom import BloomForServing
from .cohere import Cohere2ForServing, CohereForServing
from .deepseek import DeepseekV2ForServing, DeepseekV3ForServing, DenseMLAForServing, MiniCPM3ForServing
from .ernie import Ernie4_5ForServing, HeliumForServing
from .falcon import FalconForServing
from .falcon_h1 import FalconH1ForServing
from .gemma import Gemma1ForServing, GemmaForServing
from .glm import Glm4ForServing, GlmForServing
from .gpt2 import GPT2ForServing
from .gpt_bigcode import GPTBigCodeForServing
from .gpt_neo import GPTNeoForServing
from .gpt_neox import GPTNeoXForServing, PersimmonForServing
from .gpt_oss import GptOssForServing
from .gptj import GPTJForServing
from .granite import GraniteForServing, GraniteSWAForServing, HyperCLOVAXForServing
from .granite_hybrid import GraniteMoeHybridForServing
from .hunyuan import HunYuanDenseForServing
from .jamba import BambaForServing, JambaForServing
from .lfm2 import Lfm2ForServing
from .llama import LlamaForServing, Phi3ForServing
from .llama4 import Llama4ForServing
from .mamba import MambaForServing
from .mamba2 import Mamba2ForServing
from .ministral3 import Ministral3ForServing
from .moe import (
    Ernie4_5MoeForServing,
    ExaoneMoeForServing,
    FlexOlmoForServing,
    GraniteMoeForServing,
    GraniteMoeSWAForServing,
    HunYuanMoeForServing,
    MoEForServing,
    OlmoeForServing,
    PhimoeForServing,
)
from .mpt import MptForServing
from .nanochat import NanoChatForServing
from .nemotron import ApertusForServing, UngatedForServing
from .nemotron_h import NemotronHForServing
from .olmo import Exaone4ForServing, Olmo2ForServing, OlmoForServing
from .opt import OPTForServing
from .phi import PhiForServing
from .qwen3_5 import OlmoHybridForServing, Qwen3_5ForServing
from .stablelm import StableLmForServing
from .starcoder2 import Starcoder2ForServing
from .vision_language import VISION_LANGUAGE, text_architecture, vision_language_class

# HF architecture name -> serving model class. Llama, Mistral, Ministral, Seed-OSS, Qwen2, Qwen3, SmolLM3 and CWM share one decoder;
# Ministral 3, ERNIE 4.5, Hunyuan dense, Helium, LFM2/LFM3, Qwen3.5, Qwen3-Next, OLMo Hybrid, Granite 4.0-H, Nemotron-H, Bamba, Falcon-H1 and Jamba (hybrids with recurrent layers), Mamba, Falcon Mamba and Mamba-2 (recurrent alone), GLM, GLM-4, Nemotron, Arcee, Jais 2, Apertus, Phi, Phi-3, Gemma 1/2/3, VaultGemma, Granite, GraniteSWA, HyperCLOVA X, OLMo 1/2/3, EXAONE 4.0, StableLM, StarCoder2, Cohere 1/2, GPT-NeoX, Persimmon, GPT-J, nanochat, Falcon and the MoE decoders (Mixtral, Qwen2/3-MoE, GLM-4.5, dots.llm1, Solar Open, Phi-3.5-MoE, K-EXAONE, OLMoE, MiniMax-M2, FlexOlmo, ERNIE 4.5 MoE, Hunyuan MoE, Granite MoE, Granite MoE SWA, GPT-OSS, Llama 4, and MLA's: DeepSeek-V2, DeepSeek-V3, GLM-4.7-Flash, A.X K1, Youtu-LLM, MiniCPM3) build on it (their own projections, norms, scales and caps).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForServing,
    "MistralForCausalLM": LlamaForServing,
    "MinistralForCausalLM": LlamaForServing,
    "Ministral3ForCausalLM": Ministral3ForServing,
    "SeedOssForCausalLM": LlamaForServing,
    "Ernie4_5ForCausalLM": Ernie4_5ForServing,
    "HeliumForCausalLM": HeliumForServing,
    "GlmForCausalLM": GlmForServing,
    "Glm4ForCausalLM": Glm4ForServing,
    "Qwen2ForCausalLM": LlamaForServing,
    "Qwen3ForCausalLM": LlamaForServing,
    "SmolLM3ForCausalLM": LlamaForServing,
    "CwmForCausalLM": LlamaForServing,
    "HunYuanDenseV1ForCausalLM": HunYuanDenseForServing,
    "MixtralForCausalLM": MoEForServing,
    "Qwen2MoeForCausalLM": MoEForServing,
    "Qwen3MoeForCausalLM": MoEForServing,
    "Glm4MoeForCausalLM": MoEForServing,
    "Dots1ForCausalLM": MoEForServing,
    "SolarOpenForCausalLM": MoEForServing,
    "PhimoeForCausalLM": PhimoeForServing,
    "ExaoneMoeForCausalLM": ExaoneMoeForServing,
    "MiniMaxM2ForCausalLM": OlmoeForServing,
    "FlexOlmoForCausalLM": FlexOlmoForServing,
    "Ernie4_5_MoeForCausalLM": Ernie4_5MoeForServing,
    "HunYuanMoEV1ForCausalLM": HunYuanMoeForServing,
    "OlmoeForCausalLM": OlmoeForServing,
    "GraniteMoeForCausalLM": GraniteMoeForServing,
    "GraniteMoeSWAForCausalLM": GraniteMoeSWAForServing,
    "GptOssForCausalLM": GptOssForServing,
    "Llama4ForCausalLM": Llama4ForServing,
    "DeepseekV2ForCausalLM": DeepseekV2ForServing,
    "DeepseekV3ForCausalLM": DeepseekV3ForServing,
    "Glm4MoeLiteForCausalLM": DeepseekV3ForServing,
    "AXK1ForCausalLM": DeepseekV3ForServing,
    "YoutuForCausalLM": DenseMLAForServing,
    "MiniCPM3ForCausalLM": MiniCPM3ForServing,
    "NemotronForCausalLM": UngatedForServing,
    "ArceeForCausalLM": UngatedForServing,
    "Jais2ForCausalLM": UngatedForServing,
    "ApertusForCausalLM": ApertusForServing,
    "PhiForCausalLM": PhiForServing,
    "Phi3ForCausalLM": Phi3ForServing,
    "GemmaForCausalLM": Gemma1ForServing,
    "Gemma2ForCausalLM": GemmaForServing,
    "Gemma3ForCausalLM": GemmaForServing,
    "VaultGemmaForCausalLM": GemmaForServing,
    "GraniteForCausalLM": GraniteForServing,
    "GraniteSWAForCausalLM": GraniteSWAForServing,
    "HyperCLOVAXForCausalLM": HyperCLOVAXForServing,
    "OlmoForCausalLM": OlmoForServing,
    "Olmo2ForCausalLM": Olmo2ForServing,
    "Olmo3ForCausalLM": Olmo2ForServing,
    "Exaone4ForCausalLM": Exaone4ForServing,
    "Lfm2ForCausalLM": Lfm2ForServing,
    "Lfm2MoeForCausalLM": Lfm2ForServing,
    "Lfm3ForCausalLM": Lfm2ForServing,
    "Qwen3_5ForCausalLM": Qwen3_5ForServing,
    "Qwen3_5MoeForCausalLM": Qwen3_5ForServing,
    "Qwen3NextForCausalLM": Qwen3_5ForServing,
    "OlmoHybridForCausalLM": OlmoHybridForServing,
    "GraniteMoeHybridForCausalLM": GraniteMoeHybridForServing,
    "NemotronHForCausalLM": NemotronHForServing,
    "BambaForCausalLM": BambaForServing,
    "FalconH1ForCausalLM": FalconH1ForServing,
    "Mamba2ForCausalLM": Mamba2ForServing,
    "MambaForCausalLM": MambaForServing,
    "FalconMambaForCausalLM": MambaForServing,
    "JambaForCausalLM": JambaForServing,
    "StableLmForCausalLM": StableLmForServing,
    "Starcoder2ForCausalLM": Starcoder2ForServing,
    "CohereForCausalLM": CohereForServing,
    "Cohere2ForCausalLM": Cohere2ForServing,
    "GPT2LMHeadModel": GPT2ForServing,
    "GPTNeoForCausalLM": GPTNeoForServing,
    "GPTBigCodeForCausalLM": GPTBigCodeForServing,
    "GPTNeoXForCausalLM": GPTNeoXForServing,
    "PersimmonForCausalLM": PersimmonForServing,
    "GPTJForCausalLM": GPTJForServing,
    "OPTForCausalLM": OPTForServing,
    "FalconForCausalLM": FalconForServing,
    "BloomForCausalLM": BloomForServing,
    "MptForCausalLM": MptForServing,
    "NanoChatForCausalLM": NanoChatForServing,
}


class UnsupportedModel(ValueError):
    pass


def serving_model_class(architecture: str, config=None):
    """The serving model of a Hugging Face architecture; a vision-language one's (VISION_LANGUAGE)
    from its ``config``, by its decoder's family."""
    if architecture in VISION_LANGUAGE:
        if config is None:
            raise ValueError(f"{architecture}: its decoder's family is in its config, which was not given")
        text = text_architecture(architecture, config)
        text_class = SUPPORTED_ARCHITECTURES.get(text)
        if text_class is None or not issubclass(text_class, LlamaForServing):
            model_type = config.get_text_config().model_type
            raise UnsupportedModel(f"{architecture}'s decoder ({model_type!r}, {text!r}) is not a family served "
                                   f"here; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        return vision_language_class(architecture, text_class)
    try:
        return SUPPORTED_ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedModel(
            f"architecture {architecture!r} is not supported; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}, and for text the vision-language {sorted(VISION_LANGUAGE)}"
        ) from None


def architecture_of(hf_config) -> str:
    return hf_config.architectures[0] if hf_config.architectures else ""


def lora_layout(hf_config):
    """The LoRA layout of a model from its Hugging Face config (no weights loaded)."""
    return serving_model_class(architecture_of(hf_config), hf_config).layout_from_config(hf_config)
