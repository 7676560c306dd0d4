"""A hybrid model's recurrent states (LFM2's short convolutions, Qwen3.5's gated DeltaNet) through the
engine: preemption, cancellation, prefix-cache hits resumed from cached states, speculative drafts
taken back out of a state, and the options such a model cannot serve."""

import asyncio
import random
import threading

import pytest
import torch
from test_prefix_cache import assert_idle, generate
from test_speculative import OracleDrafter

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig, StartupError
from loramux.server.engine import EngineObserver
from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import FAMILY_ADAPTERS, build_adapter, build_family_model, peft_generate, pinned_base_linear
from test_parity import make_prompts, run_staggered

MAX_NEW = 16


@pytest.fixture(scope="module", params=["lfm2", "qwen3_5", "granitemoehybrid", "mamba2", "jamba"])
def hybrid(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = build_family_model(request.param, root / "model")
    adapters = {name: build_adapter(model, root / name, seed=i + 1, **kw)
                for i, (name, kw) in enumerate(FAMILY_ADAPTERS[request.param].items())}
    return model, adapters


def make(hybrid, **overrides):
    model, adapters = hybrid
    return build_engine(ServerConfig(**{
        "model": str(model), "dtype": "float32", "max_batch_size": 6, "max_tokens_per_step": 24, "max_model_len": 80,
        "default_max_new_tokens": MAX_NEW, "kv_block_size": 4, "base_linear": pinned_base_linear(),
        "adapters": tuple((n, str(p)) for n, p in adapters.items()), **overrides}))


def assert_states_free(engine):
    assert_idle(engine)
    assert engine.states.num_free == engine.config.max_batch_size


def one_after_another(engine, prompts, max_new: int, ends=None) -> tuple[list[list[int]], list[int]]:
    """``engine`` (started and stopped here) serves each prompt once the one before has finished,
    with the base model and ``ends[i]`` as prompt i's shared_prefix_ends: the outputs and each
    request's prompt tokens from the cache; every state slot is back at the end."""
    async def one(i):
        req = GenerationRequest(f"q{i}", tuple(prompts[i]), SamplingParams(max_new, ignore_eos=True),
                                shared_prefix_ends=ends[i] if ends else ())
        return [ev async for ev in engine.submit(req)]

    engine.start()
    try:
        served = [asyncio.run(one(i)) for i in range(len(prompts))]
        assert_states_free(engine)
    finally:
        engine.stop()
    return [[ev.token_id for ev in events] for events in served], [events[-1].cached_prompt_tokens for events in served]


@pytest.mark.parametrize("ops", ["auto", "torch"])
def test_a_small_pool_preempts_and_every_recomputed_request_is_exact(hybrid, ops):
    """The KV pool (of the one attention layer) holds 80 tokens; 10 requests of 20 to 40 + 16
    tokens need far more. A preempted request gives its state slot back and is recomputed from its
    first token, from the state cached at its prompt's last full block when its blocks are still
    there, else into a zeroed one. Decode rows (in slots that preemption leaves out of order) run
    the C++ kernel's steps on the states in their slots where it is built, or the torch ops."""
    model, adapters = hybrid
    rng = random.Random(5)
    names = [None, *adapters]
    jobs = [(names[i % len(names)], [rng.randrange(3, 300) for _ in range(rng.randint(20, 40))]) for i in range(10)]
    built = make(hybrid, kv_cache_tokens=80, max_model_len=64, op_backend=ops, base_linear=pinned_base_linear(ops))
    engine = built.engine
    assert engine.blocks.prefix_caching and engine.state_cache is not None
    kernel = ops == "auto" and not torch.cuda.is_available() and load_kernels() is not None
    assert engine.states.kernel == kernel
    engine.start()
    try:
        async def main():
            return await asyncio.gather(*(generate(engine, f"r{i}", a, p, MAX_NEW) for i, (a, p) in enumerate(jobs)))

        outs = asyncio.run(main())
        assert engine.num_preemptions > 0
        assert_states_free(engine)
    finally:
        engine.stop()
    for name in names:
        idx = [i for i, (n, _) in enumerate(jobs) if n == name]
        expected = peft_generate(model, adapters.get(name), [jobs[i][1] for i in idx], MAX_NEW, eos_token_id=None)
        assert [outs[i][0] for i in idx] == expected, name


def test_cancelled_requests_give_their_state_slots_back_and_the_others_stay_exact(hybrid):
    """Half of the requests are cancelled after a few tokens, some mid-prompt; the slots they held
    serve later requests, whose states start from zero."""
    model, adapters = hybrid
    adapter = list(adapters)[-1]
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(8, 40))] for _ in range(12)]
    engine = make(hybrid, max_batch_size=3).engine
    engine.start()
    try:
        async def one(i):
            stream = engine.submit(GenerationRequest(f"c{i}", tuple(prompts[i]), SamplingParams(MAX_NEW, ignore_eos=True),
                                                     adapter if i % 3 else None))
            tokens = []
            async for ev in stream:
                tokens.append(ev.token_id)
                if i % 2 and len(tokens) == 2:
                    stream.cancel()
                    return None
            return tokens

        async def main():
            return await asyncio.gather(*(one(i) for i in range(12)))

        outs = asyncio.run(main())
        for _ in range(100):  # a cancellation is taken up by the engine's next step
            if engine.counts() == (0, 0):
                break
            asyncio.run(asyncio.sleep(0.01))
        assert_states_free(engine)
    finally:
        engine.stop()
    for i, out in enumerate(outs):
        if out is not None:
            assert [out] == peft_generate(model, adapters[adapter] if i % 3 else None, [prompts[i]], MAX_NEW,
                                          eos_token_id=None), i


def test_prefix_hits_resume_from_cached_states_and_stay_exact(hybrid):
    """One after another: A (a 22-token system prompt, then its own tokens) caches the state at its
    prompt's last full block, and its decode steps at its answer's; B shares A's first 5 blocks,
    finds no state there, and caches one where their blocks part; C resumes from B's; a later turn
    of A's conversation resumes from A's answer's, and A's prompt again from A's prompt's. Every
    output equals PEFT's."""
    model, adapters = hybrid
    rng = random.Random(21)
    system = [rng.randrange(3, 300) for _ in range(22)]
    a, b, c = ([*system, *(rng.randrange(3, 300) for _ in range(n))] for n in (8, 5, 11))
    built = make(hybrid, max_model_len=96, max_cached_states=12)
    engine = built.engine
    engine.start()
    try:
        outs, cached, held = [], [], []

        def one(prompt):
            tokens, hit = asyncio.run(generate(engine, f"h{len(outs)}", None, prompt, 8))
            outs.append(tokens)
            cached.append(hit)
            held.append(len(engine.state_cache))

        for prompt in (a, b, c):
            one(prompt)
        turn = [*a, *outs[0], *(rng.randrange(3, 300) for _ in range(6))]
        one(turn)
        one(a)
        assert_states_free(engine)
    finally:
        engine.stop()
    # block size 4. Each request caches its prompt's state at its last full block before its last
    # token, and one state of its answer (its 7 tokens fed), at the answer's latest full block: A's
    # at 28 and 36 (of 37 fed), B's where it parts from A (20), at 24 and 32 (of 34), C's at 32 and 40
    # (of 40), the turn's at 40 and 48 (of 51); A again adds none
    assert held == [2, 5, 7, 9, 9]
    # B and C part from A inside block 6 (tokens 20-23); the turn repeats A's answer through 36
    assert cached == [0, 0, 20, 36, 28]
    assert outs == peft_generate(model, None, [a, b, c, turn, a], 8, eos_token_id=None)


def test_a_state_cached_where_a_request_says_its_instructions_end_serves_later_requests(hybrid):
    """A says its first 22 tokens (a chat's instructions, as the server's renderer marks them) are
    shared: it caches its state at 20, the last full block before them, beside its own last block.
    B, C and D, sent after it, share only those 22 tokens and resume at 20 (without the mark: B
    from its first token, as in the test above). Each also marks its own length, which is no
    state where a block ends there (B's 28: a state needs a token after it). Every output equals
    PEFT's."""
    model, adapters = hybrid
    rng = random.Random(5)
    system = [rng.randrange(3, 300) for _ in range(22)]
    prompts = [[*system, *(rng.randrange(3, 300) for _ in range(n))] for n in (9, 6, 13, 3)]

    for marked, expected in ((True, [0, 20, 20, 20]), (False, [0, 0, 20, 20])):
        engine = make(hybrid, max_model_len=96, max_cached_states=12).engine
        outs, cached = one_after_another(engine, prompts, 8, [(22, len(p)) if marked else () for p in prompts])
        assert cached == expected, marked
        assert outs == peft_generate(model, None, prompts, 8, eos_token_id=None)


def test_states_cached_every_interval_serve_prompts_that_part_anywhere(hybrid, caplog):
    """With --cached-state-interval 8 (blocks of 4), A (31 tokens) caches its state at 8, 16 and 24
    beside its last full block (28). B, C and D then part from A at 22, 13 and 27 tokens, where
    nothing marks: they resume at 16, 8 and 24, the last checkpoint before each parts. Without the
    interval B computes from its first token and caches where it parts from A (20), C, parting at
    13, finds no state below it either, and D resumes at B's 20. Every output equals PEFT's; the
    start-up log names the interval."""
    model, adapters = hybrid
    rng = random.Random(8)
    a = [rng.randrange(3, 300) for _ in range(31)]
    prompts = [a] + [[*a[:n], *(rng.randrange(3, 300) for _ in range(7))] for n in (22, 13, 27)]
    for i in (1, 2, 3):  # their own tokens part from A's at once
        prompts[i][len(prompts[i]) - 7] = (a[len(prompts[i]) - 7] + 1) % 300 + 3
    for interval, expected in ((8, [0, 16, 8, 24]), (0, [0, 0, 0, 20])):
        caplog.clear()
        with caplog.at_level("INFO", logger="loramux"):
            engine = make(hybrid, max_model_len=96, max_cached_states=12, cached_state_interval=interval).engine
        named = "also cached every 8 tokens (--cached-state-interval)" in caplog.text
        assert named == bool(interval), caplog.text
        outs, cached = one_after_another(engine, prompts, 8)
        assert cached == expected, interval
        assert outs == peft_generate(model, None, prompts, 8, eos_token_id=None)


def test_answers_decoded_together_into_a_one_state_cache_leave_every_later_turn_exact(hybrid):
    """Three conversations of 3-token prompts (no full block: no prompt's state) decode together,
    their answers filling blocks at the same steps, into a cache of one state: each such step's
    three saves go to one slot, which the last row's holds. Their later turns, sent last
    conversation first, resume from it (its key names its state) or compute their prompts whole;
    the first later turn's prompt state then takes the slot, and in a one-slot cache (half of it is
    none) answers never take a prompt's. All match PEFT."""
    model, adapters = hybrid
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 300) for _ in range(3)] for _ in range(3)]
    engine = make(hybrid, max_model_len=64, max_cached_states=1).engine
    engine.start()
    try:
        async def together():
            return await asyncio.gather(*(generate(engine, f"a{i}", None, p, 8) for i, p in enumerate(prompts)))

        answers = [out for out, _ in asyncio.run(together())]
        turns = [[*p, *out, *(rng.randrange(3, 300) for _ in range(5))] for p, out in zip(prompts, answers, strict=True)]
        later = {i: asyncio.run(generate(engine, f"b{i}", None, turns[i], 6)) for i in (2, 1, 0)}
        assert_states_free(engine)
        assert len(engine.state_cache) == 1
    finally:
        engine.stop()
    # 7 answer tokens fed: the answer's state at 8 of a turn's 16 tokens; the others' were replaced
    # in the slot, and the turn's prompt's state at 12 holds it from then on
    assert [later[i][1] for i in (2, 1, 0)] == [8, 0, 0]
    assert answers == peft_generate(model, None, prompts, 8, eos_token_id=None)
    assert [later[i][0] for i in range(3)] == peft_generate(model, None, turns, 6, eos_token_id=None)


def test_hits_are_per_adapter_and_a_small_state_cache_evicts_the_least_recently_used(hybrid):
    """Phases of four requests joining a running batch at staggered times, with room for two cached
    states: a prompt family under adapter X; the same prompts under Y, whose first request finds no
    state of X's (the weights are in the key); another family under the base model; then X's first
    prompt twice in turn: its states were evicted, so the first computes it whole and the second
    resumes from the first's. Every output is PEFT's."""
    model, adapters = hybrid
    rng = random.Random(17)
    x, y = list(adapters)[:2]
    roots = [[rng.randrange(3, 300) for _ in range(18)] for _ in range(2)]
    family = [[[*root, *(rng.randrange(3, 300) for _ in range(rng.randint(1, 12)))] for _ in range(4)] for root in roots]
    phases = [[(x, p) for p in family[0]], [(y, p) for p in family[0]], [(None, p) for p in family[1]],
              [(x, family[0][0])], [(x, family[0][0])]]
    built = make(hybrid, max_model_len=64, max_cached_states=2)
    engine = built.engine
    assert engine.states.cached_slots == range(6, 8)
    engine.start()
    try:
        async def phase(k, jobs):
            tasks = []
            for i, (name, prompt) in enumerate(jobs):
                tasks.append(asyncio.create_task(generate(engine, f"e{k}.{i}", name, prompt, 6)))
                await asyncio.sleep(0.02)
            return await asyncio.gather(*tasks)

        outs = [asyncio.run(phase(k, jobs)) for k, jobs in enumerate(phases)]
        assert_states_free(engine)
        assert len(engine.state_cache) == 2
    finally:
        engine.stop()
    cached = [[c for _, c in out] for out in outs]
    assert cached[1][0] == 0 and cached[3] == [0] and cached[4] == [(len(family[0][0]) - 1) // 4 * 4]
    jobs = [job for jobs in phases for job in jobs]
    tokens = [t for out in outs for t, _ in out]
    for name in dict.fromkeys(n for n, _ in jobs):
        idx = [i for i, (n, _) in enumerate(jobs) if n == name]
        expected = peft_generate(model, adapters.get(name), [jobs[i][1] for i in idx], 6, eos_token_id=None)
        assert [tokens[i] for i in idx] == expected, name


class HeldStep(EngineObserver):
    """Holds the engine thread after its first step until ``go`` is set, so that a test can queue
    requests that the next step then sees together (``stepped`` says the first is done)."""

    def __init__(self):
        self.stepped, self.go = threading.Event(), threading.Event()

    def step(self, stats) -> None:
        if not self.stepped.is_set():
            self.stepped.set()
            assert self.go.wait(60)


def run_held(engine, first, then) -> list[tuple[list[int], int]]:
    """Runs ``first`` [(adapter, prompt) or (adapter, prompt, priority)], holds the engine after
    its first step while ``then`` is queued, and returns every request's (tokens, cached prompt
    tokens), 6 tokens each."""
    held = HeldStep()
    engine.observers.append(held)

    async def one(request_id, adapter, prompt, priority=0):
        stream = engine.submit(GenerationRequest(request_id, tuple(prompt), SamplingParams(6, ignore_eos=True),
                                                 adapter, priority=priority))
        events = [ev async for ev in stream]
        return [ev.token_id for ev in events], events[-1].cached_prompt_tokens

    async def main():
        tasks = [asyncio.create_task(one(f"f{i}", *job)) for i, job in enumerate(first)]
        assert await asyncio.to_thread(held.stepped.wait, 60)
        tasks += [asyncio.create_task(one(f"t{i}", *job)) for i, job in enumerate(then)]
        await asyncio.sleep(0)  # each submits before its first await
        held.go.set()
        return await asyncio.gather(*tasks)

    try:
        return asyncio.run(main())
    finally:
        held.go.set()
        engine.observers.remove(held)


def test_prompts_that_arrive_together_resume_where_they_part(hybrid):
    """Requests queued in one step, no state cached: A and B share 24 tokens, C the first 12 of
    them, D nothing, E A's prompt under an adapter (other weights: nothing). A caches its state
    where each of the others parts from it, B and C wait for those states (as a K/V model's wait
    for blocks being computed) and resume there. All match PEFT."""
    model, adapters = hybrid
    x = list(adapters)[0]
    rng = random.Random(9)

    def tokens(n):
        return [rng.randrange(3, 300) for _ in range(n)]

    shared = tokens(24)
    jobs = [(None, [*shared, *tokens(9)]), (None, [*shared, *tokens(10)]), (None, [*shared[:12], *tokens(13)]),
            (None, tokens(20)), (x, [*shared, *tokens(9)])]
    engine = make(hybrid, max_model_len=96, max_cached_states=8).engine
    engine.start()
    try:
        outs = run_held(engine, [(None, tokens(5))], jobs)[1:]
        assert_states_free(engine)
    finally:
        engine.stop()
    assert [hit for _, hit in outs] == [0, 24, 12, 0, 0]
    for name in (None, x):
        idx = [i for i, (n, _) in enumerate(jobs) if n == name]
        expected = peft_generate(model, adapters.get(name), [jobs[i][1] for i in idx], 6, eos_token_id=None)
        assert [outs[i][0] for i in idx] == expected, name


def test_a_prompt_that_comes_during_a_prefill_resumes_where_it_parts_from_it(hybrid):
    """A's 60-token prompt is prefilled 32 tokens a step; B, sharing its first 40, comes after
    A's first step: A, still short of token 40, caches its state there too, and B waits for it
    (though the blocks A committed end at 32, and the step has room for B) and resumes there."""
    model, _ = hybrid
    rng = random.Random(11)
    a = [rng.randrange(3, 300) for _ in range(60)]
    b = [*a[:40], *(rng.randrange(3, 300) for _ in range(7))]
    engine = make(hybrid, max_model_len=96, max_cached_states=8, max_tokens_per_step=32).engine
    engine.start()
    try:
        outs = run_held(engine, [(None, a)], [(None, b)])
        assert_states_free(engine)
    finally:
        engine.stop()
    assert [hit for _, hit in outs] == [0, 40]
    assert [out for out, _ in outs] == peft_generate(model, None, [a, b], 6, eos_token_id=None)


def test_a_state_a_waiting_request_will_resume_from_is_not_evicted_meanwhile(hybrid):
    """Two cached states: P's prompt's (at 20) and an answer's. Queued together under priority
    scheduling with room for three, A, B and C (priority 0) are admitted first and each caches its
    prompt's state; Q (P again, priority 1) waits for a batch slot. The state Q will resume from is
    the least recently used, yet their saves take the others' slots, and Q resumes at 20."""
    model, _ = hybrid
    rng = random.Random(13)
    p = [rng.randrange(3, 300) for _ in range(21)]
    others = [[rng.randrange(3, 300) for _ in range(13)] for _ in range(3)]
    engine = make(hybrid, max_model_len=64, max_cached_states=2, max_batch_size=4, scheduling="priority").engine
    engine.start()
    try:
        first = asyncio.run(generate(engine, "p", None, p, 6))
        # the first step's request has no full block, so no prompt state of its own
        outs = run_held(engine, [(None, [5, 6, 7])], [*((None, o, 0) for o in others), (None, p, 1)])
        assert_states_free(engine)
    finally:
        engine.stop()
    assert first[1] == 0 and [hit for _, hit in outs] == [0, 0, 0, 0, 20]
    expected = peft_generate(model, None, [[5, 6, 7], *others, p], 6, eos_token_id=None)
    assert [out for out, _ in outs] == expected and first[0] == expected[-1]


@pytest.mark.parametrize("ops", ["auto", "torch"])
def test_drafts_kept_and_rejected_leave_each_state_as_plain_decoding_would(hybrid, ops):
    """Speculative decoding: a drafting row runs its last token and its drafts through its state
    as a chunk, saving the state after each position but the last in a free slot; where a draft
    is rejected, the state after the tokens kept replaces it. 12 staggered requests of mixed
    adapters, drafts from an oracle that gets every fifth token wrong, 6 state slots (drafts take
    free ones too, so they are fewer when the batch is full): every output equals PEFT's. Then two
    later turns of each of four conversations, one after another, each resuming from the previous
    answer's state, which drafting steps saved where the kept tokens filled a block (often before
    the last of them), and equal to PEFT's too."""
    model, adapters = hybrid
    names = [None, *adapters]
    prompts = make_prompts(300, 12, seed=9)
    requests = [(names[i % len(names)], prompts[i]) for i in range(12)]
    expected = {}
    for name in names:
        idx = [i for i in range(12) if requests[i][0] == name]
        for i, out in zip(idx, peft_generate(model, adapters.get(name), [prompts[i] for i in idx], MAX_NEW,
                                             eos_token_id=None), strict=True):
            expected[f"r{i}"] = out
    turns = {}  # the base model's conversations: t{i} follows r{i}, u{i} follows t{i}
    for before, after, extra in (("r", "t", [7, 8, 9]), ("t", "u", [4, 5])):
        now = {f"{after}{i}": [*(turns.get(f"{before}{i}") or prompts[i]), *expected[f"{before}{i}"], *extra]
               for i in range(0, 12, len(names))}
        for rid, out in zip(now, peft_generate(model, None, list(now.values()), MAX_NEW, eos_token_id=None),
                            strict=True):
            expected[rid] = out
        turns.update(now)
    engine = make(hybrid, num_speculative_tokens=3, max_cached_states=32, max_model_len=128, op_backend=ops,
                  base_linear=pinned_base_linear(ops)).engine
    engine.drafter = OracleDrafter(expected, engine.vocab_size)
    engine.start()
    try:
        outs = asyncio.run(run_staggered(engine, requests, MAX_NEW))
        assert [outs[i] for i in range(12)] == [expected[f"r{i}"] for i in range(12)]
        assert 0 < engine.accepted_tokens < engine.draft_tokens
        for rid, prompt in turns.items():
            tokens, cached = asyncio.run(generate(engine, rid, None, prompt, MAX_NEW))
            assert tokens == expected[rid], rid
            assert cached > len(prompt) - 3 - MAX_NEW, (rid, cached)  # into the previous answer
        assert_states_free(engine)
    finally:
        engine.stop()


def test_no_cached_states_is_no_prefix_caching(hybrid):
    engine = make(hybrid, max_cached_states=0).engine
    assert not engine.blocks.prefix_caching and engine.state_cache is None
    assert len(engine.states.cached_slots) == 0


def test_cuda_graphs_are_refused_at_start_up(hybrid):
    with pytest.raises(StartupError, match="--cuda-graphs on: .*ForServing's decode steps cannot be captured "
                                           "\\(recurrent state"):
        make(hybrid, cuda_graphs="on")


@pytest.mark.parametrize("step_tokens", [256, 50])
def test_long_prompts_in_one_step_or_across_steps_match_peft(hybrid, step_tokens):
    """Prompts of 100 to 180 tokens: Qwen3.5's rule runs them in several chunks of 64 within a
    step, and with a step budget of 50 from a state carried across steps at other boundaries."""
    model, adapters = hybrid
    rng = random.Random(13)
    names = [None, *adapters]
    jobs = [(names[i % len(names)], [rng.randrange(3, 300) for _ in range(rng.randint(100, 180))]) for i in range(3)]
    engine = make(hybrid, max_model_len=200, max_tokens_per_step=step_tokens).engine
    engine.start()
    try:
        async def main():
            return await asyncio.gather(*(generate(engine, f"l{i}", a, p, 8) for i, (a, p) in enumerate(jobs)))

        outs = asyncio.run(main())
        assert_states_free(engine)
    finally:
        engine.stop()
    for i, (name, prompt) in enumerate(jobs):
        assert [outs[i][0]] == peft_generate(model, adapters.get(name), [prompt], 8, eos_token_id=None), (name, i)


def test_lora_on_mambas_dt_proj_is_refused_naming_it(tmp_path):
    """Hugging Face's Mamba mixer multiplies by dt_proj's weight directly, so PEFT's LoRA on it
    changes nothing there: serving it would not be PEFT's output, and it is refused."""
    from loramux.adapters.errors import AdapterInvalid

    model = build_family_model("mamba", tmp_path / "model")
    adapter = build_adapter(model, tmp_path / "dt", seed=1, r=4, lora_alpha=8, target_modules=["in_proj", "dt_proj"])
    built = build_engine(ServerConfig(model=str(model), max_model_len=64, default_max_new_tokens=16))
    with pytest.raises(AdapterInvalid, match=r"module 'backbone\.layers\.0\.mixer\.dt_proj' is not a supported LoRA "
                                             r"target of this model; supported kinds: \['in_proj', 'out_proj', 'x_proj'\]"):
        built.registry.register("dt", adapter, trusted=True)


def test_a_hybrid_whose_layer_types_shape_one_target_two_ways_is_refused_at_start_up(tmp_path):
    """LFM2's attention and convolution both name their output projection out_proj: one LoRA kind,
    whose pages have one shape. A config with attention narrower than the hidden size gives it two."""
    import transformers as tf

    from helpers import _family_config, build_tokenizer

    tok = build_tokenizer(tmp_path)
    config = _family_config("lfm2", len(tok), tok.eos_token_id, tok.pad_token_id)
    config.head_dim = 8  # 4 heads of 8: attention's out_proj is 32 -> 64, the convolution's 64 -> 64
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(StartupError, match=r"Lfm2ForServing: LoRA targets of one name with two shapes are not served: "
                                           r"out_proj is \(32, 64\) in layer 1 and \(64, 64\) in another"):
        build_engine(ServerConfig(model=str(tmp_path), max_model_len=64, default_max_new_tokens=16))
