"""Mamba-2's selective state space (SSD: Dao and Gu, 2024), as Granite 4.0's hybrid layers run it.

Per head h (H heads of P channels; B and C shared by the H / G heads of each of G groups, of N
state dims), each token t with input x_t [P], step dt_t = clamp(softplus(dt_raw + dt_bias)) and
A = -exp(A_log) updates a state S [P, N] and reads it:
    S <- exp(dt_t A) S + dt_t x_t B_t^T
    y_t = S C_t + D x_t
``step`` runs one token of many sequences at once (decode rows), and ``cpp_step`` the same in the
C++ kernel on the states where they lie; ``chunked`` a sequence's tokens,
within chunks of C as one masked matrix product (the state space dual of attention) and between
chunks through the state, as Hugging Face's ``mamba2_chunk_scan`` (and mamba_ssm's kernel)
compute a prompt. All in float32; the state too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import load_kernels
from .recurrent import over_sequences


def discretize(dt: torch.Tensor, dt_bias: torch.Tensor, limit: tuple[float, float]) -> torch.Tensor:
    """dt [.., H] from the projection -> the step, float32: clamp(softplus(dt + dt_bias))."""
    return F.softplus(dt + dt_bias.to(dt.dtype)).float().clamp(*limit)


def _heads(bc: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [.., G, N] -> [.., H, N], float32: head h reads group h // (H / G)."""
    return bc.float().repeat_interleave(heads // bc.shape[-2], dim=-2)


def step(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """One token of each of R sequences: x [R, H, P], dt [R, H] (``discretize``d), A and D [H], B
    and C [R, G, N]; state [R, H, P, N] float32, updated in place. Returns y [R, H, P] float32."""
    heads, x = x.shape[1], x.float()
    state.mul_((dt * A.float()).exp()[..., None, None])
    state.add_((dt[..., None] * x)[..., None] * _heads(B, heads)[:, :, None, :])
    return (state * _heads(C, heads)[:, :, None, :]).sum(-1) + D.float()[:, None] * x


def cpp_step(x, dt, A, B, C, D, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``step`` in the C++ kernel, each row's state updated in its slot: row r's is
    ``state[slots[r]]`` (state [slots, H, P, N] float32, slots int64 [R], distinct), read and
    written once. Returns y [R, H, P] float32."""
    x = x.float().contiguous()
    y = torch.empty_like(x)
    load_kernels().ssd_step(y, x, dt.contiguous(), A.float().contiguous(), B.float().contiguous(),
                            C.float().contiguous(), D.float().contiguous(), state, slots)
    return y


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [.., c] -> [.., c, c]: entry (i, j) = a_{j+1} + ... + a_i for j <= i (0 on the diagonal),
    -inf above it; summed along the chunk as Hugging Face's ``segment_sum`` sums them."""
    c = a.shape[-1]
    a = a[..., None].expand(*a.shape, c)
    a = a.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=a.device).tril(-1), 0).cumsum(-2)
    return a.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def chunked(x, dt, A, B, C, D, state: torch.Tensor, chunk: int) -> torch.Tensor:
    """The tokens of one sequence: x [L, H, P], dt [L, H] (``discretize``d), A and D [H], B and C
    [L, G, N]; state [H, P, N] float32, updated in place to the state after the last token.
    Returns y [L, H, P] float32."""
    length, heads = x.shape[:2]
    pad = -length % chunk
    x = x.float()
    xdt = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad)).unflatten(0, (-1, chunk))  # [n, c, H, P]
    a = F.pad(dt * A.float(), (0, 0, 0, pad)).unflatten(0, (-1, chunk)).permute(0, 2, 1)  # [n, H, c]
    B, C = (F.pad(_heads(t, heads), (0, 0, 0, 0, 0, pad)).unflatten(0, (-1, chunk)) for t in (B, C))  # [n, c, H, N]
    decay = a.cumsum(-1)  # [n, H, c]
    # within each chunk: y_l = sum over s <= l of (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
    scores = torch.einsum("nlhd,nshd->nhls", C, B) * _segment_sums(a).exp()
    y = torch.einsum("nhls,nshp->nlhp", scores, xdt)
    # what each chunk adds to the state, decayed to its end
    adds = torch.einsum("nlhd,nhl,nlhp->nhpd", B, (decay[..., -1:] - decay).exp(), xdt)
    s = state
    for i in range(xdt.shape[0]):  # the state at each chunk's start, read by the chunk's rows
        y[i] += torch.einsum("lhd,hpd,hl->lhp", C[i], s, decay[i].exp())
        s = s * decay[i, :, -1].exp()[:, None, None] + adds[i]
    state.copy_(s)
    return y.flatten(0, 1)[:length] + D.float()[:, None] * x


def cpp_chunked(x, dt, A, B, C, D, state: torch.Tensor) -> torch.Tensor:
    """``chunked`` in the C++ kernel: the step's recurrence token after token, each head's state
    kept in cache; state [H, P, N] float32, contiguous, updated in place. Returns y [L, H, P] float32."""
    x = x.float().contiguous()
    y = torch.empty_like(x)
    load_kernels().ssd_chunk(y, x, dt.contiguous(), A.float().contiguous(), B.float().contiguous(),
                             C.float().contiguous(), D.float().contiguous(), state)
    return y


# pieces of a chunk this short run the torch step token by token: a chunk costs 0.65-0.8 ms up to
# 64 tokens (8 heads of 64 x 64, one core) against 0.1-0.12 ms a step. With the kernel, a single
# token (a speculative row's position) takes its step on the state in its slot.
STEPWISE, KERNEL_STEPWISE = 5, 1


def ssd(x, dt, A, B, C, D, batch, state: torch.Tensor, chunk: int, kernel: bool = False) -> torch.Tensor:
    """The state space over a step's rows (``batch``, ops/recurrent.py): x [T, H, P], dt [T, H]
    (``discretize``d), A and D [H], B and C [T, G, N]; each sequence's state's row in ``state``
    [slots + 1, H, P, N]. Each prefill chunk runs ``chunked`` (chunks of ``chunk``) from its
    sequence's state, the decode rows one ``step``, or where ``kernel`` ``cpp_chunked`` and
    ``cpp_step``. Returns y [T, H, P] float32."""
    whole = (lambda x, dt, B, C, s: cpp_chunked(x, dt, A, B, C, D, s)) if kernel else \
        (lambda x, dt, B, C, s: chunked(x, dt, A, B, C, D, s, chunk))
    return over_sequences(batch, state, whole, lambda x, dt, B, C, s: step(x, dt, A, B, C, D, s), x, dt, B, C,
                          in_slots=(lambda x, dt, B, C, s, slots: cpp_step(x, dt, A, B, C, D, s, slots))
                          if kernel else None, stepwise=KERNEL_STEPWISE if kernel else STEPWISE, in_place=kernel)
