"""Paged KV with prefix caching and preemption, token for token against PEFT (greedy, float32, CPU):
hits on a shared prefix, no reuse across weights, an adapter replaced under load, and a pool small
enough to force preemptions."""

import asyncio
import random
import threading
import time

import pytest

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import build_adapter, peft_generate, peft_logprobs

MAX_NEW = 8
BLOCK = 4


def make(tiny_llama, tiny_adapters, **overrides):
    config = ServerConfig(**{
        "dtype": "float32", "model": str(tiny_llama), "max_batch_size": 8, "max_tokens_per_step": 32,
        "max_model_len": 96, "default_max_new_tokens": MAX_NEW, "kv_block_size": BLOCK,
        "max_device_adapters": len(tiny_adapters), "max_host_adapters": len(tiny_adapters),
        "adapters": tuple((n, str(p)) for n, p in tiny_adapters.items()), **overrides,
    })
    built = build_engine(config)
    built.engine.start()
    return built


async def generate(engine, request_id, adapter, prompt, max_new=MAX_NEW):
    stream = engine.submit(GenerationRequest(request_id, tuple(prompt), SamplingParams(max_new, ignore_eos=True),
                                             adapter))
    events = [ev async for ev in stream]
    return [ev.token_id for ev in events], events[-1].cached_prompt_tokens


def run(engine, jobs, stagger=0.0):
    """jobs: (adapter, prompt); each starts ``stagger`` s after the previous one."""
    async def main():
        tasks = []
        for i, (adapter, prompt) in enumerate(jobs):
            tasks.append(asyncio.create_task(generate(engine, f"r{i}", adapter, prompt)))
            await asyncio.sleep(stagger)
        return await asyncio.gather(*tasks)
    return asyncio.run(main())


def assert_idle(engine):
    assert engine.counts() == (0, 0)
    engine.blocks.check()
    assert engine.blocks.num_held == 0 and not engine.adapters.pool.pinned()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    prefix = [rng.randrange(3, 300) for _ in range(27)]
    return prefix, [prefix + [rng.randrange(3, 300) for _ in range(rng.randint(1, 9))] for _ in range(5)]


@pytest.mark.parametrize("caching", [True, False])
def test_a_shared_prefix_is_served_from_the_cache_and_stays_exact(tiny_llama, tiny_adapters, prompts, caching):
    prefix, full = prompts
    built = make(tiny_llama, tiny_adapters, prefix_caching=caching)
    engine = built.engine
    try:
        first = run(engine, [("attn-r4", prefix + [5])])  # computes and caches the prefix's full blocks
        rest = run(engine, [("attn-r4", p) for p in full], stagger=0.05)
        # the whole prompt again: every block is cached, the last token is still computed
        again = run(engine, [("attn-r4", prefix + [5])])
        expected = peft_generate(tiny_llama, tiny_adapters["attn-r4"], [prefix + [5], *full], MAX_NEW, eos_token_id=None)
        assert [t for t, _ in first + rest] == expected
        assert again[0][0] == expected[0]
        cached = [c for _, c in rest]
        if caching:
            assert cached == [len(prefix) // BLOCK * BLOCK] * len(full)  # 24 of the 27 shared tokens
            assert again[0][1] == 27  # 28 tokens = 7 full blocks; the 28th is recomputed
            assert engine.prefix_hit_tokens == sum(cached) + 27
            assert engine.prefix_queried_tokens == 28 * 2 + sum(map(len, full))
        else:
            assert cached == [0] * len(full) and again[0][1] == 0 and engine.prefix_hit_tokens == 0
        assert_idle(engine)
    finally:
        built.engine.stop()


def test_other_weights_never_reuse_the_cache(tiny_llama, tiny_adapters, prompts, tmp_path):
    """The same prompt with another adapter and with the base model gets no hit; the same files
    registered under a second id share the blocks (the key is the content, not the id)."""
    prefix, _ = prompts
    twin = {**tiny_adapters, "twin": tiny_adapters["attn-r4"]}
    built = make(tiny_llama, twin)
    engine = built.engine
    try:
        warm = run(engine, [("attn-r4", prefix)])
        others = run(engine, [("regex-mlp-r8", prefix), (None, prefix), ("twin", prefix)])
        assert [c for _, c in others] == [0, 0, 24]
        expected = {name: peft_generate(tiny_llama, tiny_adapters.get(name), [prefix], MAX_NEW, eos_token_id=None)[0]
                    for name in ("attn-r4", "regex-mlp-r8", None)}
        assert warm[0][0] == expected["attn-r4"] == others[2][0]
        assert others[0][0] == expected["regex-mlp-r8"] and others[1][0] == expected[None]
        assert_idle(engine)
    finally:
        built.engine.stop()


def test_an_adapter_replaced_under_load_serves_the_new_weights_without_stale_hits(tiny_llama, tiny_adapters,
                                                                                  prompts, tmp_path):
    prefix, full = prompts
    new_files = build_adapter(tiny_llama, tmp_path / "new", seed=99, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    built = make(tiny_llama, tiny_adapters)
    engine = built.engine
    try:
        async def main():
            old = [asyncio.create_task(generate(engine, f"old{i}", "attn-r4", p, max_new=24))
                   for i, p in enumerate(full)]
            await asyncio.sleep(0.2)  # the old version is decoding, its prefix blocks cached
            built.registry.register("attn-r4", new_files, replace=True, trusted=True)
            new = [await generate(engine, f"new{i}", "attn-r4", p) for i, p in enumerate(full[:2])]
            return await asyncio.gather(*old), new

        old, new = asyncio.run(main())
        expected_new = peft_generate(tiny_llama, new_files, full[:2], MAX_NEW, eos_token_id=None)
        expected_old = peft_generate(tiny_llama, tiny_adapters["attn-r4"], full, 24, eos_token_id=None)
        assert [t for t, _ in old] == expected_old  # requests already running keep their version
        assert [t for t, _ in new] == expected_new
        assert new[0][1] == 0  # the old weights' blocks are never hit by the new ones
        assert new[1][1] == 24  # ...while the new version's own blocks are
        assert_idle(engine)
    finally:
        built.engine.stop()


def test_a_small_pool_preempts_and_every_request_stays_exact(tiny_llama, tiny_adapters):
    """The pool holds 96 tokens (24 blocks); 8 requests of up to 40 + 16 tokens each need far more.
    Preempted requests are recomputed and their streams see no gap and no duplicate."""
    rng = random.Random(11)
    names = [None, "attn-r4", "regex-mlp-r8", "all-r8"]
    jobs = [(names[i % 4], [rng.randrange(3, 300) for _ in range(rng.randint(20, 40))]) for i in range(8)]
    built = make(tiny_llama, tiny_adapters, kv_cache_tokens=96, max_tokens_per_step=64)
    engine = built.engine
    try:
        async def main():
            return await asyncio.gather(*(generate(engine, f"r{i}", a, p, max_new=16) for i, (a, p) in enumerate(jobs)))

        outs = asyncio.run(main())
        assert engine.num_preemptions > 0
        for name in names:
            idx = [i for i, (n, _) in enumerate(jobs) if n == name]
            expected = peft_generate(tiny_llama, tiny_adapters.get(name), [jobs[i][1] for i in idx], 16, eos_token_id=None)
            assert [outs[i][0] for i in idx] == expected, name
        assert_idle(engine)
    finally:
        built.engine.stop()


LIMITS = {  # what two running requests of adapters attn-r4 (4 pages) and all-r8 (8 pages) fill
    "batch": {"max_batch_size": 2},
    "adapters per step": {"max_adapters_per_step": 2},
    "device pages": {"max_lora_rank": 8, "max_device_adapters": 2, "max_host_adapters": 3},  # 16 pages
}


JOBS = {"low0": ("attn-r4", 3, 56), "low1": ("all-r8", 3, 56), "high": ("regex-mlp-r8", -1, 8)}  # adapter, priority, tokens


def run_lows_then_high(engine, prompts):
    """JOBS through --scheduling priority: both lows running, then the high one. ([request ids in
    the order they finished], {request id: tokens})"""
    async def main():
        finished, tokens = [], {}

        async def one(rid):
            adapter, priority, max_new = JOBS[rid]
            stream = engine.submit(GenerationRequest(rid, tuple(prompts[rid]), SamplingParams(
                max_new, ignore_eos=True), adapter, priority=priority))
            tokens[rid] = [ev.token_id async for ev in stream]
            finished.append(rid)

        lows = [asyncio.create_task(one(rid)) for rid in ("low0", "low1")]
        while engine.counts() != (2, 0):  # both running
            await asyncio.sleep(0.001)
        await one("high")
        await asyncio.gather(*lows)
        return finished, tokens
    return asyncio.run(main())


def assert_peft(tiny_llama, tiny_adapters, prompts, tokens):
    for rid, (adapter, _, max_new) in JOBS.items():
        assert [tokens[rid]] == peft_generate(tiny_llama, tiny_adapters[adapter], [prompts[rid]], max_new,
                                              eos_token_id=None), rid


@pytest.mark.parametrize("limit", LIMITS)
def test_a_request_of_higher_priority_preempts_a_lower_one_and_every_stream_stays_exact(tiny_llama, tiny_adapters,
                                                                                        limit):
    """--scheduling priority, two requests of priority 3 running, which fill the batch, the
    distinct-adapter budget, or the device pages that a third adapter needs (8 where 4 are free):
    one of priority -1 on that adapter arriving later preempts the one of them whose place (slot,
    adapter, pages) is enough and finishes first; the preempted request is recomputed, and every
    stream is token for token PEFT's."""
    rng = random.Random(5)
    prompts = {rid: [rng.randrange(3, 300) for _ in range(20)] for rid in JOBS}
    served = {name: tiny_adapters[name] for name, _, _ in JOBS.values()}
    built = make(tiny_llama, served, scheduling="priority", **LIMITS[limit])
    engine = built.engine
    try:
        finished, tokens = run_lows_then_high(engine, prompts)
        assert finished[0] == "high" and engine.num_preemptions == 1
        assert_peft(tiny_llama, tiny_adapters, prompts, tokens)
        assert_idle(engine)
    finally:
        built.engine.stop()


@pytest.mark.parametrize("scheduling", ["priority", "fair"])
def test_a_request_admission_takes_first_far_down_the_queue_still_hits_the_prefix_cache(tiny_llama, tiny_adapters,
                                                                                      scheduling):
    """A batch of 1, three requests of one adapter queued, then one of another adapter whose prompt
    an earlier request cached. Admission takes it next (priority: it is -1; fair: its adapter has had
    less service), so it must be among the waiting requests that look up their prefix, and hit those
    blocks; arrival order would leave it out of the lookups, and it would compute them again."""
    rng = random.Random(9)
    prompt = [rng.randrange(3, 300) for _ in range(24)]
    built = make(tiny_llama, tiny_adapters, scheduling=scheduling, max_batch_size=1)
    engine = built.engine
    try:
        async def main():
            await generate(engine, "warm", "attn-r4", prompt)
            others = [asyncio.create_task(generate(engine, f"q{i}", "all-r8", [rng.randrange(3, 300) for _ in range(9)],
                                                   max_new=40)) for i in range(4)]
            while engine.counts() != (1, 3):
                await asyncio.sleep(0.001)
            stream = engine.submit(GenerationRequest("hot", tuple(prompt), SamplingParams(MAX_NEW, ignore_eos=True),
                                                     "attn-r4", priority=-1 if scheduling == "priority" else 0))
            events = [ev async for ev in stream]
            finished_before = sum(task.done() for task in others)
            await asyncio.gather(*others)
            return [ev.token_id for ev in events], events[-1].cached_prompt_tokens, finished_before

        tokens, cached, finished_before = asyncio.run(main())
        assert finished_before < 3  # it went ahead of queued requests that arrived before it
        assert cached == 23  # its six cached blocks, but the last prompt token (computed for its logits)
        assert [tokens] == peft_generate(tiny_llama, tiny_adapters["attn-r4"], [prompt], MAX_NEW, eos_token_id=None)
        assert_idle(engine)
    finally:
        built.engine.stop()


def test_a_pool_smaller_than_one_request_is_refused_at_start_up():
    with pytest.raises(ValueError, match=r"kv-cache-tokens \(95\) must be >= max-model-len \(96\)"):
        ServerConfig(max_model_len=96, default_max_new_tokens=8, kv_cache_tokens=95)


@pytest.mark.parametrize("pool", [None, 96])
def test_prompt_logprobs_equal_peft_through_chunks_cache_hits_and_preemption(tiny_llama, tiny_adapters, prompts, pool):
    """Requests asking for prompt logprobs compute their whole prompt (a cached prefix would skip
    rows), over several chunks, joining a running batch; with pool=96 they are preempted too.
    The others still hit the cache, and every token stays PEFT's."""
    prefix, full = prompts
    rng = random.Random(5)
    long_rope = prefix + [rng.randrange(3, 300) for _ in range(13)]  # 40 tokens: three chunks of 16
    built = make(tiny_llama, tiny_adapters, max_tokens_per_step=16, kv_cache_tokens=pool)
    engine = built.engine
    jobs = [("attn-r4", full[0], None), ("attn-r4", long_rope, 3), (None, full[1], 0), ("all-r8", full[2], 5),
            ("attn-r4", full[3], None), ("attn-r4", prefix + [7], 2)]
    try:
        run(engine, [("attn-r4", prefix + [5])])  # the prefix's blocks are cached

        async def one(i, adapter, prompt, k):
            await asyncio.sleep(0 if pool else 0.03 * i)  # all at once on the small pool: it must preempt
            sampling = SamplingParams(24 if pool else MAX_NEW, ignore_eos=True, prompt_logprobs=k)
            events = [ev async for ev in engine.submit(GenerationRequest(f"p{i}", tuple(prompt), sampling, adapter))]
            return events

        async def main():
            return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

        outs = asyncio.run(main())
        for (adapter, prompt, k), events in zip(jobs, outs, strict=True):
            first = events[0].prompt_logprobs
            assert all(ev.prompt_logprobs is None for ev in events[1:])
            expected = peft_generate(tiny_llama, tiny_adapters.get(adapter), [prompt], len(events), eos_token_id=None)
            assert [ev.token_id for ev in events] == expected[0]
            if k is None:
                assert first is None
                continue
            ref = peft_logprobs(tiny_llama, tiny_adapters.get(adapter), prompt[:1], prompt[1:])
            assert [lp.token_id for lp in first] == prompt[1:]
            for p, lp in enumerate(first):
                assert abs(lp.logprob - ref[p, prompt[p + 1]].item()) < 1e-4
                top = ref[p].topk(k)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert max((abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist(), strict=True)), default=0) < 1e-4
            assert events[-1].cached_prompt_tokens == 0  # computed whole, though its prefix was cached
        if pool:
            assert engine.num_preemptions > 0
        else:  # the others still hit
            assert outs[0][-1].cached_prompt_tokens == 24 and outs[4][-1].cached_prompt_tokens == 24
        assert_idle(engine)
    finally:
        built.engine.stop()


def test_requests_arriving_together_compute_their_shared_prefix_once(tiny_llama, tiny_adapters, prompts):
    """Five prompts with 27 tokens in common, all queued before the first step: one computes the
    six shared blocks, the others wait for them and hit them; every token stays PEFT's."""
    prefix, full = prompts
    config = ServerConfig(dtype="float32", model=str(tiny_llama), max_batch_size=8, max_tokens_per_step=32,
                          max_model_len=96, default_max_new_tokens=MAX_NEW, kv_block_size=BLOCK,
                          adapters=(("attn-r4", str(tiny_adapters["attn-r4"])),))
    built = build_engine(config)
    engine = built.engine
    try:
        async def main():
            streams = [engine.submit(GenerationRequest(f"r{i}", tuple(p), SamplingParams(MAX_NEW, ignore_eos=True),
                                                       "attn-r4")) for i, p in enumerate(full)]
            engine.start()  # everything is queued before the first step

            async def collect(stream):
                return [ev async for ev in stream]
            return await asyncio.gather(*map(collect, streams))

        outs = asyncio.run(main())
        expected = peft_generate(tiny_llama, tiny_adapters["attn-r4"], full, MAX_NEW, eos_token_id=None)
        assert [[ev.token_id for ev in events] for events in outs] == expected
        assert sorted(events[-1].cached_prompt_tokens for events in outs) == [0] + [24] * (len(full) - 1)
        assert_idle(engine)
    finally:
        engine.stop()


def test_a_request_preempted_for_pages_is_not_admitted_again_before_the_adapter_it_made_room_for_lands(
        tiny_llama, tiny_adapters):
    """--scheduling priority, the device pages full: the request of priority -1 preempts one of
    priority 3 for its adapter's pages, but its read has already begun to land in host memory, so
    no pages can be reserved for it this step. Until they are, the preempted request must not pin
    its adapter again (it would hold the very pages the preemption freed, and be preempted a second
    time once the read lands): one preemption, and every stream is PEFT's."""
    rng = random.Random(5)
    prompts = {rid: [rng.randrange(3, 300) for _ in range(20)] for rid in JOBS}
    served = {name: tiny_adapters[name] for name, _, _ in JOBS.values()}
    built = make(tiny_llama, served, scheduling="priority", **LIMITS["device pages"])
    engine, manager = built.engine, built.engine.adapters
    landing, staged = threading.Event(), threading.Event()
    host_copy, stage = manager._host_copy, manager.stage

    def slow_host_copy(weights):  # the read is landing: hold it there until the engine has staged
        landing.set()
        staged.wait(5)
        time.sleep(0.3)  # the engine runs many steps meanwhile (the whole of low1's, maybe)
        return host_copy(weights)

    def stage_after_landing(key, *args, **kwargs):
        if key[0] == "regex-mlp-r8" and not staged.is_set():
            landing.wait(5)
            try:
                return stage(key, *args, **kwargs)
            finally:
                staged.set()
        return stage(key, *args, **kwargs)

    manager._host_copy, manager.stage = slow_host_copy, stage_after_landing
    try:
        finished, tokens = run_lows_then_high(engine, prompts)
        assert landing.is_set() and staged.is_set()
        assert engine.num_preemptions == 1, finished
        assert_peft(tiny_llama, tiny_adapters, prompts, tokens)
        assert_idle(engine)
    finally:
        built.engine.stop()
