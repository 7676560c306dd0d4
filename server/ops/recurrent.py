"""A recurrent op over a step's flat batch: each sequence's rows from its own state.

A step's rows are prefill chunks (one contiguous run per sequence, each with ``row_start`` and
``num_tokens``: StepBatch.prefill), then decode rows, one a sequence. ``slots`` [chunks + decode
rows] gives each its state's row of ``state`` [slots + 1, ...] (recurrent_state.py). A chunk runs
``chunked(*its rows, its state)`` from its sequence's state, all decode rows at once run
``step(*their rows, their states)``; both update the state they are given in place (a copy,
written back here) and return their rows' outputs. A chunk's ``state_saves`` (tokens into it, a
slot) cut it there: the state after those tokens is also copied into that slot (the prefix
cache's, recurrent_state.py), and the rest of the chunk goes on from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def over_sequences(chunks, num_prefill_rows: int, slots: torch.Tensor, state: torch.Tensor, chunked: Callable,
                   step: Callable, *rows: torch.Tensor) -> torch.Tensor:
    """rows: tensors [T, ...] of the step's rows. Returns the outputs [T, ...], contiguous."""
    parts = []
    for i, seq in enumerate(chunks):
        slot, start, end = slots[i : i + 1], seq.row_start, seq.row_start + seq.num_tokens
        s = state[slot]  # [1, ...]
        for offset, target in seq.state_saves:
            parts.append(chunked(*(r[start : seq.row_start + offset] for r in rows), s[0]))
            state[target] = s[0]
            start = seq.row_start + offset
        if start < end:
            parts.append(chunked(*(r[start:end] for r in rows), s[0]))
        state[slot] = s
    if num_prefill_rows < rows[0].shape[0]:
        decoding = slots[len(chunks) :]
        run = _run(decoding)
        if run is not None:  # the states in place: no gather and scatter
            parts.append(step(*(r[num_prefill_rows:] for r in rows), state[run]))
        else:
            s = state[decoding]
            parts.append(step(*(r[num_prefill_rows:] for r in rows), s))
            state[decoding] = s
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)  # rows of unit stride, as linears read them


def _run(slots: torch.Tensor) -> slice | None:
    """The slots as one slice when they are consecutive and ascending (a batch admitted together
    holds such slots, lowest first: recurrent_state.py), read on the host; None otherwise, and on
    an accelerator, where reading them would wait for the device."""
    if slots.device.type != "cpu" or not slots.numel():
        return None
    first = int(slots[0])
    if int(slots[-1]) - first != slots.numel() - 1 or not torch.equal(
            slots, torch.arange(first, first + slots.numel(), dtype=slots.dtype)):
        return None
    return slice(first, first + slots.numel())
