"""Mamba-2's mixer (Dao and Gu, 2024) over a flat batch, as the hybrids' Hugging Face modules hold it
(Granite 4.0-H's ``GraniteMoeHybridMambaLayer``, Nemotron-H's ``NemotronHMamba2Mixer``, Bamba's
``BambaMixer``, Falcon-H1's ``FalconH1Mixer``), and the Mamba-2 language models made of it alone.

``in_proj`` projects the normed input into a gate z, x|B|C and the step dt; x|B|C go through a
depthwise causal convolution (ops/short_conv.py) and SiLU; the selective state space (ops/ssd.py)
maps x to y by a [heads, head dim, state] state per sequence (float32); y, gated by SiLU(z) and
RMS-normed by groups (Hugging Face's module), goes through ``out_proj``. A sequence's states: the
convolution's last inputs and the scan's (recurrent_state.py). LoRA targets: in_proj, out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.short_conv import short_conv
from ..ops.ssd import discretize, ssd
from .base import RecurrentLayers, ServingModel
from .batch import StepBatch
from .layers import FusedLoRALinear
from .llama import fast_norm


class Mamba2Mixer(nn.Module):
    """Hugging Face's Mamba-2 mixer (``mixer``) over a flat batch; ``states``: its convolution's
    state's index among the recurrent states, then its scan's."""

    def __init__(self, mixer, layer: int, states: int, int8: bool = False):
        super().__init__()
        self.in_proj = FusedLoRALinear.from_linears([mixer.in_proj], ("in_proj",), layer, int8)
        self.out_proj = FusedLoRALinear.from_linears([mixer.out_proj], ("out_proj",), layer, int8)
        self.conv_weight, self.conv_bias = mixer.conv1d.weight, mixer.conv1d.bias  # [conv dim, 1, K], [conv dim]
        self.act = {"silu": F.silu, "swish": F.silu}[mixer.activation]
        self.register_buffer("A", -mixer.A_log.detach().float().exp(), persistent=False)  # once, not a step
        self.D, self.dt_bias, self.norm = mixer.D, mixer.dt_bias, mixer.norm
        self.heads, self.head_dim, self.groups, self.state_size = (mixer.num_heads, mixer.head_dim, mixer.n_groups,
                                                                   mixer.ssm_state_size)
        self.inner, self.chunk = mixer.intermediate_size, mixer.chunk_size
        self.limit = tuple(mixer.time_step_limit or (0.0, float("inf")))
        self.states = states
        # Falcon-H1's: the input scaled, the projection's columns scaled (its MuP vector), the gated
        # norm optional (else y is gated by SiLU(z) alone)
        self.in_scale = getattr(mixer, "ssm_in_multiplier", None)
        mup = getattr(mixer, "mup_vector", None)
        self.register_buffer("mup", None if mup is None else mup.reshape(-1), persistent=False)
        self.gated_norm = getattr(mixer, "mamba_rms_norm", True)

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.in_proj, self.out_proj]

    @staticmethod
    def state_specs(mixer) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        conv_dim = mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size
        return [((conv_dim, mixer.conv_kernel_size - 1), None),
                ((mixer.num_heads, mixer.head_dim, mixer.ssm_state_size), torch.float32)]

    def forward(self, x, batch: StepBatch, kv, apply_lora):
        T, bc, dtype = x.shape[0], self.groups * self.state_size, x.dtype
        if self.in_scale is not None:
            x = x * self.in_scale
        projected = self.in_proj(x, batch.lora, apply_lora)
        if self.mup is not None:
            projected = projected * self.mup
        gate, xbc, dt = projected.split([self.inner, self.inner + 2 * bc, self.heads], 1)
        conv_state, state = (kv.states.states[self.states + j] for j in (0, 1))
        xbc = self.act(short_conv(xbc, batch, conv_state, self.conv_weight, self.conv_bias,
                                  kv.states.kernel))
        xs, B, C = xbc.split([self.inner, bc, bc], dim=1)
        y = ssd(xs.reshape(T, self.heads, self.head_dim), discretize(dt, self.dt_bias, self.limit), self.A,
                B.reshape(T, self.groups, self.state_size), C.reshape(T, self.groups, self.state_size), self.D, batch,
                state, self.chunk, kv.states.kernel)
        y = y.reshape(T, self.inner)
        y = self.norm(y, gate) if self.gated_norm else y * F.silu(gate)  # HF's norm: float32, gated by SiLU(z), by groups
        return self.out_proj(y.to(dtype), batch.lora, apply_lora)


def mamba2_targets(hidden: int, inner: int, groups: int, state: int, heads: int, mixer: str
                   ) -> dict[str, tuple[str, int, int]]:
    """The mixer's LoRA targets under the module name template ``mixer``: ``in_proj`` gives the
    gate z and x (``inner`` each), B and C (``groups`` x ``state`` each) and dt (``heads``)."""
    return {"in_proj": (mixer + "in_proj", hidden, 2 * inner + 2 * groups * state + heads),
            "out_proj": (mixer + "out_proj", inner, hidden)}


class MambaBlock(nn.Module):
    """A block that adds its mixer of its normed input (``norm``) to the residual stream
    (Nemotron-H's, Mamba-2's, Mamba's: ``mixer`` a Mamba2Mixer or a mamba.py MambaMixer)."""

    def __init__(self, hf_block, mixer: nn.Module):
        super().__init__()
        self.norm, self.mixer = fast_norm(hf_block.norm), mixer

    def lora_modules(self) -> list[FusedLoRALinear]:
        return self.mixer.lora_modules()

    def forward(self, h, batch: StepBatch, kv, apply_lora):
        return h + self.mixer(self.norm(h), batch, kv, apply_lora)


class MixerLM(RecurrentLayers, ServingModel):
    """A language model of mixer blocks alone (``MambaBlock`` of a ``MIXER``), no attention and so
    no K/V; the token embedding ``embeddings``, the last norm ``norm_f``, all under ``backbone``."""

    EMBEDDING = ("backbone.embeddings", "embeddings")
    MIXER: type

    def __init__(self, hf_model, max_model_len: int, int8: bool = False):
        super().__init__()
        self.config, inner = hf_model.config, hf_model.backbone
        self.embeddings, self.final_norm, self.lm_head = inner.embeddings, fast_norm(inner.norm_f), hf_model.lm_head
        self.layers = nn.ModuleList(MambaBlock(block, self.MIXER(block.mixer, i, 2 * i, int8))
                                    for i, block in enumerate(inner.layers))
        self.kv_spec = (0, 1, 1)  # no attention: the KV pool's blocks are bookkeeping alone
        self.recurrent_states = [spec for block in inner.layers for spec in self.MIXER.state_specs(block.mixer)]

    def embed(self, batch: StepBatch) -> torch.Tensor:
        return self.embed_with_lora(batch)


class Mamba2ForServing(MixerLM):
    """Mamba-2 language models (``Mamba2ForCausalLM``: Mamba-Codestral, the state-spaces checkpoints)."""

    MIXER = Mamba2Mixer

    @staticmethod
    def lora_targets(config):
        return mamba2_targets(config.hidden_size, config.expand * config.hidden_size, config.n_groups,
                              config.state_size, config.num_heads, "backbone.layers.{i}.mixer.")
