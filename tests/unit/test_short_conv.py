"""The short convolution over a flat batch (ops/short_conv.py) against the whole-sequence reference,
and the recurrent state slots (recurrent_state.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.ops.short_conv import cpp_conv_chunk, short_conv
from loramux.server.recurrent_state import RecurrentStates
from loramux.server.runner import _consecutive

from helpers import KERNEL, StepChunk, step_rows


def reference(u: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Hugging Face's causal_conv1d_fn over one whole sequence u [L, C]: zero padding on the left."""
    return F.conv1d(u.T[None], weight, bias, padding=weight.shape[-1] - 1, groups=u.shape[1])[0, :, : u.shape[0]].T


@pytest.mark.parametrize("kernel", [pytest.param(False, id="torch"), KERNEL])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), width=st.integers(1, 4), channels=st.integers(1, 5), biased=st.booleans(),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_chunked_prefill_then_decode_steps_equal_the_whole_sequence(kernel, data, width, channels, biased, lengths):
    """Sequences fed in steps, as the engine feeds them: a prompt in chunks of any size (a step's
    chunks first, then its decode rows of one token each), in slots taken in any order; a chunk may
    copy its state on the way into a cached slot (ops/recurrent.py), which then holds the
    sequence's last inputs before that point. Decode rows through the torch ops (on gathered
    states, or in place over consecutive slots) or the C++ kernel's step on the states in their
    slots, and the kernel's chunks on them too."""
    torch.manual_seed(len(lengths) * 31 + width)
    weight = torch.randn(channels, 1, width, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64) if biased else None
    inputs = [torch.randn(n, channels, dtype=torch.float64) for n in lengths]
    prompts = [data.draw(st.integers(1, n)) for n in lengths]
    states = RecurrentStates([((channels, width - 1), None)], slots=6, dtype=torch.float64, device="cpu", cached=3)
    saved = {}  # cached slot -> (sequence, tokens before the copy)
    states.states[0].normal_()  # stale values from earlier sequences: take() must clear them
    slots = [states.take() for _ in data.draw(st.permutations(range(len(lengths))))]
    done, outputs = [0] * len(lengths), [torch.empty(n, channels, dtype=torch.float64) for n in lengths]
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        live = [s for s in range(len(lengths)) if done[s] < lengths[s]]
        fed = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        prefill = [s for s in fed if done[s] < prompts[s]]
        decode = [s for s in fed if done[s] >= prompts[s]]
        chunks, feeds = [], []
        for s in prefill:
            n = data.draw(st.integers(1, prompts[s] - done[s]))
            offsets = sorted(set(data.draw(st.lists(st.integers(1, n), max_size=2))))
            saves = tuple((o, data.draw(st.sampled_from(states.cached_slots))) for o in offsets)
            saved.update((slot, (s, done[s] + o)) for o, slot in saves)
            chunks.append(StepChunk(len(feeds), n, saves))
            feeds += [(s, done[s] + j) for j in range(n)]
        for s in decode:
            feeds.append((s, done[s]))
        u = torch.stack([inputs[s][t] for s, t in feeds])
        y = short_conv(u, step_rows(chunks, [slots[s] for s in decode], [slots[s] for s in prefill]), states.states[0],
                       weight, bias, kernel)
        for row, (s, t) in enumerate(feeds):
            outputs[s][t] = y[row]
        for s, t in feeds:
            done[s] = max(done[s], t + 1)
    for s, u in enumerate(inputs):
        torch.testing.assert_close(outputs[s], reference(u, weight, bias), rtol=1e-12, atol=1e-12)
    for slot, (s, t) in saved.items():  # the K - 1 inputs before t, zeros before the first
        window = torch.cat((torch.zeros(width - 1, channels, dtype=torch.float64), inputs[s][:t]))[t:].T
        assert torch.equal(states.states[0][slot], window), (slot, s, t)


@pytest.mark.skipif(load_kernels() is None, reason="the C++ kernel is not built")
@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 20), width=st.integers(1, 4), split=st.floats(0, 1), biased=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_kernels_chunk_from_a_state_equals_the_whole_sequence(length, width, split, biased, dtype):
    """The C++ chunk on a state of earlier inputs, a sequence cut in two calls anywhere (shorter
    than the state, too), 600 channels split among threads; float32, and bfloat16 summed in
    float32 and rounded once."""
    torch.manual_seed(length * 7 + width)
    channels, W = 600, width - 1
    full = torch.randn(W + length, channels).to(dtype)  # the state's W inputs, then the chunk's
    weight = torch.randn(channels, 1, width).to(dtype)
    bias = torch.randn(channels).to(dtype) if biased else None
    expected = reference(full.float(), weight.float(), None if bias is None else bias.float())[W:].to(dtype)
    state, cut = full[:W].T.contiguous(), int(split * length)
    u = full[W:]
    got = torch.cat([cpp_conv_chunk(u[a:b], state, weight, bias) for a, b in ((0, cut), (cut, length)) if b > a])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(state, full[full.shape[0] - W :].T)


def test_state_slots_are_taken_zeroed_given_back_once_and_bounded():
    specs = [((3, 2), None), ((4, 5, 6), torch.float64)]
    states = RecurrentStates(specs, slots=2, dtype=torch.float32, device="cpu")
    assert RecurrentStates.bytes_for(specs, 2, torch.float32) == sum(s.numel() * s.element_size() for s in states.states)
    assert states.sink == 2 and states.num_free == 2
    assert [(s.shape, s.dtype) for s in states.states] == [((3, 3, 2), torch.float32), ((3, 4, 5, 6), torch.float64)]
    a = states.take()
    for s in states.states:
        s[a].fill_(1.0)
    b = states.take()
    with pytest.raises(RuntimeError, match="no recurrent state slot is free"):
        states.take()
    states.free(a)
    with pytest.raises(ValueError, match=f"slot {a} is not held"):
        states.free(a)
    with pytest.raises(ValueError, match="slot 2 is not held"):
        states.free(states.sink)
    assert states.take() == a and all(not s[a].any() for s in states.states)
    states.free(a)
    states.free(b)
    assert states.num_free == 2


def test_decode_rows_over_consecutive_slots_update_the_states_in_place_as_gathered_ones_do():
    """Decode rows whose slots run consecutively upward use the states in place (no gather and
    scatter, ops/recurrent.py); in another order they are gathered: the same outputs and states."""
    torch.manual_seed(4)
    weight, u = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    start = torch.randn(6, 3, 3, dtype=torch.float64)
    outs, states = [], []
    for order in ([2, 3, 4], [4, 2, 3]):
        state = start.clone()
        rows = u[[o - 2 for o in order]]
        y = short_conv(rows, step_rows([], order, []), state, weight, None)
        outs.append(y[[order.index(o) for o in (2, 3, 4)]])
        states.append(state)
    assert _consecutive([2, 3, 4]) == slice(2, 5) and _consecutive([4, 2, 3]) is None
    assert torch.equal(outs[0], outs[1]) and torch.equal(states[0], states[1])
    assert not torch.equal(states[0][2:5], start[2:5]) and torch.equal(states[0][[0, 1, 5]], start[[0, 1, 5]])
