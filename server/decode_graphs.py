"""Decode steps replayed from CUDA graphs: on a GPU a decode step is hundreds of small kernel
launches, and launching them costs more host time than the kernels take (after vLLM's and SGLang's
graph runners). The capture code lives here and nowhere else.

A decode-only step of B rows runs as the graph captured for the smallest batch size ("bucket") of
at least B and the smallest captured rank of at least the step's largest. Its metadata goes into
one static buffer of int64 rows, one per batch row,

    [token, position, write slot, context length, block table (W), adapter pages (R)]

W = max-model-len / block size and R = --max-lora-rank, copied to the device in one transfer before
the replay. Rows past B are padding: they write their K/V into the cache's sink block, attend to it
alone, and take the adapter pool's zero page, so nothing a real row reads changes. Stale block-table
entries past a row's own blocks are never read (attention stops at the row's length).

The LoRA plan is static too: every fused linear runs one BGMV group of the graph's rank r over all
rows and every kind of the linear. A row's pages are its adapter's, padded to r with the zero page
(a row without an adapter takes r zero pages), and the device pool writes zeros into the pages of the
kinds an adapter does not target (``DevicePool.zero_untargeted``), so padding adds exactly nothing.
The ranks captured are 16 and --max-lora-rank; a step without adapters replays a graph without any
LoRA, which therefore costs base-only batches nothing (SGLang found LoRA graphs slowing them).

The graph covers the decoder through its final norm (``ServingModel.hidden``); lm_head runs after
it, eagerly, so that no graph holds a [bucket, vocab] output of its own. Steps with prefill chunks,
drafts, prompt logprobs, DoRA adapters, LoRA on lm_head or the token embedding, or adapters' trained
copies of either (modules_to_save) run eagerly (runner.py).

On a CPU (``--cuda-graphs on``) nothing is captured: the same static buffers and plans run eagerly
each step, which is how the tests check this path token for token against PEFT.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Sequence

import torch

from .models.batch import StepBatch
from .ops.plan import LoRAPlan, RankGroup

log = logging.getLogger(__name__)

SMALL_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
BUCKET_STEP = 64  # past 256, every 64 rows
GRAPH_RANKS = (16,)  # captured besides --max-lora-rank (the most common adapter ranks pad to it)
ROW_HEAD = 4  # token, position, write slot, context length


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes captured: SMALL_BUCKETS below ``max_batch``, every BUCKET_STEP rows past
    256, and ``max_batch`` itself last (a step pads at most a quarter of its rows past 8)."""
    sizes = [b for b in SMALL_BUCKETS if b < max_batch]
    sizes += range(SMALL_BUCKETS[-1] + BUCKET_STEP, max_batch, BUCKET_STEP)
    return (*sizes, max_batch)


def graph_ranks(max_rank: int) -> tuple[int, ...]:
    return tuple(sorted({min(r, max_rank) for r in GRAPH_RANKS} | {max_rank}))


def static_key(items: Sequence, buckets: Sequence[int], ranks: Sequence[int],
               eager_kinds: frozenset[str]) -> tuple[int, int] | None:
    """The (bucket, rank) whose graph runs this step's WorkItems (rank 0: no row has an adapter),
    or None when the step must run eagerly: a prefill chunk, a row of more than one token (drafts)
    or with prompt logprobs, a DoRA adapter, an adapter's trained embedding or lm_head, an adapter
    targeting a kind in ``eager_kinds`` (lm_head, the token embedding), more rows than the largest
    bucket or a rank above the largest captured."""
    if not items or len(items) > buckets[-1]:
        return None
    rank = 0
    for it in items:
        if not it.decode or len(it.token_ids) != 1 or it.prompt_rows != (0, 0) or it.magnitude_page is not None \
                or it.saved_embedding is not None or it.saved_head is not None:
            return None
        if it.pages is not None:
            if it.kinds & eager_kinds:
                return None
            rank = max(rank, it.pages.numel())
    if rank:
        at = bisect_left(ranks, rank)
        if at == len(ranks):
            return None
        rank = ranks[at]
    return buckets[bisect_left(buckets, len(items))], rank


class DecodeGraphs:
    """The static decode path of one ModelRunner. ``run(items)`` returns the step's hidden states
    [len(items), hidden] (rows in the items' order), or None when the step is not one it serves."""

    def __init__(self, model, kv, apply_lora, device: torch.device, groups: Sequence[tuple[str, ...]],
                 zero_page: int, max_batch: int, max_rank: int, max_model_len: int, eager_kinds: frozenset[str]):
        self.model, self.kv, self.apply_lora, self.device = model, kv, apply_lora, device
        # the fused linears whose LoRA a static plan runs: all but those of ``eager_kinds``
        self.groups = tuple(g for g in groups if not eager_kinds.intersection(g))
        self.zero_page, self.eager_kinds = zero_page, eager_kinds
        self.buckets, self.ranks = batch_buckets(max_batch), graph_ranks(max_rank)
        self.width = -(-max_model_len // kv.block_size)  # block-table entries of the longest sequence
        self.row_len = ROW_HEAD + self.width + max_rank
        self.capturing = device.type == "cuda"
        size = max_batch * self.row_len
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=self.capturing)
        self.rows = self.host.numpy().reshape(max_batch, self.row_len)  # written row by row, in place
        self.buffer = torch.zeros(size, dtype=torch.long, device=device) if self.capturing else self.host
        self.row_ids = torch.arange(max_batch, device=device)
        self.no_blocks = torch.zeros(0, dtype=torch.long, device=device)
        self.sink = kv.num_blocks  # the cache's sink block
        self._pad(0, max_batch)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._copied = torch.cuda.Event() if self.capturing else None  # the last upload has read the host rows
        self.steps = 0  # steps served by the static path

    def _pad(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) as padding: token 0 at position 0, written to and reading the sink block."""
        pad = self.rows[lo:hi]
        pad[:, :ROW_HEAD] = (0, 0, self.sink * self.kv.block_size, 1)
        pad[:, ROW_HEAD] = self.sink
        pad[:, ROW_HEAD + self.width :] = self.zero_page

    def _fill(self, items: Sequence, bucket: int, rank: int) -> None:
        pages_at, block_size = ROW_HEAD + self.width, self.kv.block_size
        for row, it in zip(self.rows, items, strict=False):
            pos = it.start_pos
            row[:ROW_HEAD] = (it.token_ids[0], pos, it.slots[0], pos + 1)
            blocks = pos // block_size + 1  # those its context reads (a table may hold more: drafts' blocks)
            row[ROW_HEAD : ROW_HEAD + blocks] = it.blocks[:blocks]
            if rank:
                used = 0 if it.pages is None else it.pages.numel()
                if used:
                    row[pages_at : pages_at + used] = it.pages.numpy()
                row[pages_at + used : pages_at + rank] = self.zero_page
        self._pad(len(items), bucket)

    def _batch(self, bucket: int, rank: int) -> StepBatch:
        """The static step of ``bucket`` rows over the device buffer's first rows, its LoRA plan of ``rank``."""
        rows = self.buffer[: bucket * self.row_len].view(bucket, self.row_len)
        pages_at = ROW_HEAD + self.width
        lora = {}
        if rank:
            plan = LoRAPlan((RankGroup(rank=rank, rows=self.row_ids[:bucket], row_start=0,
                                       pages=rows[:, pages_at : pages_at + rank].reshape(-1), group_ends=None),))
            lora = {kinds: ((tuple(range(len(kinds))), plan),) for kinds in self.groups}
        positions, split = rows[:, 1].contiguous(), self.model.rope_split
        return StepBatch(
            input_ids=rows[:, 0].contiguous(), positions=positions, slot_mapping=rows[:, 2].contiguous(),
            prefill=(), prefill_blocks=self.no_blocks, prefill_chunks=self.no_blocks.view(0, 4), num_prefill_rows=0,
            decode_tables=rows[:, ROW_HEAD:pages_at].contiguous(), decode_lengths=rows[:, 3].contiguous(),
            decode_ctx=self.width * self.kv.block_size, logits_rows=self.row_ids[:bucket], lora=lora,
            # a decoding row takes the long frequencies from position split on (models/llama.py rope_row)
            rope_positions=None if split is None else torch.where(positions >= split, positions + split, positions))

    def _hidden(self, bucket: int, rank: int) -> torch.Tensor:
        return self.model.hidden(self._batch(bucket, rank), self.kv, self.apply_lora)

    def capture(self) -> None:
        """Capture every (bucket, rank) graph, largest bucket first so that the smaller ones reuse its
        memory (one pool for all), each after one eager run that compiles kernels and sizes scratch
        buffers outside the capture. Raises what a capture raises."""
        t0, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(self.device)
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                for rank in (0, *self.ranks):
                    self._hidden(bucket, rank)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: the adapter I/O thread may copy pages on its own stream meanwhile
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        hidden = self._hidden(bucket, rank)
                    self.graphs[(bucket, rank)] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        log.info("decode CUDA graphs: %d captured (batch sizes %s; LoRA ranks %s and none) in %.1f s, %.0f MiB",
                 len(self.graphs), ",".join(map(str, self.buckets)), ",".join(map(str, self.ranks)),
                 time.perf_counter() - t0, (torch.cuda.memory_reserved(self.device) - before) / 2**20)

    def run(self, items: Sequence) -> torch.Tensor | None:
        key = static_key(items, self.buckets, self.ranks, self.eager_kinds)
        if key is None or (self.capturing and key not in self.graphs):
            return None
        bucket, rank = key
        if self._copied is not None and not self._copied.query():  # (done: the last step read its tokens back since)
            self._copied.synchronize()
        self._fill(items, bucket, rank)
        self.steps += 1
        if not self.capturing:
            return self._hidden(bucket, rank)[: len(items)]
        n = bucket * self.row_len
        self.buffer[:n].copy_(self.host[:n], non_blocking=True)
        self._copied.record()
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[: len(items)]
