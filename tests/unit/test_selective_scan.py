"""Mamba's selective scan (ops/selective_scan.py) against its definition, token by token in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.ops.selective_scan import cpp_scan, cpp_step, discretize, scan, selective_scan, step

from helpers import KERNEL, check_chunks_and_saves, check_step_in_slots, chunks_cut_by_saves, step_rows


def definition(x, dt, A, B, C, D, state):
    """x, dt [L, D], A [D, N], B, C [L, N], D [D], state [D, N]: (y [L, D], final state), per token:
    h <- exp(dt A) * h + (dt x) B^T; y = h C + D x."""
    h, out = state.double().clone(), []
    for t in range(x.shape[0]):
        xt, dtt = x[t].double(), dt[t].double()
        h = (dtt[:, None] * A.double()).exp() * h + (dtt * xt)[:, None] * B[t].double()[None, :]
        out.append(h @ C[t].double() + D.double() * xt)
    return torch.stack(out), h


def inputs(length, channels, N, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, channels, generator=gen)
    dt = discretize(torch.randn(length, channels, generator=gen), torch.randn(channels, generator=gen) * 0.5)
    A = -torch.rand(channels, N, generator=gen) * 3 - 0.1
    B, C = torch.randn(length, N, generator=gen), torch.randn(length, N, generator=gen)
    return x, dt, A, B, C, torch.randn(channels, generator=gen), torch.randn(channels, N, generator=gen) * 0.3


KERNEL_SCAN = pytest.param(cpp_scan, id="cpp", marks=pytest.mark.skipif(load_kernels() is None,
                                                                      reason="the C++ kernel is not built"))


@pytest.mark.parametrize("run", [pytest.param(scan, id="torch"), KERNEL_SCAN])
@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 150), channels=st.sampled_from([1, 5, 12, 48]), N=st.sampled_from([2, 8, 16, 19]),
       split=st.floats(0, 1), seed=st.integers(0, 1000))
def test_a_scan_from_a_state_equals_the_definition_and_carries_its_state(run, length, channels, N, split, seed):
    """Past a chunk of decays (64 tokens), and a sequence cut in two calls anywhere; the C++ scan's
    state rows of any N (its vector loop's remainder too), channels split among threads."""
    x, dt, A, B, C, D, state = inputs(length, channels, N, seed)
    expected, final = definition(x, dt, A, B, C, D, state)
    cut, s = int(split * length), state.clone()
    outs = [run(x[a:b], dt[a:b], A, B[a:b], C[a:b], D, s) for a, b in ((0, cut), (cut, length)) if b > a]
    torch.testing.assert_close(torch.cat(outs).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), final, rtol=1e-5, atol=1e-5)


def test_a_step_of_many_sequences_is_each_ones_next_token_of_the_scan():
    """Decode rows in one step: each as the scan of its sequence's one more token from its state."""
    rows = [inputs(1, 6, 4, seed) for seed in range(5)]
    A, D = rows[0][2], rows[0][5]
    states = torch.stack([r[6] for r in rows])
    out = step(*(torch.cat([r[j] for r in rows]) for j in (0, 1)), A, *(torch.cat([r[j] for r in rows]) for j in (3, 4)),
               D, states)
    for d, (x, dt, _, B, C, _, state) in enumerate(rows):
        torch.testing.assert_close(out[d], scan(x, dt, A, B, C, D, state)[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(states[d], state, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), channels=st.sampled_from([1, 4, 12]), N=st.sampled_from([2, 8, 16]), data=st.data())
def test_the_kernels_step_updates_each_rows_state_in_its_slot_as_the_definition(rows, channels, N, data):
    """The C++ step on a bank of states, rows in any distinct slots: each row's output and its
    slot's new state as the definition's, every other slot untouched."""
    slots = data.draw(st.permutations(range(8)))[:rows]
    seqs = [inputs(1, channels, N, seed) for seed in range(rows)]
    A, D = seqs[0][2], seqs[0][5]
    x, dt, B, C = (torch.cat([r[j] for r in seqs]) for j in (0, 1, 3, 4))

    def row(d, state):
        expected, final = definition(*(seqs[d][j] for j in (0, 1)), A, *(seqs[d][j] for j in (3, 4)), D, state)
        return expected[0], final

    check_step_in_slots(lambda bank, s: cpp_step(x, dt, A, B, C, D, bank, s), torch.randn(9, channels, N) * 0.3,
                        slots, row)


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), data=st.data())
def test_chunks_cut_by_state_saves_equal_the_definition(kernel, lengths, data):
    """selective_scan over a step's prefill chunks, each cut by state saves anywhere (the kernel's
    scan on the state in its slot, the torch scan on a copy). Each chunk's outputs, its final
    state and every saved state equal the definition's."""
    channels, N = 5, 4
    chunks, saved = chunks_cut_by_saves(data, lengths)
    rows = [inputs(n, channels, N, seed=i) for i, n in enumerate(lengths)]
    A, D = rows[0][2], rows[0][5]  # the layer's: one for every sequence
    x, dt, B, C = (torch.cat([r[j] for r in rows]) for j in (0, 1, 3, 4))
    state = torch.zeros(len(lengths) + len(saved) + 1, channels, N)
    state[: len(lengths)] = torch.stack([r[6] for r in rows])
    out = selective_scan(x, dt, A, B, C, D, step_rows(chunks, [], list(range(len(lengths)))), state, kernel)

    def defined(i, n):
        r = rows[i]
        return definition(r[0][:n], r[1][:n], A, r[3][:n], r[4][:n], D, r[6])

    check_chunks_and_saves(out, state, chunks, saved, defined, 1e-5)


def test_discretize_is_softplus_of_the_biased_step_in_float32():
    dt, bias = torch.tensor([[-3.0, 0.0, 4.0]], dtype=torch.bfloat16), torch.tensor([0.5, -1.0, 0.0])
    got = discretize(dt, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.softplus(dt.float() + bias))
