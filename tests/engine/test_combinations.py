"""Adapters registered as weighted combinations of others (ranks side by side), token for token
against PEFT's add_weighted_adapter(combination_type="cat"), in one batch with their parts; and
the refusals that name what is wrong."""

import asyncio

import pytest

from loramux.adapters.errors import AdapterNotFound
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import ADAPTER_VARIANTS, peft_cat_generate

MAX_NEW = 12
PROMPTS = [[5, 17, 33, 8, 90, 4], [44, 2, 71, 19], [120, 7, 7, 56, 3, 99, 14], [61, 25]]


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_adapters):
    config = ServerConfig(model=str(tiny_llama), max_batch_size=8, max_tokens_per_step=16, max_model_len=96,
                          default_max_new_tokens=MAX_NEW, max_lora_rank=64, max_device_adapters=4,
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    b = build_engine(config)
    b.engine.start()
    yield b
    b.engine.stop()


def peft_cat(tiny_llama, tiny_adapters, parts, prompts):
    return peft_cat_generate(tiny_llama, tiny_adapters, parts, prompts, MAX_NEW)


def run(engine, jobs):
    async def main():
        async def one(i, adapter, prompt):
            await asyncio.sleep(0.01 * i)  # joins a running batch
            req = GenerationRequest(f"c{i}", tuple(prompt), SamplingParams(MAX_NEW, ignore_eos=True), adapter)
            return [ev.token_id async for ev in engine.submit(req)]
        return await asyncio.gather(*(one(i, a, p) for i, (a, p) in enumerate(jobs)))
    return asyncio.run(main())


@pytest.mark.parametrize("parts", [
    [("attn-r4", 0.7), ("all-r8", -0.4)],  # different targets: each adds zero rows where it has none
    [("all-r8", 1.0), ("all-r16-rslora", 0.5), ("pattern-r16", -1.5)],  # rsLoRA, rank and alpha patterns
], ids=["two", "three"])
def test_a_combination_equals_peft_cat_in_a_batch_with_its_parts(built, tiny_llama, tiny_adapters, parts):
    name = "mix-" + "-".join(p for p, _ in parts)
    entry = built.registry.register_combination(name, parts, on_commit=built.manager.on_register)
    assert entry.manifest.rank == sum(ADAPTER_VARIANTS[p]["r"] for p, _ in parts)  # each its largest rank
    jobs = [(name, PROMPTS[0]), (parts[0][0], PROMPTS[1]), (name, PROMPTS[2]), (None, PROMPTS[3]),
            (parts[1][0], PROMPTS[0])]
    outs = run(built.engine, jobs)
    expected = peft_cat(tiny_llama, tiny_adapters, parts, [PROMPTS[0], PROMPTS[2]])
    assert [outs[0], outs[2]] == expected
    from helpers import peft_generate
    assert outs[1] == peft_generate(tiny_llama, tiny_adapters[parts[0][0]], [PROMPTS[1]], MAX_NEW,
                                    eos_token_id=None)[0]
    assert outs[0] != outs[4]  # the combination is not its parts
    assert built.engine.counts() == (0, 0) and not built.manager.pool.pinned()


def test_a_combination_outlives_its_parts_being_replaced(built, tiny_adapters):
    """Registered as its parts were: replacing a part (new weights) leaves it as it was, also when
    it is read from disk again after an eviction."""
    frozen = built.registry.register_combination("frozen", [("attn-r4", 1.0)], on_commit=built.manager.on_register)
    before = run(built.engine, [("frozen", PROMPTS[0])])[0]
    built.registry.register("attn-r4", tiny_adapters["all-r8"], replace=True, trusted=True)
    try:
        built.manager.pool.evict(frozen.key)  # idle (no pins): its next request reads its parts' files
        assert built.manager.tier(frozen.key) == "disk"
        assert run(built.engine, [("frozen", PROMPTS[0])])[0] == before
        assert run(built.engine, [("attn-r4", PROMPTS[0])])[0] != before
    finally:
        built.registry.register("attn-r4", tiny_adapters["attn-r4"], replace=True, trusted=True)


def test_a_sum_a_request_names_is_one_dynamic_adapter_until_a_part_changes(built, tiny_adapters):
    """Registry.combination_for: the same parts in any order, and weights equal in float32, are one
    dynamic registration named by ids, versions and weights; a part registered again makes another,
    served with the new part; the sums are what evict_lru_dynamic may take, unless in use or held."""
    import struct

    f32 = struct.unpack("f", struct.pack("f", 0.7))[0]  # 0.699999988..., gRPC's float 0.7
    claimed = []
    first, new = built.registry.combination_for([("attn-r4", 0.7), ("all-r8", -0.25)], claimed.append)
    again, renew = built.registry.combination_for([("all-r8", -0.25), ("attn-r4", f32)], claimed.append)
    assert claimed == [first.adapter_id] * 2  # its id given to the caller under the lock, found or new
    v4, v8 = built.registry.get("attn-r4").version, built.registry.get("all-r8").version
    assert (new, renew, again) == (True, False, first) and first.dynamic
    assert first.adapter_id == f"all-r8@{v8}*-0.25+attn-r4@{v4}*0.7"
    assert [(e.adapter_id, w) for e, w in first.combine] == [("all-r8", -0.25), ("attn-r4", 0.7)]
    before = run(built.engine, [(first.adapter_id, PROMPTS[0])])[0]
    built.registry.register("attn-r4", tiny_adapters["all-r16-rslora"], replace=True, trusted=True)
    try:
        other, new = built.registry.combination_for([("attn-r4", 0.7), ("all-r8", -0.25)])
        assert new and other.adapter_id != first.adapter_id and other.manifest.rank == 16 + 8
        assert run(built.engine, [(other.adapter_id, PROMPTS[0])])[0] != before
        assert run(built.engine, [(first.adapter_id, PROMPTS[0])])[0] == before  # as its parts were
        assert built.registry.evict_lru_dynamic({other.adapter_id}, held=lambda: {first.adapter_id}) is None
        evicted = {built.registry.evict_lru_dynamic(set()).adapter_id for _ in range(2)}
        assert evicted == {first.adapter_id, other.adapter_id} and built.registry.evict_lru_dynamic(set()) is None
    finally:
        built.registry.register("attn-r4", tiny_adapters["attn-r4"], replace=True, trusted=True)


@pytest.mark.parametrize("parts, error, message", [
    ([], ValueError, "at least one"),
    ([("attn-r4", 1.0), ("attn-r4", 2.0)], ValueError, "each adapter once"),
    ([("attn-r4", float("nan"))], ValueError, "must be finite"),
    ([("nope", 1.0)], AdapterNotFound, "nope"),
    ([("attn-r64", 1.0), ("all-r8", 1.0)], ValueError, "rank is 72 .* --max-lora-rank is 64"),
])
def test_bad_combinations_are_refused_naming_the_problem(built, parts, error, message):
    with pytest.raises(error, match=message):
        built.registry.register_combination("bad", parts)
    assert "bad" not in built.registry


def test_a_combination_of_a_combination_is_refused(built):
    built.registry.register_combination("inner", [("attn-r4", 1.0)])
    with pytest.raises(ValueError, match="combination itself"):
        built.registry.register_combination("outer", [("inner", 1.0)])


def test_start_up_combinations_register_and_can_be_kept_resident(tiny_llama, tiny_adapters):
    """--combine registers after the start-up adapters; --keep-resident takes it like any other;
    a combination of an unknown adapter stops the start-up, naming it."""
    from loramux.server.config import StartupError

    adapters = tuple((n, str(tiny_adapters[n])) for n in ("attn-r4", "all-r8"))
    config = ServerConfig(model=str(tiny_llama), max_model_len=96, default_max_new_tokens=MAX_NEW, max_lora_rank=16,
                          adapters=adapters, combinations=(("mix", (("attn-r4", 0.7), ("all-r8", -0.4))),),
                          keep_resident=("mix",))
    b = build_engine(config)
    b.engine.start()
    try:
        entry = b.registry.get("mix")
        assert entry.manifest.rank == 12 and entry.keep_resident
        assert [(p.adapter_id, w) for p, w in entry.combine] == [("attn-r4", 0.7), ("all-r8", -0.4)]
        out = run(b.engine, [("mix", PROMPTS[0])])[0]
        assert len(out) == MAX_NEW and entry.key in b.manager.pool.resident_keys
    finally:
        b.engine.stop()
    with pytest.raises(StartupError, match="--combine 'bad': 'nope' is not a start-up adapter"):
        build_engine(ServerConfig(**{**config.__dict__, "combinations": (("bad", (("nope", 1.0),)),),
                                     "keep_resident": ()}))
