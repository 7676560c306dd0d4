"""Sampling filters match Hugging Face's logits processors."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.server.requests import GREEDY_TEMPERATURE, SamplingParams
from loramux.server.sampling import (
    NonFiniteLogits,
    SamplerState,
    allowed_mask,
    apply_logit_bias,
    apply_occurrence_penalties,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_p,
    greedy_tokens,
    sample,
    top_k_candidates,
)

F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).smallest_normal)


def top_k_top_p(logits, ks, ps):
    """The serving filters on [M, V]: top-k candidates (rows with 0 < k < V), then top-p; scattered
    back over the vocabulary with -inf for every token they drop."""
    vocab = logits.shape[1]
    out = torch.full_like(logits, float("-inf"))
    for i, k in enumerate(ks):  # the harness loops; the filters are batched
        if not 0 < k < vocab:
            out[i] = filter_top_p(logits[i : i + 1], [ps[i]])[0]
    rows = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if rows:
        values, ids = top_k_candidates(logits[rows], [ks[i] for i in rows])
        kept = filter_top_p(values, [ps[i] for i in rows])
        out[rows] = out[rows].scatter(-1, ids, kept)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), top_k=st.integers(0, 40), top_p=st.floats(0.05, 1.0))
def test_top_k_top_p_match_hf(seed, top_k, top_p):
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = top_k_top_p(logits, [top_k], [top_p])
    assert torch.equal(torch.isinf(ours[0]), torch.isinf(ref[0]))


def test_repetition_penalty_matches_hf():
    logits = torch.randn(1, 50)
    seen = torch.tensor([1, 4, 4, 9, 30])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits[0], seen, 1.3), ref[0])


def test_greedy_rows_are_argmax_and_seeded_rows_reproduce():
    logits = torch.randn(3, 20)
    greedy = SamplerState.create(SamplingParams(5), "cpu")
    seeded = lambda: SamplerState.create(SamplingParams(5, temperature=1.0, seed=7), "cpu")  # noqa: E731
    first = sample(logits, [greedy, seeded(), greedy], [None] * 3)
    second = sample(logits, [greedy, seeded(), greedy], [None] * 3)
    assert first[0] == int(logits[0].argmax()) and first[2] == int(logits[2].argmax())
    assert first[1] == second[1]


def reference_adjustments(row: torch.Tensor, params: SamplingParams, seen: list[int], generated: list[int]):
    """One row, one token at a time, in vLLM's order: biases, HF's repetition penalty, then
    OpenAI's presence and frequency penalties."""
    row = row.clone()
    for token, bias in params.logit_bias:
        row[token] += bias
    if seen and params.repetition_penalty != 1.0:
        row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([seen]), row[None])[0]
    for token in set(generated):
        row[token] -= params.frequency_penalty * generated.count(token) + params.presence_penalty
    return row


occurrence = st.floats(-2.0, 2.0, width=32)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(1, 5), vocab=st.integers(2, 50))
def test_batched_biases_and_penalties_match_the_row_by_row_reference(data, rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))) * 4
    tokens = st.integers(0, vocab - 1)
    params, seen, generated = [], [], []
    for _ in range(rows):
        params.append(SamplingParams(
            8, repetition_penalty=data.draw(st.sampled_from([1.0, 1.3, 0.7])), presence_penalty=data.draw(occurrence),
            frequency_penalty=data.draw(occurrence),
            logit_bias=tuple(data.draw(st.lists(st.tuples(tokens, st.floats(-100, 100, width=32)), max_size=4)))))
        generated.append(data.draw(st.lists(tokens, max_size=8)))
        seen.append(data.draw(st.lists(tokens, max_size=4)) + generated[-1])
    ours = logits.clone()
    apply_logit_bias(ours, [p.logit_bias for p in params])
    ours = apply_repetition_penalty(ours, torch.tensor([s + [s[0]] * (12 - len(s)) if s else [0] * 12 for s in seen]),
                                    torch.tensor([p.repetition_penalty if s else 1.0 for p, s in zip(params, seen, strict=True)]))
    apply_occurrence_penalties(ours, generated, [p.presence_penalty for p in params],
                               [p.frequency_penalty for p in params])
    for i in range(rows):
        ref = reference_adjustments(logits[i], params[i], seen[i], generated[i])
        assert torch.allclose(ours[i], ref, rtol=1e-6, atol=1e-5), (i, ours[i], ref)


def test_banned_tokens_are_never_picked_and_the_logits_stay_raw():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 2)
    greedy = SamplingParams(5)
    states = [SamplerState.create(greedy, "cpu"), SamplerState.create(greedy, "cpu")]
    assert sample(logits, states, [None] * 2, None, [[1], None]) == [3, 1]
    picks = {sample(logits[:1], [SamplerState.create(SamplingParams(5, temperature=5.0, seed=s), "cpu")], [None],
                    None, [[1, 3]])[0] for s in range(30)}
    assert picks == {0, 2}  # a hot temperature reaches every other token, never a banned one
    # a banned token that the repetition penalty also scores stays banned (its clamp lifts a -inf)
    tied = torch.full((1, 4), -F32_MAX)
    state = SamplerState.create(SamplingParams(5, repetition_penalty=1.5), "cpu")
    assert sample(tied, [state], [[0]], None, [[0]]) == [1]
    assert torch.equal(logits, torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 2))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), rows=st.integers(1, 6), vocab=st.integers(2, 40))
def test_a_structured_outputs_mask_is_kept_row_by_row(data, rows, vocab):
    """Rows with an allowed-token mask (a structured output's) pick only allowed tokens, greedy
    ones the best of them after biases and penalties; rows without one are untouched, and the
    logits stay raw."""
    seed = data.draw(st.integers(0, 1000))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    raw = logits.clone()
    allowed = [data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=vocab, max_size=vocab).filter(any)
                                   .map(torch.tensor))) for _ in range(rows)]
    params = [SamplingParams(5, temperature=data.draw(st.sampled_from([0.0, 0.7, 3.0])), seed=i,
                             logit_bias=((0, 2.0),) if data.draw(st.booleans()) else ()) for i in range(rows)]
    masks = [None if a is None else torch.where(a, 0.0, float("-inf")) for a in allowed]
    tokens = sample(logits, [SamplerState.create(p, "cpu") for p in params], [None] * rows, None, None, masks)
    assert torch.equal(logits, raw)
    alone = [sample(raw[i : i + 1].clone(), [SamplerState.create(p, "cpu")], [None], None, None, None)[0]
             for i, p in enumerate(params)]
    for i, (token, mask, p) in enumerate(zip(tokens, allowed, params, strict=True)):
        if mask is None:
            assert token == alone[i]  # a neighbour's mask changes nothing here
            continue
        assert mask[token]
        if p.greedy:
            biased = raw[i].clone()
            biased[[t for t, _ in p.logit_bias]] += 2.0
            assert token == int(biased.masked_fill(~mask, float("-inf")).argmax())


def test_greedy_rows_follow_logit_bias_and_penalties_but_not_their_neighbours():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    rows = [SamplingParams(5, logit_bias=((0, 5.0),)),  # a bias lifts token 0 over token 1
            SamplingParams(5, presence_penalty=1.5, frequency_penalty=0.5),  # generated 1 twice: 3 - 2.5 < 2
            SamplingParams(5)]
    states = [SamplerState.create(p, "cpu") for p in rows]
    assert sample(logits, states, [None] * 3, [None, [1, 1], [1, 1]]) == [0, 3, 1]
    # the logits themselves stay raw (the logprobs read them)
    assert torch.equal(logits, torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3))
    # penalised rows sample too: a -100 bias on every token but one leaves that one
    bias = tuple((t, -100.0) for t in range(4) if t != 2)
    state = SamplerState.create(SamplingParams(5, temperature=1.0, seed=3, logit_bias=bias), "cpu")
    assert {sample(logits[:1], [state], [None])[0] for _ in range(20)} == {2}


# Every value the validation accepts (server/engine.py): temperature in [0, 100], top_p in (0, 1],
# top_k in [0, 2^32 - 1], repetition_penalty in (0, inf), presence and frequency penalties in
# [-2, 2], biases in [-100, 100], over logits anywhere in float32's range.
extreme = st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False)
params = st.builds(
    lambda t, p, k, rp, seed, pp, fp, bias: SamplingParams(8, temperature=t, top_p=p, top_k=k, repetition_penalty=rp,
                                                         seed=seed, presence_penalty=pp, frequency_penalty=fp,
                                                         logit_bias=tuple(bias)),
    st.one_of(st.sampled_from([0.0, 1e-45, F32_TINY, 1e-6, GREEDY_TEMPERATURE, 100.0]),
              st.floats(0, 100, width=32)),
    st.one_of(st.sampled_from([1e-45, 1e-30, 0.5, 1.0]), st.floats(0, 1.0, width=32, exclude_min=True)),
    st.one_of(st.sampled_from([0, 1, 2**32 - 1]), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from([1e-45, 1e-38, 1.0, 1e38, F32_MAX]),
              st.floats(0, F32_MAX, width=32, exclude_min=True)),
    st.integers(0, 2**64 - 1),
    occurrence, occurrence,
    st.lists(st.tuples(st.integers(0, 0), st.sampled_from([-100.0, 100.0, 0.5])), max_size=2),  # token 0: any vocab
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4), vocab=st.integers(1, 40))
def test_sampler_returns_a_valid_token_for_every_row_and_extreme_value(data, rows, vocab):
    logits = torch.tensor(data.draw(st.lists(st.lists(extreme, min_size=vocab, max_size=vocab),
                                             min_size=rows, max_size=rows)), dtype=torch.float32)
    states = [SamplerState.create(data.draw(params), "cpu") for _ in range(rows)]
    seen = [data.draw(st.lists(st.integers(0, vocab - 1), max_size=6)) for _ in range(rows)]
    for token in sample(logits, states, seen, seen):
        assert isinstance(token, int) and 0 <= token < vocab, token


def test_a_non_finite_row_fails_alone():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    logits[2, 0] = float("inf")
    states = [SamplerState.create(SamplingParams(5, temperature=0.7, seed=1), "cpu") for _ in range(3)]
    out = sample(logits, states, [None] * 3)
    assert isinstance(out[0], int)
    assert isinstance(out[1], NonFiniteLogits) and isinstance(out[2], NonFiniteLogits)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_greedy_tokens_are_argmax_first_of_ties(rows, vocab, seed):
    """Few distinct values, so most rows tie at their maximum: the first maximal index wins."""
    logits = torch.randint(-2, 3, (rows, vocab), generator=torch.Generator().manual_seed(seed)).float()
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("greedy", [True, False])
def test_any_non_finite_value_fails_its_row_alone(bad, greedy):
    logits = torch.randn(4, 300)
    logits[2, 299] = bad  # the last column: a vector tail
    params = SamplingParams(5) if greedy else SamplingParams(5, temperature=0.7, seed=1)
    out = sample(logits, [SamplerState.create(params, "cpu") for _ in range(4)], [None] * 4)
    assert isinstance(out[2], NonFiniteLogits)
    assert all(isinstance(out[i], int) for i in (0, 1, 3))
    if greedy:
        assert [out[i] for i in (0, 1, 3)] == logits[[0, 1, 3]].argmax(-1).tolist()


def test_tiny_temperature_is_greedy_and_small_temperature_stays_finite():
    logits = torch.tensor([[1e30, 3e38, -3e38, 2.0]])
    for t in (1e-39, 1e-45, 0.0):
        assert sample(logits, [SamplerState.create(SamplingParams(5, temperature=t), "cpu")], [None]) == [1]
    # just above the greedy threshold, the division would overflow without the shift by the maximum
    state = SamplerState.create(SamplingParams(5, temperature=GREEDY_TEMPERATURE, seed=3), "cpu")
    assert sample(logits, [state], [None]) == [1]


def test_seeded_sampling_really_samples():
    """A sampler that always took the argmax would pass the reproducibility test above."""
    logits = torch.zeros(1, 50)
    picks = {sample(logits, [SamplerState.create(SamplingParams(5, temperature=1.0, seed=s), "cpu")], [None])[0]
             for s in range(20)}
    assert len(picks) > 5


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), ks=st.lists(st.integers(1, 63), min_size=1, max_size=5),
       ps=st.lists(st.floats(0.05, 1.0), min_size=5, max_size=5))
# a top_p near 1: 1 - p taken in float32 after rounding p (1.00136e-05) removed a token HF's 1e-5 keeps
@example(seed=25027, ks=[1, 1, 1, 45], ps=[1.0, 1.0, 1.0, 0.99999, 1.0])
def test_batched_filters_with_per_row_parameters_match_hf_row_by_row(seed, ks, ps):
    """One batched top-k and one batched top-p over rows of different parameters equal HF's
    warpers applied to each row with its own (p of 1 filters nothing)."""
    logits = torch.randn(len(ks), 64, generator=torch.Generator().manual_seed(seed)) * 3
    ps = ps[: len(ks)]
    values, ids = top_k_candidates(logits, ks)
    ours = torch.full_like(logits, float("-inf")).scatter(-1, ids, filter_top_p(values, ps))
    for i, (k, p) in enumerate(zip(ks, ps, strict=True)):
        ref = TopKLogitsWarper(k)(None, logits[i : i + 1].clone())
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref[0])), (k, p)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), ks=st.lists(st.integers(1, 64), min_size=1, max_size=5),
       ps=st.lists(st.floats(0.05, 1.0), min_size=5, max_size=5),
       mins=st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)), min_size=5, max_size=5))
def test_batched_min_p_after_top_k_and_top_p_matches_hf_row_by_row(seed, ks, ps, mins):
    """min-p, batched over rows of different parameters, after top-k and top-p (HF's order: the
    most likely token's probability is taken over what they kept) equals HF's warpers row by row
    (min_p 0 filters nothing; 1 keeps the most likely tokens alone)."""
    logits = torch.randn(len(ks), 64, generator=torch.Generator().manual_seed(seed)) * 3
    ps, mins = ps[: len(ks)], mins[: len(ks)]
    values, ids = top_k_candidates(logits, ks)
    kept = filter_min_p(filter_top_p(values, ps), mins)
    ours = torch.full_like(logits, float("-inf")).scatter(-1, ids, kept)
    for i, (k, p, m) in enumerate(zip(ks, ps, mins, strict=True)):
        ref = logits[i : i + 1].clone()
        if k < 64:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        if m > 0.0:
            ref = MinPLogitsWarper(m)(None, ref)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref[0])), (k, p, m)


def test_min_p_of_one_samples_the_most_likely_token():
    """A sampling row with min_p 1 keeps only the most likely token: it draws the argmax, with or
    without top-k, and a row beside it without min_p still samples."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    for top_k in (0, 40):
        rows = [SamplerState.create(SamplingParams(5, temperature=1.5, top_k=top_k, min_p=1.0, seed=s), "cpu")
                for s in range(12)]
        assert sample(logits[:1].expand(12, -1).clone(), rows, [None] * 12) == [int(logits[0].argmax())] * 12
    free = {sample(logits[:1].clone(), [SamplerState.create(SamplingParams(5, temperature=1.5, seed=s), "cpu")],
                   [None])[0] for s in range(12)}
    assert len(free) > 3


def test_allowed_mask_keeps_the_listed_tokens_and_a_ban_only_if_something_stays():
    def state(*allowed):
        return SamplerState(SamplingParams(5, allowed_token_ids=allowed))

    mask = allowed_mask(state(3, 7, 7, 9), None, 12)
    assert torch.isfinite(mask).nonzero().view(-1).tolist() == [3, 7, 9] and mask[3] == 0
    kept = state(3, 7, 9)
    assert torch.isfinite(allowed_mask(kept, [7, 11], 12)).nonzero().view(-1).tolist() == [3, 9]
    assert torch.isfinite(allowed_mask(kept, None, 12)).nonzero().view(-1).tolist() == [3, 7, 9]  # a ban copies
    assert torch.isfinite(allowed_mask(state(7), [7], 12)).nonzero().view(-1).tolist() == [7]  # the list wins


def test_batched_repetition_penalty_matches_hf_row_by_row():
    logits = torch.randn(3, 50)
    seen = [[1, 4, 4, 9, 30], [7], [2, 3]]
    penalty = [1.3, 0.5, 1.0]
    width = max(map(len, seen))
    padded = torch.tensor([s + [s[0]] * (width - len(s)) for s in seen])
    ours = apply_repetition_penalty(logits, padded, torch.tensor(penalty))
    for i in range(3):
        ref = RepetitionPenaltyLogitsProcessor(penalty[i])(torch.tensor([seen[i]]), logits[i : i + 1].clone())
        assert torch.allclose(ours[i], ref[0])


def test_a_seeded_row_draws_the_same_token_whatever_its_batch():
    """Each sampling row draws from its own generator: the rows around it, and its place in the
    batch, change nothing."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen)
    params = SamplingParams(5, temperature=1.3, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=11)
    seen = [3, 17, 17, 250]
    alone = sample(logits[2:3], [SamplerState.create(params, "cpu")], [seen])[0]
    others = [SamplerState.create(SamplingParams(5, temperature=0.8, seed=s), "cpu") for s in range(5)]
    batch = sample(logits, [others[0], others[1], SamplerState.create(params, "cpu"), others[2], others[3], others[4]],
                   [None, None, seen, None, None, None])
    assert batch[2] == alone
    assert sample(logits[1:3], [others[0], SamplerState.create(params, "cpu")], [[5], seen])[1] == alone


def _every_path(device):
    """sample()'s arguments exercising every path: greedy rows plain and penalised, top-k and full
    rows, the repetition, presence and frequency penalties, logit bias, banned tokens, structured
    output masks, rows of a smaller vocabulary, and a NaN row."""
    logits = torch.randn(10, 500, device=device)
    logits[5, 3] = float("nan")
    kinds = [dict(temperature=0), dict(temperature=0.7, top_k=5, top_p=0.8), dict(temperature=0, repetition_penalty=1.3),
             dict(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=0.9),
             dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((7, 2.0), (9, -1.0)))]
    states = [SamplerState.create(SamplingParams(5, seed=i, **kinds[i % len(kinds)]), device) for i in range(10)]
    mask = torch.zeros(490)
    mask[100:] = float("-inf")
    return dict(logits=logits, states=states, seen=[[1, 2, 3]] * 10, generated=[[2, 2, 4]] * 10,
                banned=[[0, 1]] + [None] * 9, masks=[None, mask] + [None] * 8, widths=[500] * 9 + [490])


def test_sampling_copies_host_data_to_the_device_only_asynchronously():
    """Nothing of size [rows, vocab] leaves the logits' device, and on a GPU the sampler waits for
    the device once, at its final copy of the ids and finite flags: every per-row parameter is built
    on the host and copied without blocking. A copy that blocks (``torch.tensor(..., device=d)``,
    ``.to(d)`` without ``non_blocking``, a device tensor indexed by a Python list) would wait there
    for the forward pass to finish before the host could queue the rest of the step."""
    from torch.overrides import TorchFunctionMode

    copies, blocking = [], []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item):
                copies.append((func.__name__, args[0].numel()))
            elif func is torch.tensor and "device" in kwargs:
                blocking.append("torch.tensor(..., device=)")
            elif func is torch.Tensor.to and not kwargs.get("non_blocking"):
                blocking.append("to() without non_blocking")
            elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                    isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
                blocking.append(f"{func.__name__} with a list")
            return func(*args, **kwargs)

    call = _every_path("cpu")
    with Watch():
        out = sample(call["logits"], call["states"], call["seen"], call["generated"], call["banned"], call["masks"],
                     call["widths"])
    assert isinstance(out[5], NonFiniteLogits) and all(isinstance(t, int) for i, t in enumerate(out) if i != 5)
    assert blocking == [] and copies == [("tolist", 2 * 10)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_a_gpu_synchronises_once():
    """The same on a GPU, by CUDA's own account: with synchronisation as an error, everything up to
    the final copy of the ids runs (``sample_rows``, then the finite flags)."""
    from loramux.server.sampling import sample_rows

    call = _every_path("cuda")
    logits = call["logits"].nan_to_num()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_rows(logits, call["states"], call["seen"], call["generated"], call["banned"], call["masks"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (10,) and tokens.device.type == "cuda"


def test_sampled_frequencies_follow_the_filtered_distribution():
    """Drawn tokens follow softmax(logits / T) restricted by top-k and top-p: 2000 seeded draws of
    each kind of row (top-k path and whole-vocabulary path), within 4 points of the exact
    probabilities (over 3 standard deviations), and never a token the filters removed."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()[None].repeat(2, 1)
    counts = {0: torch.zeros(6), 1: torch.zeros(6)}
    for seed in range(2000):
        states = [SamplerState.create(SamplingParams(5, temperature=1.0, top_k=4, seed=seed), "cpu"),
                  SamplerState.create(SamplingParams(5, temperature=1.0, top_p=0.85, seed=seed), "cpu")]
        for row, token in enumerate(sample(logits, states, [None, None])):
            counts[row][token] += 1
    top_k = probs[:4] / probs[:4].sum()  # top-k 4
    top_p = probs[:4] / probs[:4].sum()  # top-p 0.85: 0.4 + 0.25 + 0.15 + 0.1 is the least set reaching it
    assert counts[0][4:].sum() == 0 and counts[1][4:].sum() == 0
    assert (counts[0][:4] / 2000 - top_k).abs().max() < 0.04
    assert (counts[1][:4] / 2000 - top_p).abs().max() < 0.04
