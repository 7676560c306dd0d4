"""One step's attention metadata, built on the host once for all layers: positions, where each
row's K/V is written, and the block tables that prefill chunks and decode rows read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.batch import PrefillSeq
from .ops.plan import longs


@dataclass(frozen=True)
class AttentionMetadata:
    positions: list[int]
    slot_mapping: list[int]
    prefill: tuple[PrefillSeq, ...]
    prefill_blocks: torch.Tensor
    prefill_chunks: torch.Tensor
    decode_tables: torch.Tensor
    decode_lengths: torch.Tensor
    decode_ctx: int


def build_attention_metadata(prefill_items, decode_items, block_size: int, sink: int) -> AttentionMetadata:
    """``*_items``: WorkItems in row order (prefill chunks, then decode items: one row per token).
    Each item carries its write slots and its block table."""
    positions, slots, chunks, blocks = [], [], [], []
    row = 0
    for it in prefill_items:
        n = len(it.token_ids)
        nb = -(-(it.start_pos + n) // block_size)
        chunks.append(PrefillSeq(row, n, it.start_pos, len(blocks), nb, it.state_saves))
        blocks.extend(it.blocks[:nb])
        positions.extend(range(it.start_pos, it.start_pos + n))
        slots.extend(it.slots)
        row += n
    # a decode item's rows: its tokens at consecutive positions, each attending up to itself (a
    # drafting row's chunk, whose K/V are all written before any row reads them)
    width = max((len(it.blocks) for it in decode_items), default=0)
    tables: list[int] = []
    for it in decode_items:
        tables += (it.blocks + [sink] * (width - len(it.blocks))) * len(it.token_ids)
    lengths = []
    for it in decode_items:
        positions.extend(range(it.start_pos, it.start_pos + len(it.token_ids)))
        lengths.extend(range(it.start_pos + 1, it.start_pos + len(it.token_ids) + 1))
        slots.extend(it.slots)
    spans = longs([v for c in chunks for v in (c.row_start, c.num_tokens, c.start_pos, c.block_start)])
    return AttentionMetadata(positions, slots, tuple(chunks), longs(blocks), spans.view(len(chunks), 4),
                             longs(tables).view(len(lengths), width), longs(lengths), max(lengths, default=0))
