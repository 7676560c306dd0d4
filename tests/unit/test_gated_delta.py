"""The gated delta rule's ops (ops/gated_delta.py) against its definition, token by token in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.ops.gated_delta import chunked, prepare, recurrent_step


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


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), length=st.integers(1, 150), dk=st.sampled_from([4, 8, 16]), dv=st.sampled_from([4, 8]),
       chunk=st.sampled_from([4, 16, 64]), split=st.floats(0, 1), seed=st.integers(0, 1000))
def test_chunked_from_a_state_equals_the_definition_and_carries_its_state(heads, length, dk, dv, chunk, split, seed):
    """Chunks of any size, a sequence cut in two calls anywhere (a prompt over two steps)."""
    q, k, v, g, beta, state = inputs(heads, length, dk, dv, seed)
    expected, final = definition(q, k, v, g, beta, state)
    cut = int(split * length)
    s = state.clone()
    rows = [x.transpose(0, 1) for x in (q, k, v, g, beta)]  # [L, H, ..]
    outs = [chunked(*(x[a:b] for x in rows), s, chunk) for a, b in ((0, cut), (cut, length)) if b > a]
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
