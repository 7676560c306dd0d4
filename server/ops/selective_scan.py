"""Mamba's selective scan (Gu and Dao, 2023), as Mamba, Falcon Mamba and Jamba's Mamba layers run it.

Per channel c of D (a state row of N dims each), each token t with input x_t [D], step dt_t [D]
(softplus of the projection plus its bias), A [D, N] (= -exp(A_log)) and the token's B_t, C_t [N]:
    h <- exp(dt_t A) * h + (dt_t x_t) B_t^T        (h [D, N])
    y_t = h C_t + D_skip x_t
``step`` runs one token of many sequences at once (decode rows), and ``cpp_step`` the same in the
C++ kernel on the states where they lie; ``scan`` one sequence's tokens in
order, as Hugging Face's ``mamba_selective_scan`` computes a prompt without mamba_ssm's kernel
(decays of [tokens, D, N] made a chunk of tokens at a time, to bound their memory), and
``cpp_scan`` the same in the C++ kernel. All in float32; the state too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import load_kernels
from .recurrent import over_sequences

CHUNK = 64  # tokens whose decays are made at once


def discretize(dt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """dt [.., D] from the step projection -> the step, float32: softplus(dt + bias)."""
    return F.softplus(dt.float() + bias.float())


def step(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """One token of each of R sequences: x and dt [R, D], A [D, N] (float32), B and C [R, N], D
    [D]; state [R, D, N] float32, updated in place. Returns y [R, D] float32."""
    x = x.float()
    state.mul_(torch.exp(dt[..., None] * A))
    state.add_((dt * x)[..., None] * B.float()[:, None, :])
    return (state @ C.float()[..., None])[..., 0] + D.float() * x


def cpp_step(x, dt, A, B, C, D, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``step`` in the C++ kernel, each row's state updated in its slot: row r's is
    ``state[slots[r]]`` (state [slots, D, N] float32, slots int64 [R], distinct), read and written
    once. Returns y [R, D] float32."""
    x = x.float().contiguous()
    y = torch.empty_like(x)
    load_kernels().selective_scan_step(y, x, dt.contiguous(), A.contiguous(), B.float().contiguous(),
                                       C.float().contiguous(), D.float().contiguous(), state, slots)
    return y


def cpp_scan(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """``scan`` in the C++ kernel, token after token with each channel's state row kept in cache
    (the torch loop pays a few ops of Python a token): state [D, N] float32, contiguous, updated
    in place. Returns y [L, D] float32."""
    x = x.float().contiguous()
    y = torch.empty_like(x)
    load_kernels().selective_scan_chunk(y, x, dt.contiguous(), A.contiguous(), B.float().contiguous(),
                                        C.float().contiguous(), D.float().contiguous(), state)
    return y


def scan(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """One sequence's tokens: x and dt [L, D], A [D, N] (float32), B and C [L, N], D [D]; state
    [D, N] float32, updated in place to the state after the last token. Returns y [L, D] float32."""
    x, B, C = x.float(), B.float(), C.float()
    out = torch.empty_like(x)
    h = state
    for start in range(0, x.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        decay = torch.exp(dt[rows, :, None] * A)  # [n, D, N]
        write = (dt[rows] * x[rows])[..., None] * B[rows, None, :]
        for t in range(decay.shape[0]):
            h = decay[t] * h + write[t]
            out[start + t] = h @ C[start + t]
    state.copy_(h)
    return out + D.float() * x


def selective_scan(x, dt, A, B, C, D, batch, state: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """The scan over a step's rows (``batch``, ops/recurrent.py): x and dt [T, D] (``discretize``d),
    A [D, N] (float32), B and C [T, N], D [D]; each sequence's state's row in ``state``
    [slots + 1, D, N]. Each prefill chunk runs ``scan`` from its sequence's state, the decode rows
    one ``step``, or where ``kernel`` ``cpp_scan`` and ``cpp_step``. Returns y [T, D] float32."""
    chunked = cpp_scan if kernel else scan
    return over_sequences(batch, state, lambda x, dt, B, C, s: chunked(x, dt, A, B, C, D, s),
                          lambda x, dt, B, C, s: step(x, dt, A, B, C, D, s), x, dt, B, C,
                          in_slots=(lambda x, dt, B, C, s, slots: cpp_step(x, dt, A, B, C, D, s, slots))
                          if kernel else None, in_place=kernel)
