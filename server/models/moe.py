"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE, Granite MoE SWA)
over a flat token batch: Llama's attention (q_proj, k_proj, v_proj, o_proj: the LoRA targets;
Qwen2-MoE's biases, Qwen3-MoE's per-head q/k norms, OLMoE's over all heads' dims, Granite MoE's
scalars as Granite's, Granite MoE SWA's as GraniteSWA's: sinks, windows, RoPE by layer), and each
layer's MLP Hugging Face's own module, run on the step's rows: the router, its top-k experts and
Qwen2-MoE's gated shared expert or Granite MoE SWA's shared MLP beside them (or a dense MLP where
the config keeps one: ``mlp_only_layers``).

Transformers 5 stores the experts as 3-D parameters, not linear layers, so PEFT's ``target_modules``
cannot reach them (``target_parameters`` is refused, by adapters/config.py), nor the router; the
shared expert's linears and the dense MLP layers of a mixed model are not LoRA targets here
either. Every row is routed alone, so a request's experts do not depend on its batch.
"""

from __future__ import annotations

from ..config import StartupError
from .batch import StepBatch
from .granite import GraniteForServing, GraniteLayer, LayerThetaRoPE
from .llama import ATTN_KINDS, LlamaForServing, LlamaLayer, attention_targets


class MoELayer(LlamaLayer):
    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.moe = mlp  # its weights stay in the model's dtype (not int8)

    def lora_modules(self):
        return [self.qkv, self.o_proj]

    def mlp(self, x, batch: StepBatch, apply_lora):
        return self.moe(x[None])[0]  # the module takes [batch, seq, hidden]


class MoEForServing(LlamaForServing):
    FUSED_KINDS = (ATTN_KINDS,)
    LAYER = MoELayer
    CUDA_GRAPHS = False  # Hugging Face's experts find the experts a batch routes to with nonzero(): a host sync

    @staticmethod
    def lora_targets(config):
        return attention_targets(config)


class OlmoeLayer(MoELayer):
    qk_norm_whole = True


class OlmoeForServing(MoEForServing):
    LAYER = OlmoeLayer

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        if hf_model.config.clip_qkv is not None:
            raise StartupError("OLMoE's clip_qkv is not served")
        super().__init__(hf_model, max_model_len, int8)


class GraniteMoeLayer(MoELayer, GraniteLayer):
    MLP = "block_sparse_moe"


class GraniteMoeForServing(GraniteForServing):
    FUSED_KINDS = MoEForServing.FUSED_KINDS
    LAYER = GraniteMoeLayer
    CUDA_GRAPHS = MoEForServing.CUDA_GRAPHS
    lora_targets = staticmethod(MoEForServing.lora_targets)


class GraniteMoeSWALayer(GraniteMoeLayer):
    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.shared_mlp = hf_layer.shared_mlp  # None where shared_intermediate_size is 0

    def mlp(self, x, batch: StepBatch, apply_lora):
        out = super().mlp(x, batch, apply_lora)
        return out if self.shared_mlp is None else out + self.shared_mlp(x)


class GraniteMoeSWAForServing(LayerThetaRoPE, GraniteMoeForServing):
    LAYER = GraniteMoeSWALayer
