"""What one engine step feeds the model: a flat batch of tokens from many sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import LoRAPlans


@dataclass(frozen=True)
class PrefillSeq:
    row_start: int  # first row of this chunk in the flat batch
    num_tokens: int  # chunk length
    start_pos: int  # position of the chunk's first token (tokens before it are cached)
    block_start: int  # its blocks are prefill_blocks[block_start : block_start + num_blocks]
    num_blocks: int  # blocks covering positions [0, start_pos + num_tokens)
    # a recurrent model's (tokens into the chunk, state slot): where its state is copied on the way
    # (into a cached slot, recurrent_state.py)
    state_saves: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StepBatch:
    """Rows ``[0, num_prefill_rows)`` are prefill chunks (one contiguous run per sequence);
    rows ``[num_prefill_rows, T)`` are decode tokens, one per sequence. The attention metadata is
    built once per step (attention_metadata.py) and read by every layer."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each row's K/V is written: block * block_size + offset
    prefill: tuple[PrefillSeq, ...]
    prefill_blocks: torch.Tensor  # [sum of num_blocks] the prefill chunks' block tables, concatenated
    prefill_chunks: torch.Tensor  # [len(prefill), 4] each chunk's row_start, num_tokens, start_pos, block_start
    num_prefill_rows: int
    decode_tables: torch.Tensor  # [D, max blocks] block table of each decode row (padded with the sink)
    decode_lengths: torch.Tensor  # [D] context length after this step, this token included
    decode_ctx: int  # longest decode context
    logits_rows: torch.Tensor  # [N] rows whose next-token logits are needed
    lora: LoRAPlans  # fused kinds -> ((indices of the kinds used, rows and pages of the adapters using them), ...)
    masks: dict = field(default_factory=dict)  # attention masks and RoPE rows built once per step, shared by layers
    # adapters' fully trained copies (modules_to_save): (rows, weight [vocab, hidden]) that replace the
    # token embedding for those rows of the batch, and lm_head for those logits rows
    saved_embeddings: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    saved_heads: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    base_head_rows: torch.Tensor | None = None  # with saved_heads: the logits rows the base lm_head computes
    longest_prefill: int = 0  # the longest prefill chunk's tokens (the prefill kernel's grid)
    # [T] each row's row of the model's RoPE table where it differs from its position (a table split
    # in two, ServingModel.rope_split); None: the positions
    rope_positions: torch.Tensor | None = None
    # a recurrent model's (recurrent_state.py): each prefill chunk's state slot, then each decode row's,
    # [len(prefill) + D]; None for a model without recurrent layers
    state_slots: torch.Tensor | None = None
    # the decode rows' slots as one slice when they run consecutively upward (a batch admitted together
    # holds such slots), so that the torch ops update their states in place (ops/recurrent.py); else
    # None, and None where the C++ kernel's steps update the states in their slots
    decode_state_run: slice | None = None
