"""Mixture-of-experts decoders over a flat token batch: a dense family's attention (q_proj, k_proj,
v_proj, o_proj: the LoRA targets) and each layer's MLP Hugging Face's own module, run on the step's
rows: the router, its top-k experts and any shared experts beside them (or a dense MLP where the
config keeps one: ``mlp_only_layers``, ``first_k_dense_replace``, ``moe_layer_start_index``).

- Mixtral, Solar Open; Qwen2-MoE (biases), Qwen3-MoE and dots.llm1 (per-head q/k norms), GLM-4.5
  (``Glm4Moe``: RoPE on part of each head, optional per-head q/k norms), Phi-3.5-MoE (``Phimoe``:
  LayerNorms, biases, longrope recomputed past its original context as Phi-3's), K-EXAONE
  (``ExaoneMoe``: per-head q/k norms, RoPE only in local layers where a window is set): Llama's
  attention with its options;
- OLMoE and MiniMax-M2: q and k normed over all heads' dims at once;
- FlexOlmo: OLMo 2's layer (norms after each block, q/k norms over all heads);
- ERNIE 4.5 MoE: ERNIE 4.5's interleaved RoPE; Hunyuan MoE: q/k norms after RoPE, as its dense one;
- Granite MoE: Granite's scalars; Granite MoE SWA: GraniteSWA's sinks, windows and RoPE by layer,
  with a shared MLP beside the experts.

Transformers 5 stores the experts as 3-D parameters, not linear layers, so PEFT's ``target_modules``
cannot reach them (``target_parameters`` is refused, by adapters/config.py), nor the router; the
shared expert's linears and the dense MLP layers of a mixed model are not LoRA targets here
either. Every row is routed alone, so a request's experts do not depend on its batch.
"""

from __future__ import annotations

from ..config import StartupError
from .batch import StepBatch
from .ernie import Ernie4_5ForServing, Ernie4_5Layer
from .granite import GraniteForServing, GraniteLayer, LayerThetaRoPE
from .hunyuan import HunYuanDenseForServing, HunYuanDenseLayer
from .llama import ATTN_KINDS, LlamaForServing, LlamaLayer, attention_targets
from .olmo import Olmo2ForServing, Olmo2Layer, exaone_rope


class MoELayer(LlamaLayer):
    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.moe = mlp  # its weights stay in the model's dtype (not int8)

    def lora_modules(self):
        return [self.qkv, self.o_proj]

    def mlp(self, x, batch: StepBatch, apply_lora):
        return self.moe(x[None])[0]  # the module takes [batch, seq, hidden]


class DenseOrExperts:
    """A layer mixin for models whose layers mix both: a dense MLP (LoRA targets, built by
    ``init_dense``: Llama's gate|up and down by default), or a mixture of experts, run as
    ``MoELayer`` runs it (no LoRA on it). ``DENSE``: an attribute only the dense MLP has."""

    DENSE = "gate_proj"

    def init_mlp(self, mlp, layer: int, int8: bool) -> None:
        self.moe = None if hasattr(mlp, self.DENSE) else mlp
        if self.moe is None:
            self.init_dense(mlp, layer, int8)

    def init_dense(self, mlp, layer: int, int8: bool) -> None:
        LlamaLayer.init_mlp(self, mlp, layer, int8)

    def mlp_modules(self) -> list:
        return [] if self.moe is not None else [self.gate_up, self.down_proj]

    def mlp(self, x, batch: StepBatch, apply_lora):
        if self.moe is not None:
            return MoELayer.mlp(self, x, batch, apply_lora)
        return LlamaLayer.mlp(self, x, batch, apply_lora)


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
        if getattr(hf_model.config.get_text_config(), "clip_qkv", None) is not None:
            raise StartupError("OLMoE's clip_qkv is not served")
        super().__init__(hf_model, max_model_len, int8)


class PhimoeForServing(MoEForServing):
    RECOMPUTE_AT_ROPE_SPLIT = True  # longrope, as Phi-3's


class ExaoneMoeLayer(MoELayer):
    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.use_rope = exaone_rope(config, layer)


class ExaoneMoeForServing(MoEForServing):
    LAYER = ExaoneMoeLayer


class MoEOver:
    """The MoE decoder over a dense family's serving model (listed first among the bases)."""

    FUSED_KINDS = MoEForServing.FUSED_KINDS
    CUDA_GRAPHS = MoEForServing.CUDA_GRAPHS
    lora_targets = staticmethod(MoEForServing.lora_targets)


class FlexOlmoLayer(MoELayer, Olmo2Layer):
    pass


class FlexOlmoForServing(MoEOver, Olmo2ForServing):
    LAYER = FlexOlmoLayer


class Ernie4_5MoeLayer(MoELayer, Ernie4_5Layer):
    pass


class Ernie4_5MoeForServing(MoEOver, Ernie4_5ForServing):
    LAYER = Ernie4_5MoeLayer


class HunYuanMoeLayer(MoELayer, HunYuanDenseLayer):
    pass


class HunYuanMoeForServing(MoEOver, HunYuanDenseForServing):
    LAYER = HunYuanMoeLayer


class GraniteMoeLayer(MoELayer, GraniteLayer):
    MLP = "block_sparse_moe"


class GraniteMoeForServing(MoEOver, GraniteForServing):
    LAYER = GraniteMoeLayer


class GraniteMoeSWALayer(GraniteMoeLayer):
    def __init__(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):
        super().__init__(hf_layer, config, layer, cos, sin, int8)
        self.shared_mlp = hf_layer.shared_mlp  # None where shared_intermediate_size is 0

    def mlp(self, x, batch: StepBatch, apply_lora):
        out = super().mlp(x, batch, apply_lora)
        return out if self.shared_mlp is None else out + self.shared_mlp(x)


class GraniteMoeSWAForServing(LayerThetaRoPE, GraniteMoeForServing):
    LAYER = GraniteMoeSWALayer
