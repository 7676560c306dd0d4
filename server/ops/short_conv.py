"""A depthwise causal convolution over time, per sequence of a flat batch, from each sequence's state.

For each sequence, channel c and its token t (K the kernel's width):
    y[t, c] = bias[c] + sum_{j < K} w[c, 0, j] * u[t - (K - 1) + j, c]
where the inputs before the sequence's current tokens are its state's last K - 1 (zeros before its
first token: the state is zeroed when its slot is taken, recurrent_state.py). This is Hugging
Face's ``causal_conv1d_fn`` over a whole prompt (zero padding on the left) and its
``causal_conv1d_update`` a token at a time, so a prompt split into chunks, then decoded, gives the
same outputs. LFM2's short convolutions run it, and Mamba's, Mamba-2's and gated DeltaNet's
before their scans. ``cpp_conv_step`` and ``cpp_conv_chunk`` run the decode rows and a prompt's
chunks in the C++ kernel on their states where they lie.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .cpu_kernel import load_kernels
from .recurrent import over_sequences


def conv_chunk(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One sequence's next inputs u [n, C] from its state [C, K - 1], updated in place to its last
    K - 1 inputs; weight [C, 1, K], bias [C] or None. Returns y [n, C]."""
    window = torch.cat((state, u.T), dim=1)[None]  # [1, C, K - 1 + n]
    state.copy_(window[0, :, window.shape[2] - state.shape[1] :])
    return F.conv1d(window, weight, bias, groups=u.shape[1])[0].T


def conv_step(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One input each of R sequences, u [R, C], from their states [R, C, K - 1], updated in place.
    Returns y [R, C]."""
    window = torch.cat((state, u[:, :, None]), dim=2)  # [R, C, K]
    state.copy_(window[:, :, 1:])
    return F.conv1d(window, weight, bias, groups=u.shape[1])[:, :, 0]


def cpp_conv_step(u: torch.Tensor, state: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_step`` in the C++ kernel, each row's state shifted in its slot: row r's is
    ``state[slots[r]]`` (state [slots, C, K - 1], slots int64 [R], distinct). Returns y [R, C]."""
    u = u.contiguous()
    y = torch.empty_like(u)
    load_kernels().short_conv_step(y, u, state, slots, weight.contiguous(),
                                   u.new_empty(0) if bias is None else bias.contiguous())
    return y


def cpp_conv_chunk(u: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_chunk`` in the C++ kernel: one sequence's inputs u [n, C] from its state [C, K - 1]
    where it lies (contiguous), updated in place, with no concatenated copy. Returns y [n, C]."""
    u = u.contiguous()
    y = torch.empty_like(u)
    load_kernels().short_conv_chunk(y, u, state, weight.contiguous(), u.new_empty(0) if bias is None else bias.contiguous())
    return y


# with the kernel, a single input (a speculative row's position) takes its step on the state in its
# slot rather than a chunk on a view of it
KERNEL_STEPWISE = 1


def short_conv(u: torch.Tensor, batch, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               kernel: bool = False) -> torch.Tensor:
    """u: [T, C] a step's inputs (``batch``'s prefill chunks and decode rows), each sequence's
    state's row in ``state`` [slots + 1, C, K - 1] (ops/recurrent.py); weight [C, 1, K]; bias [C]
    or None; ``kernel``: the prefill chunks through ``cpp_conv_chunk`` and the decode rows through
    ``cpp_conv_step``, on the states where they lie. Returns y [T, C]."""
    return over_sequences(batch, state, partial(cpp_conv_chunk if kernel else conv_chunk, weight=weight, bias=bias),
                          partial(conv_step, weight=weight, bias=bias), u,
                          in_slots=partial(cpp_conv_step, weight=weight, bias=bias) if kernel else None,
                          stepwise=KERNEL_STEPWISE if kernel else 0, in_place=kernel)
