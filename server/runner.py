"""Owns the frozen model and its KV cache; runs one flat batch per step under inference_mode."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace

import torch

from ..adapters.config import HEAD
from ..adapters.loader import LoRALayout
from .attention_metadata import build_attention_metadata
from .decode_graphs import DecodeGraphs
from .kv_cache import PagedKVCache
from .models.batch import StepBatch
from .models.llama import rope_row
from .ops import LoRAPlan, LoRAPlans, merge_plans, plan_segments, plan_tokens
from .ops.plan import MagnitudeRuns, longs, upload


@dataclass(slots=True)  # not frozen: one is built per row per step, and a frozen one's init costs 4x (1.7 us)
class WorkItem:
    # tokens to feed this step: a prefill chunk, or the last sampled token (and a decoding row's drafts)
    token_ids: list[int]
    start_pos: int  # position of token_ids[0]
    slots: list[int]  # where each token's K/V is written (block * block_size + offset)
    blocks: list[int]  # the sequence's block table, covering at least start_pos + len(token_ids)
    pages: torch.Tensor | None  # adapter pages; None: base model
    adapter: Hashable | None  # the adapter's key, for grouping rows by adapter
    decode: bool
    needs_logits: bool  # the chunk ends the prompt, or it is a decode
    kinds: frozenset[str] = frozenset()  # module kinds the adapter targets
    magnitude_page: int | None = None  # a DoRA adapter's page of per-output scales
    # [a, b): tokens whose logits are wanted too (a chunk's prompt logprobs, a decoding row's drafts)
    prompt_rows: tuple[int, int] = (0, 0)
    # the adapter's fully trained token embedding and lm_head [vocab, hidden] (modules_to_save), if any
    saved_embedding: torch.Tensor | None = None
    saved_head: torch.Tensor | None = None
    long_rope: bool = False  # all its positions take RoPE's long frequencies (ServingModel.rope_split)
    state_slot: int | None = None  # its recurrent state's slot (recurrent_state.py); None: the sink
    # a prefill chunk's (tokens into it, cached state slot): where its state is copied for the prefix cache
    state_saves: tuple[tuple[int, int], ...] = ()

    def uses(self, kind: str) -> bool:
        return self.pages is not None and kind in self.kinds


def _saved(items: list[WorkItem], runs: Iterable[tuple[int, int, int]], attr: str
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(rows, weight) for each distinct trained copy ``attr`` of the items; ``runs``: (item, first
    row, rows) of every item's rows, read only when some item has such a copy."""
    if all(getattr(it, attr) is None for it in items):
        return ()
    rows: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for i, start, count in runs:
        weight = getattr(items[i], attr)
        if weight is not None:
            rows.setdefault(id(weight), (weight, []))[1].extend(range(start, start + count))
    return tuple((longs(r), weight) for weight, r in rows.values())


STEP_FIELDS = ("input_ids", "positions", "slot_mapping", "prefill_blocks", "prefill_chunks", "decode_tables",
               "decode_lengths", "logits_rows")


def _consecutive(slots: list[int | None]) -> slice | None:
    """``slots`` as one slice when they run consecutively upward; else None."""
    if not slots or slots[0] is None or slots != list(range(slots[0], slots[0] + len(slots))):
        return None
    return slice(slots[0], slots[0] + len(slots))


def upload_step(batch: StepBatch, device, pin: bool = True) -> StepBatch:
    """A host-built step's metadata (batch fields and every plan's rows, pages and segment ends)
    onto ``device`` in one copy (ops/plan.py ``upload``). Plans that linears share stay shared."""
    plans = list({id(p): p for entries in batch.lora.values() for _, p in entries}.values())
    groups = [g for p in plans for g in p.groups]
    magnitudes = [p.magnitude for p in plans if p.magnitude is not None]
    host = [getattr(batch, f) for f in STEP_FIELDS]
    for g in groups:
        host += [g.rows, g.pages] + ([] if g.group_ends is None else [g.group_ends])
    for m in magnitudes:
        host += m.tensors
    saved = [*batch.saved_embeddings, *batch.saved_heads]
    host += [rows for rows, _ in saved] + ([] if batch.base_head_rows is None else [batch.base_head_rows])
    host += [] if batch.rope_positions is None else [batch.rope_positions]
    host += [] if batch.state_slots is None else [batch.state_slots]
    moved = iter(upload(host, device, pin))
    fields = {f: next(moved) for f in STEP_FIELDS}
    new_groups = {id(g): replace(g, rows=next(moved), pages=next(moved),
                                 group_ends=None if g.group_ends is None else next(moved)) for g in groups}
    new_magnitudes = {id(m): m.with_tensors([next(moved) for _ in m.tensors]) for m in magnitudes}
    new_plans = {id(p): LoRAPlan(tuple(new_groups[id(g)] for g in p.groups),
                                 None if p.magnitude is None else new_magnitudes[id(p.magnitude)]) for p in plans}
    lora = {kinds: tuple((used, new_plans[id(p)]) for used, p in entries) for kinds, entries in batch.lora.items()}
    rows = [next(moved) for _ in saved]
    embeddings = len(batch.saved_embeddings)
    return replace(batch, **fields, lora=lora,
                   saved_embeddings=tuple(zip(rows[:embeddings], (w for _, w in batch.saved_embeddings), strict=True)),
                   saved_heads=tuple(zip(rows[embeddings:], (w for _, w in batch.saved_heads), strict=True)),
                   base_head_rows=None if batch.base_head_rows is None else next(moved),
                   rope_positions=None if batch.rope_positions is None else next(moved),
                   state_slots=None if batch.state_slots is None else next(moved))


def _per_row(items: list[WorkItem], row_items: list[int | None]) -> tuple[LoRAPlan, list[tuple[int, int]]]:
    """BGMV: row j uses item ``row_items[j]``'s adapter (None: none). Returns the plan, and the
    (row, magnitude page) of the rows whose adapters are DoRA adapters, ascending."""
    token_adapter, adapter_pages, dora_rows = [], [], []
    index: dict[Hashable, int] = {}
    for row, i in enumerate(row_items):
        if i is None:
            token_adapter.append(-1)
            continue
        it = items[i]
        if it.adapter not in index:
            index[it.adapter] = len(adapter_pages)
            adapter_pages.append(it.pages)
        token_adapter.append(index[it.adapter])
        if it.magnitude_page is not None:
            dora_rows.append((row, it.magnitude_page))
    return plan_tokens(token_adapter, adapter_pages), dora_rows


def _row_runs(rows: list[tuple[int, int]]) -> list[tuple[int, int, torch.Tensor]]:
    """DoRA's magnitude runs (ops/plan.py ``MagnitudeRuns``) of single rows, ascending (row, page):
    adjacent rows make one run."""
    runs: list[tuple[int, list[int]]] = []  # (first row, pages)
    for row, page in rows:
        if runs and runs[-1][0] + len(runs[-1][1]) == row:
            runs[-1][1].append(page)
        else:
            runs.append((row, [page]))
    return [(lo, lo + len(pages), longs(pages)) for lo, pages in runs]


class ModelRunner:
    def __init__(self, model, kv: PagedKVCache, apply_lora, device: torch.device, layout: LoRALayout):
        self.model = model
        self.kv = kv
        self.apply_lora = apply_lora
        self.device = device
        self.groups = tuple(g for g in layout.groups if g != (HEAD,))  # the decoder's; lm_head's runs on logits rows
        self.head = HEAD in layout.kinds
        self.graphs: DecodeGraphs | None = None  # the static decode path (decode_graphs.py), when on

    def _plans(self, items, prefill: list[int], seg_starts: list[int], decode: list[int],
               num_prefill: int) -> LoRAPlans:
        """Per fused linear, one plan for each set of its kinds that the step's adapters target
        (usually one: q|k|v all, or q and v). Equal row selections share one plan, so
        all-projection adapters build a single plan for the whole step."""
        order = (*prefill, *decode)
        by_rows: dict[frozenset[int], LoRAPlan] = {}
        plans: LoRAPlans = {}
        # an item's kinds, None without an adapter: items of one adapter (or of none) share them
        kinds_of = [None if it.pages is None else it.kinds for it in items]
        for group in self.groups:
            used_of = {k: () if k is None else tuple(j for j, kind in enumerate(group) if kind in k)
                       for k in set(kinds_of)}
            used_by = {i: used_of[kinds_of[i]] for i in order}
            entries = []
            for used in sorted(set(used_by.values()) - {()}):
                rows = frozenset(i for i in order if used_by[i] == used)
                if rows not in by_rows:
                    by_rows[rows] = self._plan(items, prefill, seg_starts, decode, num_prefill, rows)
                entries.append((used, by_rows[rows]))
            if entries:
                plans[group] = tuple(entries)
        return plans

    @staticmethod
    def _plan(items, prefill, seg_starts, decode, num_prefill: int, selected: frozenset[int]) -> LoRAPlan:
        """The plan of the ``selected`` items: prefill chunks as SGMV segments, decode rows as BGMV."""
        seg_pages = [items[i].pages if i in selected else None for i in prefill]
        per_row, dora_rows = _per_row(items, [None] * num_prefill + [i if i in selected else None for i in decode])
        plan = merge_plans(plan_segments(seg_starts, seg_pages), per_row)
        runs = [(seg_starts[k], seg_starts[k + 1], items[i].magnitude_page) for k, i in enumerate(prefill)
                if i in selected and items[i].magnitude_page is not None]
        runs += _row_runs(dora_rows)
        return replace(plan, magnitude=MagnitudeRuns(tuple(runs))) if runs else plan

    @staticmethod
    def _head_plan(items: list[WorkItem], row_items: list[int]) -> LoRAPlan | None:
        """lm_head's plan: BGMV over the logits rows, row j being item ``row_items[j]``'s; None when
        no row's adapter targets lm_head."""
        plan, dora_rows = _per_row(items, [i if items[i].uses(HEAD) else None for i in row_items])
        if plan.empty:
            return None
        return replace(plan, magnitude=MagnitudeRuns(tuple(_row_runs(dora_rows)))) if dora_rows else plan

    def build_batch(self, items: list[WorkItem]) -> tuple[StepBatch, list[int], list[tuple[int, int]]]:
        """Prefill chunks first, grouped by adapter so that each adapter's rows are one run (SGMV);
        then decode tokens (BGMV; a decode item with drafts has a row per token, each attending up to
        itself). Returns the batch; for each sampling logits row, its item index; and after those
        rows, the rows of the items' ``prompt_rows`` as (item index, count), in that order."""
        prefill = sorted((i for i, it in enumerate(items) if not it.decode),
                         key=lambda i: (items[i].adapter is None, str(items[i].adapter)))
        # decode rows with adapters first, by rank, so that each BGMV group's rows are one slice, and
        # within a rank DoRA adapters' rows last, so that they are one run to rescale
        decode = sorted((i for i, it in enumerate(items) if it.decode),
                        key=lambda i: (items[i].pages is None, 0 if items[i].pages is None else items[i].pages.numel(),
                                       items[i].magnitude_page is not None))
        ids, seg_starts, logits_rows, order, extra, prompt_rows, token_runs = [], [0], [], [], [], [], []

        def feed(i: int) -> None:
            a, b = items[i].prompt_rows
            if b > a:
                extra.extend(range(len(ids) + a, len(ids) + b))
                prompt_rows.append((i, b - a))
            token_runs.append((i, len(ids), len(items[i].token_ids)))
            ids.extend(items[i].token_ids)

        for i in prefill:
            it = items[i]
            feed(i)
            seg_starts.append(len(ids))
            if it.needs_logits:
                logits_rows.append(len(ids) - 1)
                order.append(i)
        num_prefill = len(ids)
        decode_rows = []  # each decode row's item
        for i in decode:
            feed(i)  # a drafting row's positions but its last give extra logits rows
            decode_rows += [i] * len(items[i].token_ids)
            logits_rows.append(len(ids) - 1)
            order.append(i)
        logits_rows += extra
        lora = self._plans(items, prefill, seg_starts, decode_rows, num_prefill)
        logits_items = order + [i for i, count in prompt_rows for _ in range(count)]
        head = self._head_plan(items, logits_items) if self.head else None
        saved_heads = _saved(items, ((i, row, 1) for row, i in enumerate(logits_items)), "saved_head")
        if head is not None:
            lora[(HEAD,)] = (((0,), head),)
        meta = build_attention_metadata([items[i] for i in prefill], [items[i] for i in decode],
                                        self.kv.block_size, self.kv.num_blocks)
        batch = StepBatch(
            input_ids=longs(ids),
            positions=longs(meta.positions),
            slot_mapping=longs(meta.slot_mapping),
            prefill=meta.prefill,
            prefill_blocks=meta.prefill_blocks,
            prefill_chunks=meta.prefill_chunks,
            num_prefill_rows=num_prefill,
            decode_tables=meta.decode_tables,
            decode_lengths=meta.decode_lengths,
            decode_ctx=meta.decode_ctx,
            logits_rows=longs(logits_rows),
            lora=lora,
            saved_embeddings=_saved(items, token_runs, "saved_embedding"),
            saved_heads=saved_heads,
            base_head_rows=longs([row for row, i in enumerate(logits_items) if items[i].saved_head is None])
            if saved_heads else None,
            longest_prefill=max((c.num_tokens for c in meta.prefill), default=0),
            rope_positions=None if self.model.rope_split is None else longs(
                rope_row(p, self.model.rope_split, items[i].long_rope)
                for p, i in zip(meta.positions, (i for i in (*prefill, *decode) for _ in items[i].token_ids), strict=True)),
            state_slots=None if self.kv.states is None else longs(
                self.kv.states.sink if items[i].state_slot is None else items[i].state_slot for i in (*prefill, *decode)),
            decode_state_run=None if self.kv.states is None or self.kv.states.kernel else
            _consecutive([items[i].state_slot for i in decode]),  # read by the torch ops alone
        )
        if self.device.type != "cpu":  # built on the host; one asynchronous copy takes it all over
            batch = upload_step(batch, self.device)
        return batch, order, prompt_rows

    def warm_up(self) -> None:
        """A one-token prefill step, then a decode step, of the base model, their K/V written to the
        cache's sink block: kernels compile (Triton's attention on a GPU) and libraries set up now,
        not in the first request's step."""
        sink = self.kv.num_blocks
        item = WorkItem([0], 0, [sink * self.kv.block_size], [sink], None, None, decode=False, needs_logits=True)
        for it in (item, replace(item, decode=True)):
            self.step([it])

    @torch.inference_mode()
    def step(self, items: list[WorkItem]) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
        """Run one step. Returns logits [N + P, vocab] (float32, on the model's device: sampling
        takes only token ids off it): N rows to sample, the item index of each, then P prompt rows,
        as (item index, count) in row order."""
        if self.graphs is not None:
            hidden = self.graphs.run(items)
            if hidden is not None:  # a decode step replayed: one row per item, in order
                return self.model.logits(hidden, self.apply_lora), list(range(len(items))), []
        batch, order, prompt_rows = self.build_batch(items)
        logits = self.model(batch, self.kv, self.apply_lora)
        return logits, order, prompt_rows
