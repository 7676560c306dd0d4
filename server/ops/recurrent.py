"""A recurrent op over a step's flat batch: each sequence's rows from its own state.

A step's rows (``batch``, models/batch.py StepBatch: its ``prefill``, ``num_prefill_rows``,
``state_slots`` and ``decode_state_run``) are prefill chunks (one contiguous run per sequence,
each with ``row_start`` and ``num_tokens``), then decode rows, one a sequence. ``state_slots``
[chunks + decode rows] gives each its state's row of ``state`` [slots + 1, ...]
(recurrent_state.py). A chunk runs ``chunked(*its rows, its state)`` from its sequence's state,
all decode rows at once run ``step(*their rows, their states)``; both update the state they are
given in place (a copy, written back here) and return their rows' outputs. Decode rows whose
slots run consecutively (``decode_state_run``) are given those states in place instead, a view;
an ``in_slots`` step (the C++ kernel's, as ops/gated_delta.py ``cpp_recurrent_step``) takes the
decode rows' slots and updates their states where they lie, whatever the slots (and the kernel's
``chunked`` a chunk's state in its row, ``in_place``). A chunk's
``state_saves`` (tokens into it, a slot) cut it there: the state after those tokens is also
copied into that slot (the prefix cache's, recurrent_state.py; a speculative row's, after each
position), and the rest of the chunk goes on from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu_kernel import load_kernels


def kernel_serves(op_backend: str, device) -> bool:
    """Whether decode rows take the C++ kernel's steps on the states in their slots for an op
    backend on ``device``: "cpp" or "auto" on the CPU, the kernel built (else the torch ops on
    gathered states)."""
    if op_backend not in ("cpp", "auto") or torch.device(device).type != "cpu":
        return False
    return load_kernels() is not None


def over_sequences(batch, state: torch.Tensor, chunked: Callable, step: Callable, *rows: torch.Tensor,
                   in_slots: Callable | None = None, stepwise: int = 0, in_place: bool = False) -> torch.Tensor:
    """rows: tensors [T, ...] of the step's rows. A piece of a chunk (between its state saves) of
    at most ``stepwise`` tokens runs the step token by token (``in_slots``, on the state where it
    lies, where given) instead of ``chunked``, whose fixed cost (a whole padded chunk's matrices)
    is that of many steps: a speculative row's drafts, each position saved, a short prompt or a
    prompt's last few tokens. ``in_place``: ``chunked`` is given its sequence's state where it
    lies (a view of its row; the C++ kernel's, on a CPU), not a copy. Returns the outputs
    [T, ...], contiguous."""
    parts, slots, num_prefill_rows = [], batch.state_slots, batch.num_prefill_rows

    def piece(start: int, end: int, slot: torch.Tensor) -> None:
        """Rows [start, end) of one sequence, from its state in ``slot`` to the state after them."""
        if end - start <= stepwise and in_slots is not None:  # where the state lies
            parts.extend(in_slots(*(r[t : t + 1] for r in rows), state, slot) for t in range(start, end))
            return
        if in_place:
            parts.append(chunked(*(r[start:end] for r in rows), state[int(slot)]))
            return
        s = state[slot]  # [1, ...], a copy
        if end - start <= stepwise:
            parts.extend(step(*(r[t : t + 1] for r in rows), s) for t in range(start, end))
        else:
            parts.append(chunked(*(r[start:end] for r in rows), s[0]))
        state[slot] = s

    for i, seq in enumerate(batch.prefill):
        slot, start = slots[i : i + 1], seq.row_start
        for offset, target in (*seq.state_saves, (seq.num_tokens, None)):
            if seq.row_start + offset > start:
                piece(start, seq.row_start + offset, slot)
            if target is not None:
                state[target] = state[slot][0]
            start = seq.row_start + offset
    if num_prefill_rows < rows[0].shape[0]:
        if in_slots is not None:
            parts.append(in_slots(*(r[num_prefill_rows:] for r in rows), state, slots[len(batch.prefill) :]))
        elif batch.decode_state_run is not None:  # the states in place: no gather and scatter
            parts.append(step(*(r[num_prefill_rows:] for r in rows), state[batch.decode_state_run]))
        else:
            decoding = slots[len(batch.prefill) :]
            s = state[decoding]
            parts.append(step(*(r[num_prefill_rows:] for r in rows), s))
            state[decoding] = s
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)  # rows of unit stride, as linears read them
