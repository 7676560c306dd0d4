"""Paged KV with prefix caching and preemption, token for token against PEFT (greedy, float32, CPU):
hits on a shared prefix, no reuse across weights, an adapter replaced under load, and a pool small
enough to force preemptions."""

import asyncio
import random

import pytest

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import build_adapter, peft_generate

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


def test_a_pool_smaller_than_one_request_is_refused_at_start_up():
    with pytest.raises(ValueError, match=r"kv-cache-tokens \(95\) must be >= max-model-len \(96\)"):
        ServerConfig(max_model_len=96, default_max_new_tokens=8, kv_cache_tokens=95)
