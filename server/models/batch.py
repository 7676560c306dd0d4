"""What one engine step feeds the model: a flat batch of tokens from many sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import LoRAPlan


@dataclass(frozen=True)
class PrefillSeq:
    slot: int
    row_start: int  # first row of this chunk in the flat batch
    num_tokens: int  # chunk length
    start_pos: int  # position of the chunk's first token (tokens before it are cached)


@dataclass(frozen=True)
class StepBatch:
    """Rows ``[0, num_prefill_rows)`` are prefill chunks (one contiguous run per sequence);
    rows ``[num_prefill_rows, T)`` are decode tokens, one per sequence."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] KV slot of each row
    prefill: tuple[PrefillSeq, ...]
    num_prefill_rows: int
    decode_slots: torch.Tensor  # [D]
    decode_lengths: torch.Tensor  # [D] context length after this step, this token included
    decode_span: int  # max decode slot + 1: decode attention runs over a view of slots [0, span)
    decode_ctx: int  # longest decode context
    logits_rows: torch.Tensor  # [N] rows whose next-token logits are needed
    lora: dict[str, LoRAPlan]  # module kind -> rows (and pages) of the adapters that target it
    masks: dict = field(default_factory=dict)  # attention masks built once per step, shared by layers
