"""GPT-OSS (``GptOssForCausalLM``: gpt-oss-20b, gpt-oss-120b) over a flat token batch: the MoE
decoder (moe.py) with what GPT-OSS adds.

- Attention sinks: a learned logit per head in each softmax's denominator, with no value
  (``FlatAttention``'s ``sinks``; every decode backend and Triton's prefill take them).
- Biases on q, k, v and o; local (``sliding_attention``) and global layers alternating; YaRN RoPE.
- Hugging Face's rotary module returns cos and sin over half of each head (its RoPE turns the two
  halves by the same angles), so the table is widened to the rotate-half layout the layers share.
- The MLP (router, then the top-k experts' clamped SwiGLU) runs as Hugging Face's own module and
  returns its router scores beside the output.
"""

from __future__ import annotations

import torch

from .batch import StepBatch
from .moe import MoEForServing, MoELayer


class GptOssLayer(MoELayer):
    def mlp(self, x, batch: StepBatch, apply_lora):
        return self.moe(x[None])[0][0]  # (hidden [1, T, hidden], router scores)


class GptOssForServing(MoEForServing):
    LAYER = GptOssLayer

    def rope_table(self, inner, max_model_len: int, kind: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().rope_table(inner, max_model_len, kind)  # [max_len, head_dim / 2]
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
