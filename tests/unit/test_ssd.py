"""Mamba-2's selective state space ops (ops/ssd.py) against its definition, token by token in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.ops.ssd import chunked, cpp_chunked, cpp_step, discretize, ssd, step

from helpers import KERNEL, check_chunks_and_saves, check_step_in_slots, chunks_cut_by_saves, step_rows


def definition(x, dt, A, B, C, D, state):
    """x [L, H, P], dt [L, H], A, D [H], B, C [L, G, N], state [H, P, N]: (y [L, H, P], final state),
    per token: S <- exp(dt A) S + dt x B^T; y = S C + D x, head h reading group h // (H / G)."""
    heads, groups = x.shape[1], B.shape[1]
    g = torch.arange(heads) // (heads // groups)
    s, out = state.double().clone(), []
    for t in range(x.shape[0]):
        xt, dtt = x[t].double(), dt[t].double()
        s = s * (dtt * A.double()).exp()[:, None, None] + (dtt[:, None] * xt)[:, :, None] * B[t, g].double()[:, None, :]
        out.append(torch.einsum("hpn,hn->hp", s, C[t, g].double()) + D.double()[:, None] * xt)
    return torch.stack(out), s


def inputs(length, heads, groups, P, N, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, heads, P, generator=gen)
    dt = discretize(torch.randn(length, heads, generator=gen), torch.randn(heads, generator=gen) * 0.5, (0.0, float("inf")))
    A = -torch.rand(heads, generator=gen) * 2 - 0.1
    B, C = torch.randn(length, groups, N, generator=gen), torch.randn(length, groups, N, generator=gen)
    D = torch.randn(heads, generator=gen)
    return x, dt, A, B, C, D, torch.randn(heads, P, N, generator=gen) * 0.3


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 100), heads_groups=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       P=st.sampled_from([2, 4]), N=st.sampled_from([3, 8, 20]), chunk=st.sampled_from([4, 16, 64]),
       split=st.floats(0, 1), seed=st.integers(0, 1000))
def test_chunked_from_a_state_equals_the_definition_and_carries_its_state(kernel, length, heads_groups, P, N, chunk,
                                                                          split, seed):
    """Chunks of any size, a sequence cut in two calls anywhere; the C++ kernel's token after
    token, heads split among threads, its vector loop's remainder too."""
    x, dt, A, B, C, D, state = inputs(length, *heads_groups, P, N, seed)
    expected, final = definition(x, dt, A, B, C, D, state)
    cut, s = int(split * length), state.clone()
    run = cpp_chunked if kernel else lambda *a: chunked(*a, chunk)
    outs = [run(x[a:b], dt[a:b], A, B[a:b], C[a:b], D, s) for a, b in ((0, cut), (cut, length)) if b > a]
    torch.testing.assert_close(torch.cat(outs).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), final, rtol=1e-4, atol=1e-4)


def test_a_step_of_many_sequences_equals_the_definition_of_each():
    rows = [inputs(1, 4, 2, 4, 8, seed) for seed in range(5)]
    A, D = rows[0][2], rows[0][5]
    x, dt, B, C = (torch.cat([r[j] for r in rows]) for j in (0, 1, 3, 4))
    state = torch.stack([r[6] for r in rows])
    out = step(x, dt, A, B, C, D, state)
    for d, r in enumerate(rows):
        expected, final = definition(r[0], r[1], A, r[3], r[4], D, r[6])
        torch.testing.assert_close(out[d].double(), expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[d].double(), final, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), heads_groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 1)]),
       P=st.sampled_from([2, 4, 64]), N=st.sampled_from([3, 8, 128]), data=st.data())
def test_the_kernels_step_updates_each_rows_state_in_its_slot_as_the_definition(rows, heads_groups, P, N, data):
    """The C++ step on a bank of states, rows in any distinct slots: each row's output and its
    slot's new state as the definition's, every other slot untouched."""
    slots = data.draw(st.permutations(range(8)))[:rows]
    seqs = [inputs(1, *heads_groups, P, N, seed) for seed in range(rows)]
    A, D = seqs[0][2], seqs[0][5]
    x, dt, B, C = (torch.cat([r[j] for r in seqs]) for j in (0, 1, 3, 4))

    def row(d, state):
        expected, final = definition(*(seqs[d][j] for j in (0, 1)), A, *(seqs[d][j] for j in (3, 4)), D, state)
        return expected[0], final

    check_step_in_slots(lambda bank, s: cpp_step(x, dt, A, B, C, D, bank, s),
                        torch.randn(9, heads_groups[0], P, N) * 0.3, slots, row)


def test_discretize_is_softplus_of_the_biased_step_clamped():
    dt, bias = torch.tensor([[-3.0, 0.0, 4.0]]), torch.tensor([0.5, -1.0, 0.0])
    torch.testing.assert_close(discretize(dt, bias, (0.0, float("inf"))), F.softplus(dt + bias))
    torch.testing.assert_close(discretize(dt, bias, (0.1, 1.0)), F.softplus(dt + bias).clamp(0.1, 1.0))


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), data=st.data())
def test_chunks_cut_by_state_saves_equal_the_definition(kernel, lengths, data):
    """ssd over a step's prefill chunks, each cut by state saves anywhere: pieces of up to
    STEPWISE (5) tokens run the torch step token by token, longer ones chunked; the kernel runs
    each piece on the state in its slot. Each chunk's outputs, its final state and every saved
    state equal the definition's."""
    heads, groups, P, N = 4, 2, 2, 3
    chunks, saved = chunks_cut_by_saves(data, lengths)
    rows = [inputs(n, heads, groups, P, N, seed=i) for i, n in enumerate(lengths)]
    A, D = rows[0][2], rows[0][5]  # the layer's: one for every sequence
    x, dt, B, C = (torch.cat([r[j] for r in rows]) for j in (0, 1, 3, 4))
    state = torch.zeros(len(lengths) + len(saved) + 1, heads, P, N)
    state[: len(lengths)] = torch.stack([r[6] for r in rows])
    out = ssd(x, dt, A, B, C, D, step_rows(chunks, [], list(range(len(lengths)))), state, chunk=4,
              kernel=kernel)

    def defined(i, n):
        r = rows[i]
        return definition(r[0][:n], r[1][:n], A, r[3][:n], r[4][:n], D, r[6])

    check_chunks_and_saves(out, state, chunks, saved, defined, 1e-4)
