"""The gated delta rule's ops (ops/gated_delta.py) against its definition, token by token in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.ops.gated_delta import (
    chunked,
    cpp_chunked,
    cpp_recurrent_step,
    gated_delta,
    prepare,
    recurrent_step,
)

from helpers import (
    KERNEL,
    StepChunk,
    check_chunks_and_saves,
    check_step_in_slots,
    chunks_cut_by_saves,
    step_rows,
)


def definition(q, k, v, g, beta, state):
    """q, k [H, L, dk], v [H, L, dv], g, beta [H, L], state [H, dk, dv]: (o [H, L, dv], final state),
    per token: S <- exp(g) S; S <- S + k^T beta (v - k S); o = q S."""
    s, out = state.double().clone(), []
    for t in range(q.shape[1]):
        s = s * g[:, t, None, None].double().exp()
        kt = k[:, t].double()
        delta = (v[:, t].double() - torch.einsum("hk,hkv->hv", kt, s)) * beta[:, t, None].double()
        s = s + kt[:, :, None] * delta[:, None, :]
        out.append(torch.einsum("hk,hkv->hv", q[:, t].double(), s))
    return torch.stack(out, 1), s


def inputs(heads, length, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = prepare(torch.randn(length, heads, dk, generator=gen), torch.randn(length, heads, dk, generator=gen), heads)
    v = torch.randn(heads, length, dv, generator=gen)
    g = -torch.rand(heads, length, generator=gen) * 2  # decays in (e^-2, 1]
    beta = torch.rand(heads, length, generator=gen)
    state = torch.randn(heads, dk, dv, generator=gen) * 0.3
    return q.transpose(0, 1), k.transpose(0, 1), v, g, beta, state


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), length=st.integers(1, 150), dk=st.sampled_from([4, 8, 16]),
       dv=st.sampled_from([4, 8, 20, 64]), chunk=st.sampled_from([4, 16, 64]), split=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_chunked_from_a_state_equals_the_definition_and_carries_its_state(kernel, heads, length, dk, dv, chunk, split,
                                                                          seed):
    """Chunks of any size, a sequence cut in two calls anywhere (a prompt over two steps); the C++
    kernel's token after token, heads split among threads, its vector loops' remainders too."""
    q, k, v, g, beta, state = inputs(heads, length, dk, dv, seed)
    expected, final = definition(q, k, v, g, beta, state)
    cut = int(split * length)
    s = state.clone()
    rows = [x.transpose(0, 1) for x in (q, k, v, g, beta)]  # [L, H, ..]
    run = cpp_chunked if kernel else lambda *a: chunked(*a, chunk)
    outs = [run(*(x[a:b] for x in rows), s) for a, b in ((0, cut), (cut, length)) if b > a]
    torch.testing.assert_close(torch.cat(outs).transpose(0, 1).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), final, rtol=1e-4, atol=1e-4)


def test_a_recurrent_step_of_many_sequences_equals_the_definition_of_each():
    rows = [inputs(2, 1, 8, 4, seed) for seed in range(5)]
    q, k, v, g, beta = (torch.stack([r[j][:, 0] for r in rows]) for j in range(5))  # [D, H, ..]
    state = torch.stack([r[5] for r in rows])
    out = recurrent_step(q, k, v, g, beta, state)
    for d, r in enumerate(rows):
        expected, final = definition(*r)
        torch.testing.assert_close(out[d].double(), expected[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[d].double(), final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_heads, value_heads", [(1, 1), (2, 4)])
def test_prepare_normalises_scales_and_shares_key_heads(key_heads, value_heads):
    q, k = torch.randn(3, key_heads, 8), torch.randn(3, key_heads, 8)
    pq, pk = prepare(q, k, value_heads)
    assert pq.shape == pk.shape == (3, value_heads, 8) and pq.dtype == torch.float32
    torch.testing.assert_close(pk.norm(dim=-1), torch.ones(3, value_heads), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pq.norm(dim=-1), torch.full((3, value_heads), 8**-0.5), rtol=1e-5, atol=1e-5)
    share = value_heads // key_heads  # value head h reads key head h // share
    torch.testing.assert_close(pk[:, share - 1], k[:, 0] / k[:, 0].norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), heads=st.integers(1, 3), dk=st.sampled_from([4, 16, 64]), dv=st.sampled_from([4, 8, 64]),
       data=st.data())
def test_the_kernels_step_updates_each_rows_state_in_its_slot_as_the_definition(rows, heads, dk, dv, data):
    """The C++ step on a bank of states, rows in any distinct slots: each row's output and its
    slot's new state as the definition's, every other slot untouched."""
    slots = data.draw(st.permutations(range(8)))[:rows]
    seqs = [inputs(heads, 1, dk, dv, seed) for seed in range(rows)]
    q, k, v, g, beta = (torch.stack([r[j][:, 0] for r in seqs]) for j in range(5))  # [D, H, ..]

    def row(d, state):
        expected, final = definition(*seqs[d][:5], state)
        return expected[:, 0], final

    check_step_in_slots(lambda bank, s: cpp_recurrent_step(q, k, v, g, beta, bank, s),
                        torch.randn(9, heads, dk, dv) * 0.3, slots, row)


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
def test_a_steps_decode_rows_through_the_kernel_equal_the_torch_ops():
    """gated_delta over a step (a prefill chunk, then decode rows in slots out of order): the C++
    step's outputs and states equal the gathered torch step's."""
    torch.manual_seed(0)
    q, k = prepare(torch.randn(7, 2, 16), torch.randn(7, 2, 16), 4)
    v, g, beta = torch.randn(7, 4, 8), -torch.rand(7, 4), torch.rand(7, 4)
    decode = [5, 1, 3]
    batch = step_rows([StepChunk(0, 4, ())], decode, [0])
    start = torch.randn(7, 4, 16, 8) * 0.3
    runs = []
    for kernel in (False, True):
        state = start.clone()
        runs.append((gated_delta(q, k, v, g, beta, batch, state, kernel), state))
    (o_torch, s_torch), (o_cpp, s_cpp) = runs
    torch.testing.assert_close(o_cpp, o_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_cpp, s_torch, rtol=1e-5, atol=1e-6)
    assert not torch.equal(s_cpp[decode], start[decode]) and torch.equal(s_cpp[[2, 4, 6]], start[[2, 4, 6]])


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
@pytest.mark.parametrize("slots", [[1, 1], [0, 9]], ids=["shared", "out-of-range"])
def test_the_kernels_step_refuses_slots_shared_or_out_of_range(slots):
    """Two rows writing one state in place would race; a slot past the bank would write past it."""
    q = k = torch.zeros(2, 1, 4)
    v, g, beta = torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1)
    with pytest.raises(RuntimeError, match="slots distinct and in range"):
        cpp_recurrent_step(q, k, v, g, beta, torch.zeros(3, 1, 4, 4), torch.tensor(slots))


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), data=st.data())
def test_chunks_cut_by_state_saves_equal_the_definition(kernel, lengths, data):
    """gated_delta over a step's prefill chunks, each cut by state saves anywhere: pieces of up to
    STEPWISE (8) tokens run the torch step token by token, longer ones chunked; the kernel runs
    each piece on the state in its slot. Each chunk's outputs, its final state and every saved
    state (the state after that many of its tokens) equal the definition's."""
    heads, dk, dv = 2, 8, 4
    chunks, saved = chunks_cut_by_saves(data, lengths)
    rows = [inputs(heads, n, dk, dv, seed=i) for i, n in enumerate(lengths)]
    q, k, v, g, beta = (torch.cat([r[j] for r in rows], 1).transpose(0, 1) for j in range(5))
    state = torch.zeros(len(lengths) + len(saved) + 1, heads, dk, dv)
    state[: len(lengths)] = torch.stack([r[5] for r in rows])
    out = gated_delta(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
                      step_rows(chunks, [], list(range(len(lengths)))), state, kernel)

    def defined(i, n):
        expected, after = definition(*(x[:, :n] for x in rows[i][:5]), rows[i][5])
        return expected.transpose(0, 1), after

    check_chunks_and_saves(out, state, chunks, saved, defined, 1e-4)
