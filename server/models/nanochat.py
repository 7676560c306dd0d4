"""nanochat (``NanoChatForCausalLM``, Karpathy's) over a flat token batch: the Llama decoder with
weightless RMSNorms everywhere, the embedding normed before the first layer (by the final norm's
module), RoPE turning the other way (Hugging Face's rotate_half is [x2, -x1]: sin negated), q and k
normed per head after it, a relu² MLP without a gate (``fc1``, ``fc2``), and soft-capped logits
(``final_logit_softcapping``)."""

from __future__ import annotations

import torch

from .batch import StepBatch
from .llama import QKNormsAfterRoPE
from .nemotron import UngatedForServing, UngatedLayer


class NanoChatLayer(QKNormsAfterRoPE, UngatedLayer):
    UP, DOWN = "fc1", "fc2"

    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.q_norm_after, self.k_norm_after = self.q_norm, self.k_norm  # LlamaLayer's would norm before RoPE
        self.q_norm = self.k_norm = None


class NanoChatForServing(UngatedForServing):
    LAYER = NanoChatLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        self.logit_softcap = self.config.final_logit_softcapping

    def rope_table(self, inner, max_model_len: int, kind) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().rope_table(inner, max_model_len, kind)
        return cos, -sin

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.final_norm(self.embed_with_lora(batch))
