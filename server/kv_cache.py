"""Block-paged KV memory: per layer, K and V as ``[num_blocks + 1, block_size, kv_heads, head_dim]``.

Which block holds which tokens is the ``BlockManager``'s business; this class only owns the
tensors. The extra last block is the sink: positions that must not be stored (they are already in
an immutable cached block) are written there, and nothing reads it.
"""

from __future__ import annotations

import torch

from ..adapters import huge_pages
from .ops.attention import paged_decode_torch
from .recurrent_state import RecurrentStates


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, decode_attention=paged_decode_torch, prefill_attention=None):
        # zeros, not empty: the padded fallback reads whole blocks, and 0 * NaN would leak into its output
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        kv = huge_pages.zeros_many([shape] * (2 * num_layers), dtype, device)
        self.k, self.v = kv[:num_layers], kv[num_layers:]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.decode_attention = decode_attention  # ops/attention.py: the C++, Triton or torch kernel
        self.prefill_attention = prefill_attention  # every prefill chunk in one call (Triton), or None: SDPA per chunk
        self.states: RecurrentStates | None = None  # a hybrid model's recurrent layers' per-sequence states

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V [T, kv_heads, hd] at flat slots [T] (block * block_size + offset)."""
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v
