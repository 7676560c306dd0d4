"""Vision-language checkpoints served for text: their decoder runs alone, as the text family it is.

A checkpoint such as Mistral Small 3.1 (``Mistral3ForConditionalGeneration``) or Qwen2.5-VL holds a
vision tower and a projector beside a decoder of a family served here (Mistral, Qwen2, ...). A text
request never reaches the tower, so the server runs the decoder alone, with that family's serving
model. Two things differ from the text checkpoint:

- module names: PEFT names an adapter's modules on the whole model, so the decoder's sit under its
  path there (``model.language_model.``; SmolVLM's ``model.text_model.``) instead of ``model.``;
- an adapter trained on the whole model (``all-linear``, or target names the tower shares) holds
  LoRA on the tower and projector too: skipped (``LoRALayout.ignored``), which leaves every text
  output the one PEFT gives for a text-only input.

Image inputs are not served. Only checkpoints whose text-only forward is their decoder's are listed:
not PaliGemma (prefix attention), Mllama (cross-attention layers), Llama 4's (its head under the
decoder), nor Command A Vision (Hugging Face's drops the decoder's logit scale there).
"""

from __future__ import annotations

from functools import cache

from .llama import LlamaForServing

_TOWER = ("model.vision_tower.", "model.multi_modal_projector.")
_QWEN_VL = ("model.visual.",)
_IDEFICS = ("model.vision_model.", "model.connector.")

# architecture -> (its decoder's module path, the parts a text request never reaches, the text
# architecture of its decoder: None where the text config's model_type names it)
VISION_LANGUAGE = {
    "Gemma3ForConditionalGeneration": ("model.language_model", _TOWER, None),
    "Mistral3ForConditionalGeneration": ("model.language_model", _TOWER, None),
    "LlavaForConditionalGeneration": ("model.language_model", _TOWER, None),
    "LlavaNextForConditionalGeneration": ("model.language_model", _TOWER, None),
    "LlavaOnevisionForConditionalGeneration": ("model.language_model", _TOWER, None),
    "InternVLForConditionalGeneration": ("model.language_model", _TOWER, None),
    "AyaVisionForConditionalGeneration": ("model.language_model", _TOWER, None),
    # multimodal RoPE: a text position is the same in each of its sections, which is plain RoPE
    "Qwen2VLForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen2ForCausalLM"),
    "Qwen2_5_VLForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen2ForCausalLM"),
    "Qwen3VLForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen3ForCausalLM"),
    "Qwen3VLMoeForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen3MoeForCausalLM"),
    "Qwen3_5ForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": ("model.language_model", _QWEN_VL, "Qwen3_5MoeForCausalLM"),
    "Glm4vForConditionalGeneration": ("model.language_model", _QWEN_VL, "Glm4ForCausalLM"),
    "Glm4vMoeForConditionalGeneration": ("model.language_model", _QWEN_VL, "Glm4MoeForCausalLM"),
    "Lfm2VlForConditionalGeneration": ("model.language_model", _TOWER, None),
    "Lfm3VlForConditionalGeneration": ("model.language_model", _TOWER, None),
    "Idefics3ForConditionalGeneration": ("model.text_model", _IDEFICS, None),
    "SmolVLMForConditionalGeneration": ("model.text_model", _IDEFICS, None),
}


def text_architecture(architecture: str, config) -> str | None:
    """The causal-LM architecture of a vision-language checkpoint's decoder (None: not known)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fixed = VISION_LANGUAGE[architecture][2]
    return fixed or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get_text_config().model_type)


@cache
def vision_language_class(architecture: str, text_class: type[LlamaForServing]) -> type[LlamaForServing]:
    """``text_class`` (the decoder's family) serving the decoder of an ``architecture`` checkpoint,
    its modules named as on the whole model. One class per pair, so that a class is the same object
    each time it is asked for."""
    inner, ignored, _ = VISION_LANGUAGE[architecture]
    prefix = f"{text_class.INNER}."

    def renamed(name: str) -> str:
        return name.replace(prefix, f"{inner}.", 1)

    class VisionLanguageForServing(text_class):
        INNER = inner
        EMBEDDING = (renamed(text_class.EMBEDDING[0]), text_class.EMBEDDING[1])
        IGNORED = ignored

        def __init__(self, hf_model, max_model_len: int, int8: bool = False):
            super().__init__(hf_model, max_model_len, int8)
            self.ignored_modules = tuple(name for name, _ in hf_model.named_modules() if name.startswith(ignored))

        @staticmethod
        def lora_targets(config):
            return {kind: (renamed(template), fin, fout)
                    for kind, (template, fin, fout) in text_class.lora_targets(config).items()}

        @classmethod
        def layer_targets(cls, config):
            return [{kind: (renamed(template), fin, fout) for kind, (template, fin, fout) in targets.items()}
                    for targets in text_class.layer_targets(config)]

    VisionLanguageForServing.__name__ = VisionLanguageForServing.__qualname__ = f"{architecture}Serving"
    return VisionLanguageForServing
