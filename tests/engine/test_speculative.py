"""Speculative decoding (--num-speculative-tokens): a decoding row feeds its drafts in the same
step and samples them in order, so its tokens are those of plain decoding. Greedy requests over
the adapters (LoRA, DoRA, LoRA on lm_head and the embedding) and the base model, joining a running
batch at staggered times, token for token against PEFT; seeded sampling with penalties, logprobs,
stop strings and structured outputs, event for event against the same requests without drafts;
a request's predicted output drafted from; and the KV blocks of rejected drafts given back.

Drafts come from two drafters: the engine's prompt lookup, and an oracle that knows each request's
tokens and gets every fifth one wrong, so that every step keeps some drafts and rejects one (a tiny
random model rarely repeats itself, which prompt lookup needs)."""

import asyncio
import json
import random

import pytest

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import EngineObserver
from loramux.server.ops.cpu_kernel import load_lora_kernel
from loramux.server.requests import GenerationRequest, OutputKind, SamplingParams, StructuredOutput

from helpers import build_adapter, peft_generate, pinned_base_linear
from test_parity import make_prompts, serve_recorded

MAX_NEW = 16


class OracleDrafter:
    """Drafts each request's known next tokens (``expected[request_id]``), with the token at every
    output position p where p % 5 == 3 replaced by another."""

    def __init__(self, expected: dict[str, list[int]], vocab: int):
        self.expected = expected
        self.vocab = vocab
        self.asked = []  # (tokens generated, k, max_new_tokens) of each call

    def propose(self, seq, k: int) -> list[int]:
        g = seq.num_generated
        self.asked.append((g, k, seq.sampler.params.max_new_tokens))
        out = self.expected[seq.request.request_id][g : g + k]
        return [(t + 1) % self.vocab if (g + j) % 5 == 3 else t for j, t in enumerate(out)]


def repetitive_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a short phrase, where prompt lookup finds n-grams to draft from."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))]
        prompts.append((phrase * 8)[: rng.randint(10, 40)])
    return prompts


def engine_for(tiny_llama, adapters, **overrides):
    config = ServerConfig(**{
        "model": str(tiny_llama), "dtype": "float32", "max_batch_size": 12, "max_tokens_per_step": 32,
        "max_model_len": 96, "default_max_new_tokens": MAX_NEW, "kv_block_size": 4,
        "max_device_adapters": len(adapters), "max_host_adapters": len(adapters),
        "adapters": tuple((n, str(p)) for n, p in adapters.items()), "num_speculative_tokens": 4,
        "base_linear": pinned_base_linear(overrides.get("op_backend", "auto")), **overrides})
    return build_engine(config).engine


class TokenGaps(EngineObserver):
    """Each token the observers see, as (request id, step, gap), steps counted as they end."""

    def __init__(self):
        self.steps, self.tokens = 0, []

    def step(self, stats) -> None:
        self.steps += 1

    def token(self, seq, gap_seconds) -> None:
        self.tokens.append((seq.request.request_id, self.steps, gap_seconds))

    def check_one_gap_a_step(self) -> None:
        """A request's gaps (loramux_inter_token_latency_seconds) come one a step, as vLLM counts
        them: on the first token of each step but its first, never on a kept draft's."""
        firsts: dict[str, int] = {}
        last_step: dict[str, int] = {}
        several = False
        for rid, step, gap in self.tokens:
            first_of_step = last_step.get(rid) != step
            several |= not first_of_step
            assert (gap is not None) == (first_of_step and rid in firsts), (rid, step, gap)
            firsts.setdefault(rid, step)
            last_step[rid] = step
        assert several  # some step gave a request more than one token


def check_released(engine) -> None:
    assert engine.counts() == (0, 0)
    engine.blocks.check()
    assert engine.blocks.num_held == 0
    assert not engine.adapters.pool.pinned()


def expected_from_peft(tiny_llama, adapters, requests):
    names = {name for name, _ in requests}
    out = {}
    for name in names:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        for i, tokens in zip(idx, peft_generate(tiny_llama, adapters.get(name), [requests[i][1] for i in idx],
                                                MAX_NEW, eos_token_id=None), strict=True):
            out[i] = tokens
    return out


@pytest.fixture(scope="module")
def more_adapters(tiny_llama, tiny_adapters, tmp_path_factory):
    """The shared adapters, a DoRA one and one with LoRA on lm_head and the embedding too."""
    root = tmp_path_factory.mktemp("spec-adapters")
    return {**tiny_adapters,
            "dora-qv": build_adapter(tiny_llama, root / "dora-qv", seed=21, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"], use_dora=True),
            "head-emb": build_adapter(tiny_llama, root / "head-emb", seed=22, r=4, lora_alpha=8,
                                      target_modules=["lm_head", "embed_tokens", "o_proj"])}


# cpp: the C++ kernel, the KV pool roomy; torch: the torch ops, with a KV pool of 28 blocks of 4 tokens
# for a batch of up to 12 requests of up to 56 tokens, so drafts are cut to the blocks a row holds and
# rows are preempted
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_staggered_drafts_kept_and_rejected_match_peft_token_for_token(backend, tiny_llama, more_adapters):
    if backend == "cpp" and load_lora_kernel() is None:
        pytest.skip("the C++ kernel needs a compiler")
    names = [None, *more_adapters]
    prompts = make_prompts(384, 30, seed=3)
    requests = [(names[i % len(names)], prompts[i]) for i in range(30)]
    expected = expected_from_peft(tiny_llama, more_adapters, requests)
    tight = {"kv_cache_tokens": 112} if backend == "torch" else {}
    engine = engine_for(tiny_llama, more_adapters, op_backend=backend, enable_dora=True, enable_lm_head_lora=True,
                        enable_embedding_lora=True, **tight)
    engine.drafter = OracleDrafter({f"r{i}": t for i, t in expected.items()}, engine.vocab_size)
    gaps = TokenGaps()
    engine.observers.append(gaps)
    outs, steps = serve_recorded(engine, requests)
    gaps.check_one_gap_a_step()
    for i in range(len(requests)):
        assert outs[i] == expected[i], f"request {i} adapter {requests[i][0]}: {outs[i]} != {expected[i]}"
    # drafts were kept (a step gave a row several tokens) and rejected, next to prefill chunks
    assert 0 < engine.accepted_tokens < engine.draft_tokens
    assert engine.accepted_tokens >= 30 * 4
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps)
    if tight:
        assert engine.num_preemptions > 0
    check_released(engine)


def test_prompt_lookup_drafts_match_peft(tiny_llama, tiny_adapters):
    names = [None, *tiny_adapters]
    prompts = repetitive_prompts(384, 16, seed=0)
    requests = [(names[i % len(names)], prompts[i]) for i in range(16)]
    expected = expected_from_peft(tiny_llama, tiny_adapters, requests)
    engine = engine_for(tiny_llama, tiny_adapters, prompt_lookup_min=1)
    outs, _ = serve_recorded(engine, requests)
    assert [outs[i] for i in range(16)] == [expected[i] for i in range(16)]
    assert engine.draft_tokens > 16 and engine.accepted_tokens > 0
    check_released(engine)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
          "required": ["a", "b"], "additionalProperties": False}


def sampled_requests(vocab: int, n: int) -> list[tuple[str | None, list[int], SamplingParams]]:
    """Seeded sampling with every per-row transform, logprobs, stops, structured outputs, allowed
    token lists and bad words."""
    rng = random.Random(5)
    out = []
    for i, prompt in enumerate(make_prompts(vocab, n, seed=7)):
        params = dict(max_new_tokens=MAX_NEW, temperature=rng.choice([0.0, 0.7, 1.3]), seed=1000 + i,
                      top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), ignore_eos=i % 3 != 0,
                      repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
                      frequency_penalty=rng.choice([0.0, 0.4]), logprobs=rng.choice([None, 2]),
                      min_new_tokens=rng.choice([0, 4]), logit_bias=((5, 3.0),) if i % 4 == 1 else (),
                      min_p=rng.choice([0.0, 0.1]))
        if i % 5 == 2:
            params["stop"] = ("a", "e ")
        if i % 6 == 4:
            params["structured_output"] = StructuredOutput(OutputKind.JSON_SCHEMA, json.dumps(SCHEMA))
        elif i % 7 == 3:
            params["allowed_token_ids"] = tuple(range(3, 60))
        if i % 4 == 3:
            params["bad_words"] = ("e", "th", "a b")
        out.append((None if i % 3 == 0 else "all-r8", prompt, SamplingParams(**params)))
    return out


async def collect(engine, requests):
    """All requests at once; every event of each, as (token, text, finish reason, logprob)."""
    async def one(i, adapter, prompt, params):
        events = []
        async for ev in engine.submit(GenerationRequest(f"s{i}", tuple(prompt), params, adapter)):
            events.append((ev.token_id, ev.text, ev.finish_reason,
                           None if ev.logprob is None else (ev.logprob.token_id, ev.logprob.logprob,
                                                            tuple(t for t, _ in ev.logprob.top))))
        return events
    return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))


def run(engine, requests):
    engine.start()
    try:
        return asyncio.run(collect(engine, requests))
    finally:
        engine.stop()


def test_seeded_sampling_gives_the_same_events_with_drafts(tiny_llama, tiny_adapters):
    adapters = {"all-r8": tiny_adapters["all-r8"]}
    requests = sampled_requests(384, 18)
    plain = run(engine_for(tiny_llama, adapters, num_speculative_tokens=0), requests)
    engine = engine_for(tiny_llama, adapters)
    engine.drafter = OracleDrafter({f"s{i}": [e[0] for e in events] for i, events in enumerate(plain)},
                                   engine.vocab_size)
    drafted = run(engine, requests)
    assert 0 < engine.accepted_tokens < engine.draft_tokens
    for i, (a, b) in enumerate(zip(plain, drafted, strict=True)):
        assert [e[:3] for e in a] == [e[:3] for e in b], f"request {i}"
        for x, y in zip(a, b, strict=True):
            assert (x[3] is None) == (y[3] is None)
            if x[3] is not None:
                assert x[3][0] == y[3][0] and x[3][2] == y[3][2] and abs(x[3][1] - y[3][1]) < 1e-4
    assert any(e[2] is not None and e[2].name == "STOP" for events in plain for e in events)
    assert any(len(events) < MAX_NEW for events in plain)
    check_released(engine)


def test_a_predicted_output_is_drafted_and_changes_no_token(tiny_llama, tiny_adapters):
    """OpenAI's Predicted Outputs: drafts follow a request's prediction (its output expected, with
    edits), so a good one is mostly kept; the events are those of the same requests without one
    (greedy and seeded), and the last event counts the prediction's drafts kept and not."""
    adapters = {"all-r8": tiny_adapters["all-r8"]}
    prompts = make_prompts(384, 3, seed=3)
    greedy, seeded = SamplingParams(MAX_NEW, ignore_eos=True), SamplingParams(MAX_NEW, ignore_eos=True,
                                                                               temperature=0.9, seed=7)
    requests = [("all-r8", prompts[0], greedy), (None, prompts[1], greedy), ("all-r8", prompts[2], seeded)]
    plain = run(engine_for(tiny_llama, adapters, num_speculative_tokens=0), requests)
    outs = [[e[0] for e in events] for events in plain]
    # every fifth token replaced, and two inserted
    edited = [(t + 1) % 384 if j % 5 == 4 else t for j, t in enumerate(outs[1][:10])] + [7, 9] + outs[1][10:]
    predictions = [outs[0], edited, outs[2]]

    async def collect_predicted(engine):
        async def one(i, adapter, prompt, params):
            req = GenerationRequest(f"p{i}", tuple(prompt), params, adapter, prediction=tuple(predictions[i]))
            return [ev async for ev in engine.submit(req)]
        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    engine = engine_for(tiny_llama, adapters)
    engine.start()
    try:
        got = asyncio.run(collect_predicted(engine))
    finally:
        engine.stop()
    assert [[(e.token_id, e.text, e.finish_reason) for e in events] for events in got] == \
        [[e[:3] for e in events] for events in plain]
    counts = [(events[-1].accepted_prediction_tokens, events[-1].rejected_prediction_tokens) for events in got]
    assert counts[0][0] >= MAX_NEW // 2 and counts[0][1] == 0, counts  # all of an exact prediction kept
    assert counts[1][0] >= 4 and counts[1][1] > 0, counts  # the edit's drafts rejected, the rest kept
    assert counts[2][0] >= MAX_NEW // 2 and counts[2][1] == 0, counts
    check_released(engine)


def test_drafts_stay_inside_the_step_budget_and_max_new_tokens(tiny_llama, tiny_adapters):
    """Four decoding rows, a token budget of 12: the drafts share the 8 tokens the rows leave, and
    no row is given more tokens than its max_new_tokens allows."""
    adapters = {"all-r8": tiny_adapters["all-r8"]}
    prompts = make_prompts(384, 4, seed=11)
    requests = [("all-r8", p) for p in prompts]
    expected = expected_from_peft(tiny_llama, adapters, requests)
    engine = engine_for(tiny_llama, adapters, max_batch_size=4, max_tokens_per_step=12, num_speculative_tokens=16)
    engine.drafter = OracleDrafter({f"r{i}": t + [7] * 8 for i, t in expected.items()}, engine.vocab_size)
    outs, steps = serve_recorded(engine, requests)
    assert [outs[i] for i in range(4)] == [expected[i] for i in range(4)]
    assert max(s.num_prefill_tokens + s.num_decode_tokens + s.num_draft_tokens for s in steps) == 12
    assert all(g + 1 + k <= max_new for g, k, max_new in engine.drafter.asked)
    assert max(k for _, k, _ in engine.drafter.asked) > 4  # more than one row's share: the budget bound it
    assert engine.accepted_tokens > 0
    check_released(engine)


@pytest.mark.parametrize("cutoff", [4, 5])
def test_no_drafts_at_the_disabling_batch_size(cutoff, tiny_llama, tiny_adapters):
    """Four requests prefilled in one step, decoding together to the end: with
    --speculative-disable-by-batch-size 4 no step drafts; with 5 they do."""
    requests = [(None, p) for p in make_prompts(384, 4, seed=13)]
    engine = engine_for(tiny_llama, {}, max_tokens_per_step=256, max_device_adapters=1, max_host_adapters=1,
                        speculative_disable_by_batch_size=cutoff)
    engine.drafter = OracleDrafter({f"s{i}": list(range(3, 3 + MAX_NEW)) for i in range(4)}, engine.vocab_size)
    run(engine, [(adapter, prompt, SamplingParams(MAX_NEW, ignore_eos=True)) for adapter, prompt in requests])
    assert (engine.draft_tokens > 0) == (cutoff == 5)
    check_released(engine)


def test_speculation_flags_are_validated():
    with pytest.raises(ValueError, match="num-speculative-tokens must be in"):
        ServerConfig(num_speculative_tokens=17)
    with pytest.raises(ValueError, match="prompt-lookup-min"):
        ServerConfig(prompt_lookup_min=5, prompt_lookup_max=4)
    with pytest.raises(ValueError, match="prompt-lookup-min"):
        ServerConfig(prompt_lookup_min=0)
    with pytest.raises(ValueError, match="speculative-disable-by-batch-size must be >= 1"):
        ServerConfig(speculative_disable_by_batch_size=0)
