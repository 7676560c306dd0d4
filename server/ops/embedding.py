"""LoRA on the token embedding (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``).

The embedding's input is the token's one-hot vector, so its shrink is a gather of A's column:
    e[i] += sum_k a_store[P_ik, 0, token_i] * b_store[P_ik]
with P_i the pages of row i's adapter (a_store [num_pages, 1, vocab], b_store [num_pages, hidden],
B scaled as for every target). Pure torch on every device: its reads are r values and r rows of
hidden values a token, far below any linear's.
"""

from __future__ import annotations

import torch

from .plan import LoRAPlan


def embedding_lora(e: torch.Tensor, ids: torch.Tensor, a_store: torch.Tensor, b_store: torch.Tensor,
                   plan: LoRAPlan) -> None:
    """e: [T, hidden], updated in place; ids: [T] token ids; the plan's rows index both."""
    for g in plan.groups:
        if g.group_ends is None:  # per row: row j's pages are pages[j * rank : (j + 1) * rank]
            pages = g.pages.view(-1, g.rank)
        else:  # per adapter, over its run of rows
            counts = torch.diff(g.group_ends, prepend=g.group_ends.new_zeros(1))
            pages = g.pages.view(-1, g.rank).repeat_interleave(counts, dim=0, output_size=g.num_rows)
        v = a_store[:, 0][pages, ids[g.rows][:, None]].to(e.dtype)  # [n, rank]
        delta = torch.bmm(v[:, None, :], b_store[pages].to(e.dtype)).squeeze(1)  # [n, hidden]
        e.index_add_(0, g.rows, delta)
