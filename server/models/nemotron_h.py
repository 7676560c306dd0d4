"""Nemotron-H (NVIDIA: Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano): a stack of single-operator blocks.

Each block adds one operator of its normed input (``norm``) to the residual stream, by its type in
``layers_block_type``: a Mamba-2 mixer ("linear_attention", mamba2.py), grouped-query attention
without positions encoded ("full_attention"; its K/V in the paged cache), a squared-ReLU MLP
without a gate ("mlp": up_proj, down_proj), or a mixture of experts ("moe", run as Hugging Face's
module on the step's rows, no LoRA on it). The token embedding is ``embeddings``, the last norm
``norm_f``. LoRA targets, all under ``mixer``: q_proj, k_proj, v_proj, o_proj; in_proj, out_proj;
up_proj, down_proj.
"""

from __future__ import annotations

from torch import nn

from .base import RecurrentLayers
from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import ATTN_KINDS, LlamaForServing, LlamaLayer, attention_targets, fast_norm
from .mamba2 import Mamba2Mixer, MambaBlock, mamba2_targets
from .moe import MoELayer

MAMBA, ATTENTION, MLP = "linear_attention", "full_attention", "mlp"


class AttentionBlock(LlamaLayer):
    def __init__(self, hf_block, config, layer: int, kv_layer: int, cos, sin, int8: bool = False):
        nn.Module.__init__(self)
        attn = hf_block.mixer
        self.norm = fast_norm(hf_block.norm)
        self.qkv = FusedLoRALinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], ATTN_KINDS, layer, int8)
        self.o_proj = FusedLoRALinear.from_linears([attn.o_proj], ("o_proj",), layer, int8)
        self.q_norm = self.k_norm = None
        self.init_attention(config, layer, cos, sin)
        self.attention.layer = kv_layer  # the cache holds the attention blocks' K/V alone

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.qkv, self.o_proj]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        return h + self.attend(self.norm(h), batch, kv, apply_lora)


class MLPBlock(nn.Module):
    def __init__(self, hf_block, layer: int, int8: bool = False):
        super().__init__()
        mlp = hf_block.mixer
        self.norm = fast_norm(hf_block.norm)
        self.up = FusedLoRALinear.from_linears([mlp.up_proj], ("up_proj",), layer, int8)
        self.down = FusedLoRALinear.from_linears([mlp.down_proj], ("down_proj",), layer, int8)
        self.act = mlp.act_fn

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.up, self.down]

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        return h + self.down(self.act(self.up(self.norm(h), batch.lora, apply_lora)), batch.lora, apply_lora)


class ExpertsBlock(nn.Module):
    def __init__(self, hf_block):
        super().__init__()
        self.norm, self.moe = fast_norm(hf_block.norm), hf_block.mixer

    def lora_modules(self) -> list[FusedLoRALinear]:
        return []

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        return h + MoELayer.mlp(self, self.norm(h), batch, apply_lora)


class NemotronHForServing(RecurrentLayers, LlamaForServing):
    EMBEDDING = ("model.embeddings", "embeddings")
    FINAL_NORM = "norm_f"
    FUSED_KINDS = (ATTN_KINDS,)

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__(hf_model, max_model_len, int8)
        types = self.config.layers_block_type
        self.kv_spec = (types.count(ATTENTION), *self.kv_spec[1:])
        self.recurrent_states = [spec for block in hf_model.model.layers if block.block_type == MAMBA
                                 for spec in Mamba2Mixer.state_specs(block.mixer)]

    def LAYER(self, hf_block, config, layer: int, cos, sin, int8: bool = False):  # noqa: N802 - LlamaForServing's hook
        before = config.layers_block_type[:layer]
        kind = config.layers_block_type[layer]
        if kind == MAMBA:
            return MambaBlock(hf_block, Mamba2Mixer(hf_block.mixer, layer, 2 * before.count(MAMBA), int8))
        if kind == ATTENTION:
            return AttentionBlock(hf_block, config, layer, before.count(ATTENTION), cos, sin, int8)
        return MLPBlock(hf_block, layer, int8) if kind == MLP else ExpertsBlock(hf_block)

    @staticmethod
    def lora_targets(config):
        """Every target kind (``layer_targets`` gives each block its own)."""
        hidden, mixer = config.hidden_size, "model.layers.{i}.mixer."
        mamba = mamba2_targets(hidden, config.mamba_num_heads * config.mamba_head_dim, config.n_groups,
                               config.ssm_state_size, config.mamba_num_heads, mixer)
        return {**attention_targets(config, attn=mixer), **mamba,
                "up_proj": (mixer + "up_proj", hidden, config.intermediate_size),
                "down_proj": (mixer + "down_proj", config.intermediate_size, hidden)}

    @classmethod
    def layer_targets(cls, config):
        targets = cls.lora_targets(config)
        kinds = {MAMBA: ("in_proj", "out_proj"), ATTENTION: (*ATTN_KINDS, "o_proj"), MLP: ("up_proj", "down_proj")}
        return [{kind: targets[kind] for kind in kinds.get(block, ())} for block in config.layers_block_type]
