"""Mamba's mixer (Mamba-1: Gu and Dao, 2023) over a flat batch, and the models made of it alone:
Mamba (``MambaForCausalLM``, the state-spaces checkpoints) and Falcon Mamba
(``FalconMambaForCausalLM``). Jamba's Mamba layers are this mixer too (jamba.py).

``in_proj`` projects the normed input into x and a gate z; x goes through a depthwise causal
convolution (ops/short_conv.py) and SiLU; ``x_proj`` gives the step's low-rank input, B and C
(Falcon Mamba and Jamba norm each: Hugging Face's ``dt_layernorm``, ``b_layernorm``,
``c_layernorm``); ``dt_proj``'s weight maps the step to channels, its bias joins it under softplus;
the selective scan (ops/selective_scan.py) maps x to y by a [channels, state] state per sequence
(float32); y + D x, gated by SiLU(z), goes through ``out_proj``. LoRA targets: in_proj, x_proj,
out_proj. Not ``dt_proj``: Hugging Face's mixer multiplies by its weight directly, so PEFT's LoRA
on it changes nothing there; such an adapter is refused, naming the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.selective_scan import discretize, selective_scan
from ..ops.short_conv import short_conv
from .batch import StepBatch
from .layers import FusedLoRALinear
from .mamba2 import MixerLM


class MambaMixer(nn.Module):
    """Hugging Face's Mamba mixer (``mixer``) over a flat batch; ``states``: its convolution's
    state's index among the recurrent states, then its scan's."""

    def __init__(self, mixer, layer: int, states: int, int8: bool = False):
        super().__init__()
        self.in_proj = FusedLoRALinear.from_linears([mixer.in_proj], ("in_proj",), layer, int8)
        self.x_proj = FusedLoRALinear.from_linears([mixer.x_proj], ("x_proj",), layer, int8)
        self.out_proj = FusedLoRALinear.from_linears([mixer.out_proj], ("out_proj",), layer, int8)
        self.dt_weight, self.dt_bias = mixer.dt_proj.weight, mixer.dt_proj.bias  # [D, rank], [D]
        self.conv_weight, self.conv_bias = mixer.conv1d.weight, mixer.conv1d.bias  # [D, 1, K], [D] or None
        self.act = {"silu": F.silu, "swish": F.silu}[mixer.activation]
        self.register_buffer("A", -mixer.A_log.detach().float().exp(), persistent=False)  # once, not a step
        self.D = mixer.D
        self.rank, self.state_size = mixer.time_step_rank, mixer.ssm_state_size
        # Falcon Mamba's (weightless) and Jamba's norms of the step, B and C; None: none
        self.norms = tuple(getattr(mixer, name, None) for name in ("dt_layernorm", "b_layernorm", "c_layernorm"))
        self.states = states

    def lora_modules(self) -> list[FusedLoRALinear]:
        return [self.in_proj, self.x_proj, self.out_proj]

    @staticmethod
    def state_specs(mixer) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        return [((mixer.intermediate_size, mixer.conv_kernel_size - 1), None),
                ((mixer.intermediate_size, mixer.ssm_state_size), torch.float32)]

    def forward(self, x, batch: StepBatch, kv, apply_lora):
        dtype = x.dtype
        xs, z = self.in_proj(x, batch.lora, apply_lora).chunk(2, dim=1)
        conv_state, state = (kv.states.states[self.states + j] for j in (0, 1))
        xs = self.act(short_conv(xs, batch, conv_state, self.conv_weight, self.conv_bias,
                                 kv.states.kernel))
        dt, B, C = self.x_proj(xs, batch.lora, apply_lora).split([self.rank, self.state_size, self.state_size], dim=1)
        if self.norms[0] is not None:
            dt, B, C = (norm(t) for norm, t in zip(self.norms, (dt, B, C), strict=True))
        dt = discretize(F.linear(dt, self.dt_weight), self.dt_bias)  # HF's dt_proj.weight @ dt: no LoRA, bias later
        y = selective_scan(xs, dt, self.A, B, C, self.D, batch, state, kv.states.kernel)
        return self.out_proj((y * F.silu(z.float())).to(dtype), batch.lora, apply_lora)


class MambaForServing(MixerLM):
    """Mamba and Falcon Mamba: every layer a ``MambaBlock`` of this mixer."""

    MIXER = MambaMixer

    @staticmethod
    def lora_targets(config):
        return mixer_targets(config.hidden_size, config.intermediate_size, config.time_step_rank,
                             config.state_size, "backbone.layers.{i}.mixer.")


def mixer_targets(hidden: int, inner: int, rank: int, state: int, mixer: str) -> dict[str, tuple[str, int, int]]:
    """The mixer's LoRA targets under the module name template ``mixer``."""
    return {"in_proj": (mixer + "in_proj", hidden, 2 * inner), "x_proj": (mixer + "x_proj", inner, rank + 2 * state),
            "out_proj": (mixer + "out_proj", inner, hidden)}
