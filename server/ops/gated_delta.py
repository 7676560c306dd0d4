"""The gated delta rule (Gated DeltaNet: Yang et al., 2024), Qwen3.5's and Qwen3-Next's linear attention.

Per head, a state S [dk, dv] that each token t (query q_t and key k_t [dk], both L2-normed, q_t
also scaled by dk^-1/2; value v_t [dv]; decay g_t <= 0 in log space; write strength beta_t in
(0, 1)) updates and reads as:
    S <- exp(g_t) S
    S <- S + k_t^T (beta_t (v_t - k_t S))        (the delta rule: write the part S does not predict)
    o_t = q_t S
``recurrent_step`` runs one token of many sequences at once (decode rows), and ``cpp_recurrent_step``
the same in the C++ kernel on the states where they lie; ``chunked`` runs a
sequence's tokens in chunks of C, each chunk's updates solved at once by the UT transform and the
state carried between chunks, as Hugging Face's ``torch_chunk_gated_delta_rule`` (and FLA's
kernel) compute a prompt. All in float32; the state too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import load_kernels
from .recurrent import over_sequences


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim, as FLA's (and Hugging Face's) l2norm with eps 1e-6 under the root."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def prepare(q: torch.Tensor, k: torch.Tensor, value_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [.., key heads, dk] -> float32 [.., value heads, dk]: each key head serving value_heads /
    key heads consecutive value heads, L2-normed, q scaled by dk^-1/2."""
    repeat = value_heads // q.shape[-2]
    if repeat > 1:
        q, k = q.repeat_interleave(repeat, dim=-2), k.repeat_interleave(repeat, dim=-2)
    q, k = l2norm(q.float()), l2norm(k.float())
    return q * q.shape[-1] ** -0.5, k


def recurrent_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token of each of D sequences: q, k [D, H, dk] (``prepare``d), v [D, H, dv], g and beta
    [D, H] (float32); state [D, H, dk, dv] float32, updated in place. Returns o [D, H, dv] float32."""
    state.mul_(g.exp()[..., None, None])
    delta = (v.float() - (state * k[..., None]).sum(-2)) * beta[..., None]
    state.add_(k[..., None] * delta[..., None, :])
    return (state * q[..., None]).sum(-2)


def cpp_recurrent_step(q, k, v, g, beta, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``recurrent_step`` in the C++ kernel, each row's state updated in its slot: row d's is
    ``state[slots[d]]`` (state [slots, H, dk, dv] float32, slots int64 [D], distinct), read and
    written once, with no gathered copy. Returns o [D, H, dv] float32."""
    out = q.new_empty(v.shape)
    load_kernels().gated_delta_step(out, q.contiguous(), k.contiguous(), v.float().contiguous(), g.contiguous(),
                                    beta.contiguous(), state, slots)
    return out


def cpp_chunked(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """``chunked`` in the C++ kernel: the step's recurrence token after token, each head's state
    kept in cache (the chunked form's matrices cost a padded chunk whatever its length: 1.1 ms
    for one token against 0.02 here, 11 ms for 512 against 2.4, 8 heads of 64 x 64, two cores);
    state [H, dk, dv] float32, contiguous, updated in place. Returns o [L, H, dv] float32."""
    out = q.new_empty(v.shape)
    load_kernels().gated_delta_chunk(out, q.contiguous(), k.contiguous(), v.float().contiguous(), g.contiguous(),
                                     beta.contiguous(), state)
    return out


# pieces of a chunk this short run the torch step token by token: a chunk of 64 costs about as
# much whatever its length, 12 steps (8 heads of 64 x 64, one core: 0.9-1.4 ms against 0.12 ms a
# step). With the kernel, a single token (a speculative row's position) takes its step on the state
# in its slot, a few microseconds less than its chunk on a view of it.
STEPWISE, KERNEL_STEPWISE = 8, 1


def chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The tokens of one sequence: q, k [L, H, dk] (``prepare``d), v [L, H, dv], g and beta [L, H]
    (float32); state [H, dk, dv] float32, updated in place to the state after the last token.
    Returns o [L, H, dv] float32."""
    length = q.shape[0]
    pad = -length % chunk
    q, k, v = (F.pad(x.float().transpose(0, 1), (0, 0, 0, pad)).unflatten(1, (-1, chunk)) for x in (q, k, v))  # [H, N, C, d]
    g, beta = (F.pad(x.T, (0, pad)).unflatten(1, (-1, chunk)) for x in (g, beta))  # [H, N, C]
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    decay = g.cumsum(-1)  # log of the decay from the chunk's start through each position
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pair = (decay[..., :, None] - decay[..., None, :]).masked_fill(future, float("-inf")).exp()  # [H, N, C, C]
    # (I + strictly lower part of A) X = B: each position's write, given the chunk's earlier ones
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(ut, k_beta * decay.exp()[..., None], upper=False, unitriangular=True)
    inner = (q @ k.transpose(-1, -2)) * pair  # attention within the chunk
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [H, N, 1, 1]
    out = torch.empty_like(v)
    s = state
    for i in range(q.shape[1]):
        new = values[:, i] - reads[:, i] @ s
        out[:, i] = q[:, i] @ s + inner[:, i] @ new
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ new
    state.copy_(s)
    return out.flatten(1, 2)[:, :length].transpose(0, 1)


def gated_delta(q, k, v, g, beta, batch, state: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """The rule over a step's rows (``batch``, ops/recurrent.py): q, k [T, H, dk] (``prepare``d), v [T, H, dv],
    g and beta [T, H] float32; each sequence's state's row in ``state`` [slots + 1, H, dk, dv].
    Each prefill chunk runs ``chunked`` from its sequence's state, the decode rows one ``recurrent_step``,
    or where ``kernel`` ``cpp_chunked`` and ``cpp_recurrent_step``. Returns o [T, H, dv] float32."""
    return over_sequences(batch, state, cpp_chunked if kernel else chunked, recurrent_step, q, k, v, g, beta,
                          in_slots=cpp_recurrent_step if kernel else None,
                          stepwise=KERNEL_STEPWISE if kernel else STEPWISE, in_place=kernel)
