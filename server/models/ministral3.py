"""Ministral 3 (``Ministral3ForCausalLM``): the Llama decoder whose queries, after RoPE, are scaled
by position past the RoPE's original context (``rope_parameters``: ``llama_4_scaling_beta`` b,
``original_max_position_embeddings`` n), as Llama 4's attention temperature:
q * (1 + b * log(1 + floor(pos / n))), 1 below n."""

from __future__ import annotations

import torch

from .batch import StepBatch
from .llama import LlamaForServing, LlamaLayer


class Ministral3Layer(LlamaLayer):
    def __init__(self, hf_layer, config, layer: int, cos: torch.Tensor, sin: torch.Tensor, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        rope = config.rope_parameters
        self.beta, self.original = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")

    def scale_queries(self, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if self.beta is None:
            return q
        scale = batch.masks.get("query scale")
        if scale is None:  # once per step, shared by layers; computed as Hugging Face computes it
            scale = 1 + self.beta * torch.log(1 + torch.floor(batch.positions / self.original))
            scale = batch.masks["query scale"] = scale[:, None, None].to(q.dtype)
        return q * scale


class Ministral3ForServing(LlamaForServing):
    LAYER = Ministral3Layer
