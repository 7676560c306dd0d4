"""The static decode path's policies (decode_graphs.py): which steps it serves, at which captured
batch size and rank, and what the static rows hold, padding included."""

from types import SimpleNamespace

import pytest
import torch

from loramux.server.decode_graphs import ROW_HEAD, DecodeGraphs, batch_buckets, graph_ranks, static_key
from loramux.server.runner import WorkItem

BUCKETS, RANKS = batch_buckets(12), graph_ranks(64)
EAGER = frozenset({"lm_head", "embed_tokens"})


def decode(pos: int = 5, rank: int | None = None, **kw) -> WorkItem:
    pages = None if rank is None else torch.arange(100, 100 + rank)
    fields = dict(token_ids=[7], start_pos=pos, slots=[pos], blocks=[0, 1], pages=pages,
                  adapter=None if rank is None else f"r{rank}", decode=True, needs_logits=True,
                  kinds=frozenset() if rank is None else frozenset({"q_proj", "v_proj"}))
    return WorkItem(**{**fields, **kw})


def test_batch_sizes_and_ranks_captured():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert batch_buckets(512)[-6:] == (224, 256, 320, 384, 448, 512)
    assert graph_ranks(64) == (16, 64) and graph_ranks(16) == (16,) and graph_ranks(8) == (8,)


@pytest.mark.parametrize("items, key", [
    ([decode()], (1, 0)),  # base model only: the graph without LoRA
    ([decode()] * 3, (4, 0)),
    ([decode(rank=4), decode()], (2, 16)),  # padded to the smallest captured rank that holds it
    ([decode(rank=4), decode(rank=20), decode()], (4, 64)),
    ([decode()] * 12, (12, 0)),
])
def test_decode_steps_take_the_smallest_batch_size_and_rank_that_hold_them(items, key):
    assert static_key(items, BUCKETS, RANKS, EAGER) == key


@pytest.mark.parametrize("odd", [
    dict(decode=False),  # a prefill chunk
    dict(token_ids=[7, 8], slots=[5, 6]),  # a row with a draft
    dict(prompt_rows=(0, 1)),  # prompt logprobs
    dict(magnitude_page=3),  # DoRA
    dict(saved_head=torch.zeros(1)),  # a trained lm_head (modules_to_save)
    dict(saved_embedding=torch.zeros(1)),
    dict(kinds=frozenset({"q_proj", "lm_head"})),  # LoRA on lm_head
    dict(pages=torch.arange(65)),  # above the largest captured rank
])
def test_steps_the_static_path_cannot_run_are_left_to_the_eager_one(odd):
    items = [decode(rank=8), decode(rank=8, **odd)]
    assert static_key(items, BUCKETS, RANKS, EAGER) is None
    assert static_key([decode()] * 13, BUCKETS, RANKS, EAGER) is None  # more rows than the largest size
    assert static_key([], BUCKETS, RANKS, EAGER) is None


def test_rows_past_the_step_are_padding_that_touches_only_the_sink_and_the_zero_page():
    """After a step of four rows, a step of three in the same batch size: the fourth row must not
    keep the last step's slot (it would overwrite a live sequence's K/V) or pages."""
    kv = SimpleNamespace(num_blocks=10, block_size=4)
    graphs = DecodeGraphs(None, kv, None, torch.device("cpu"), [("q_proj",)], zero_page=50, max_batch=12,
                          max_rank=64, max_model_len=16, eager_kinds=EAGER)
    width, sink_slot = 4, 10 * 4
    assert graphs.row_len == ROW_HEAD + width + 64
    graphs._fill([decode(pos=9 + i, rank=8, slots=[9 + i], blocks=[3, 4, 5, 6]) for i in range(4)], 4, 16)
    assert graphs.rows[3, 2] == 12
    # the first row's table holds a block past its context (a draft's, or one allocated ahead): only those
    # its context reads are written, so a table never spills into the pages
    graphs._fill([decode(pos=6, rank=4, slots=[6], blocks=[2, 1, 8, 9, 3]), decode(pos=2, blocks=[7]),
                  decode(rank=16)], 4, 16)
    rows = graphs.rows
    assert list(rows[0, :ROW_HEAD]) == [7, 6, 6, 7] and list(rows[0, ROW_HEAD : ROW_HEAD + 2]) == [2, 1]
    assert rows[1, ROW_HEAD] == 7
    pages = rows[:, ROW_HEAD + width :]
    assert list(pages[0, :16]) == [100, 101, 102, 103] + [50] * 12  # rank 4 padded with the zero page
    assert list(pages[1, :16]) == [50] * 16  # no adapter: zero pages only
    assert list(pages[2, :16]) == list(range(100, 116))
    assert list(rows[3, :ROW_HEAD]) == [0, 0, sink_slot, 1] and rows[3, ROW_HEAD] == kv.num_blocks
    assert (pages[3:] == 50).all() and (rows[3:, 2] == sink_slot).all()
