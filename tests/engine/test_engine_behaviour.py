"""Engine behaviour through its Python API: seeds, stops, EOS, cancellation, validation."""

import asyncio
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from loramux.adapters.errors import AdapterNotFound
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import Engine, EngineObserver
from loramux.server.errors import QueueFull, RequestCancelled, RequestInvalid
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams

PROMPT = (10, 20, 30, 40, 50)


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_adapters):
    config = ServerConfig(model=str(tiny_llama), max_batch_size=8, max_tokens_per_step=32, max_model_len=128, default_max_new_tokens=16,
                          max_queued_requests=16, adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    b = build_engine(config)
    b.engine.start()
    yield b
    b.engine.stop()


def collect(engine, *reqs):
    async def main():
        async def one(r):
            return [ev async for ev in engine.submit(r)]
        return await asyncio.gather(*(one(r) for r in reqs))
    return asyncio.run(main())


def req(rid, params, adapter=None, prompt=PROMPT):
    return GenerationRequest(rid, tuple(prompt), params, adapter)


def test_same_seed_same_tokens_whatever_the_batch(built):
    params = SamplingParams(12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = collect(built.engine, req("a", params, "all-r8"))[0]
    noise = [req(f"n{i}", SamplingParams(12, temperature=1.0, ignore_eos=True), a, prompt=(3 + i,) * (5 + i))
             for i, a in enumerate([None, "attn-r4", "all-r8", "attn-r64"])]
    crowded = collect(built.engine, *noise, req("b", params, "all-r8"))[-1]
    assert [e.token_id for e in alone] == [e.token_id for e in crowded]
    other_seed = collect(built.engine, req("c", SamplingParams(12, temperature=0.9, seed=99, ignore_eos=True), "all-r8"))[0]
    assert [e.token_id for e in other_seed] != [e.token_id for e in alone]


def test_stop_token_ids_and_max_new_tokens(built):
    greedy = collect(built.engine, req("g", SamplingParams(10, ignore_eos=True)))[0]
    ids = [e.token_id for e in greedy]
    assert len(ids) == 10 and greedy[-1].finish_reason is FinishReason.LENGTH and greedy[-1].stop_reason is None
    assert all(e.finish_reason is None for e in greedy[:-1])
    stopped = collect(built.engine, req("s", SamplingParams(10, stop_token_ids=(ids[3],), ignore_eos=True)))[0]
    assert [e.token_id for e in stopped] == ids[: ids.index(ids[3]) + 1]
    assert stopped[-1].finish_reason is FinishReason.STOP and stopped[-1].stop_reason == ids[3]  # vLLM's stop_reason


def test_stop_string_cuts_text_and_is_never_streamed(built):
    events = collect(built.engine, req("t", SamplingParams(24, ignore_eos=True)))[0]
    text = "".join(e.text for e in events)
    stop = text[6:9]
    assert stop and stop in text
    cut = collect(built.engine, req("u", SamplingParams(24, stop=(stop,), ignore_eos=True)))[0]
    got = "".join(e.text for e in cut)
    assert got == text[: text.index(stop)]
    assert cut[-1].finish_reason is FinishReason.STOP and cut[-1].stop_reason == stop
    assert cut[-1].completion_tokens == len(cut)
    # vLLM's include_stop_str_in_output: the earliest stop string found stays, whatever the list's order
    later = text[10:13]
    assert text.index(stop) < text.index(later)
    kept = collect(built.engine, req("k", SamplingParams(24, stop=(later, stop), ignore_eos=True,
                                                         include_stop_str_in_output=True)))[0]
    assert "".join(e.text for e in kept) == text[: text.index(stop) + len(stop)]
    assert kept[-1].finish_reason is FinishReason.STOP and kept[-1].stop_reason == stop  # the one found, not the first
    # two stop strings found at the same place: the longer one is the one kept
    assert text.index(stop[:2]) == text.index(stop)
    longest = collect(built.engine, req("l", SamplingParams(24, stop=(stop[:2], stop), ignore_eos=True,
                                                            include_stop_str_in_output=True)))[0]
    assert "".join(e.text for e in longest) == text[: text.index(stop) + len(stop)] and longest[-1].stop_reason == stop


def test_a_steps_tokens_arrive_after_the_step_is_recorded(built):
    """The engine holds a step's events until its observers have recorded the step: a request that
    ends in its prefill step finds that step recorded when its answer comes, however slow the
    observer (the benchmarks time steps by observers they remove once the answers are in)."""
    import time

    steps = []

    class Slow(EngineObserver):
        def step(self, stats):
            time.sleep(0.05)
            steps.append(stats)

    observer = Slow()
    built.engine.observers.append(observer)
    try:
        events = collect(built.engine, req("p", SamplingParams(1, ignore_eos=True)))[0]
        recorded = list(steps)
    finally:
        built.engine.observers.remove(observer)
    assert len(events) == 1 and events[-1].finish_reason is FinishReason.LENGTH
    assert recorded and recorded[-1].num_prefill_tokens == events[-1].prompt_tokens


def test_eos_ends_the_request_unless_ignored(built, monkeypatch):
    ids = [e.token_id for e in collect(built.engine, req("e", SamplingParams(12, ignore_eos=True)))[0]]
    eos = ids[5]  # a token greedy decoding is known to produce: treat it as EOS
    monkeypatch.setattr(built.engine.vocabularies.base, "eos_token_ids", {eos})
    ended = collect(built.engine, req("e2", SamplingParams(12)))[0]
    assert [e.token_id for e in ended] == ids[: ids.index(eos) + 1]
    assert ended[-1].finish_reason is FinishReason.EOS and ended[-1].stop_reason is None
    ignored = collect(built.engine, req("e3", SamplingParams(12, ignore_eos=True)))[0]
    assert [e.token_id for e in ignored] == ids


def test_min_new_tokens_matches_transformers_and_bans_eos_and_stop_tokens(built, tiny_llama, tiny_adapters,
                                                                          monkeypatch):
    """Until min_new_tokens are out, the stop token and EOS cannot be sampled (transformers'
    MinNewTokensLengthLogitsProcessor); token for token against PEFT, greedy and joined in one
    batch with unconstrained requests."""
    from helpers import peft_generate

    ids = [e.token_id for e in collect(built.engine, req("p", SamplingParams(16, ignore_eos=True), "attn-r4"))[0]]
    stop = ids[2]
    constrained = SamplingParams(16, ignore_eos=True, stop_token_ids=(stop,), min_new_tokens=6)
    got, plain = collect(built.engine, req("mn", constrained, "attn-r4"), req("pl", SamplingParams(16, ignore_eos=True),
                                                                             "attn-r4"))
    expected = peft_generate(tiny_llama, tiny_adapters["attn-r4"], [list(PROMPT)], 16, eos_token_id=stop,
                             min_new_tokens=6)[0]
    tokens = [e.token_id for e in got]
    assert tokens == expected and stop not in tokens[:6] and len(tokens) > 3
    assert [e.token_id for e in plain] == ids
    # EOS is banned the same way, unless ignored (then it is no stop, and nothing is banned)
    monkeypatch.setattr(built.engine.vocabularies.base, "eos_token_ids", {stop})
    eos_banned = collect(built.engine, req("me", SamplingParams(16, min_new_tokens=6), "attn-r4"))[0]
    assert [e.token_id for e in eos_banned] == expected
    assert [e.token_id for e in collect(built.engine, req("mi", SamplingParams(16, ignore_eos=True, min_new_tokens=6),
                                                          "attn-r4"))[0]] == ids
    with pytest.raises(RequestInvalid, match="min_new_tokens"):
        collect(built.engine, req("bad", SamplingParams(4, min_new_tokens=5)))


def written_word(tokenizer, vocab: int, ids: list[int], width: int, avoid: tuple[int, ...]) -> tuple[str, tuple]:
    """A word that ``ids`` (greedy output) writes as ``width`` of its tokens, one of the word's
    tokenizations (bad_words.tokenize), whose prefix is not ``avoid``'s tail: transformers'
    bad_words_ids also look into the prompt, vLLM's (and ours) do not."""
    from loramux.server import bad_words

    for i in range(1, len(ids) - width):
        word = tokenizer.decode(ids[i : i + width])
        variants = bad_words.tokenize(tokenizer, (word,), vocab)
        spans = [v.prefix + (v.last,) for v in variants]
        if word.strip() and tuple(ids[i : i + width]) in spans and all(
                not v.prefix or avoid[-len(v.prefix):] != v.prefix for v in variants):
            return word, tuple(spans)
    raise AssertionError(f"no {width}-token word in {ids}")


def test_bad_words_match_transformers_bad_words_ids(built, tiny_llama, tiny_adapters):
    """vLLM's bad_words: each word's tokenizations (as written and after a space) are never
    completed. Greedy, token for token against PEFT's generate given the same tokenizations as
    bad_words_ids, beside free requests in one batch; a one-token word is banned outright, even
    against a +100 logit bias; bad entries are refused, naming the limit."""
    from helpers import peft_generate

    engine, tok = built.engine, built.tokenizer
    free = [e.token_id for e in collect(engine, req("bw0", SamplingParams(16, ignore_eos=True), "attn-r4"))[0]]
    two, two_spans = written_word(tok, engine.vocab_size, free, 2, PROMPT)
    one, one_spans = written_word(tok, engine.vocab_size, free, 1, PROMPT)
    for words, spans in (((two,), two_spans), ((two, one), two_spans + one_spans)):
        got, plain = collect(engine, req("bw", SamplingParams(16, ignore_eos=True, bad_words=words), "attn-r4"),
                             req("bwp", SamplingParams(16, ignore_eos=True), "attn-r4"))
        tokens = [e.token_id for e in got]
        expected = peft_generate(tiny_llama, tiny_adapters["attn-r4"], [list(PROMPT)], 16, eos_token_id=None,
                                 bad_words_ids=[list(s) for s in spans])[0]
        assert tokens == expected and tokens != free and [e.token_id for e in plain] == free
        assert not any(tuple(tokens[i : i + len(s)]) == s for s in spans for i in range(len(tokens)))
    (banned,) = {s[0] for s in one_spans if len(s) == 1} or {None}
    biased = SamplingParams(6, ignore_eos=True, logit_bias=((banned, 100.0),))
    assert [e.token_id for e in collect(engine, req("bb", biased))[0]] == [banned] * 6
    for seed in range(3):  # sampled rows too
        sampled = replace(biased, temperature=1.5, seed=seed, bad_words=(one,))
        assert banned not in [e.token_id for e in collect(engine, req("bs", sampled))[0]]
    for words, needle in (((" ",), "not all spaces"), (("x" * 257,), "1 to 256 characters"),
                          (("a",) * 129, "bad_words has 129 entries; the limit is 128")):
        with pytest.raises(RequestInvalid, match=needle):
            collect(engine, req("bad", SamplingParams(4, bad_words=words)))


def test_usage_and_timing_on_the_last_event(built):
    events = collect(built.engine, req("m", SamplingParams(5, ignore_eos=True), "attn-r4"))[0]
    last = events[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (len(PROMPT), 5)
    t = last.timing
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds


def test_cancel_frees_slot_and_pin_within_one_step(built):
    engine = built.engine
    steps = []
    recorder = EngineObserver()
    recorder.step = steps.append

    async def main():
        stream = engine.submit(req("x", SamplingParams(100, ignore_eos=True), "all-r16-rslora"))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                engine.observers.append(recorder)
                stream.cancel()
        return got

    with pytest.raises(RequestCancelled):
        asyncio.run(main())
    engine.observers.remove(recorder)
    assert len(steps) <= 1  # freed at the next loop turn: at most the step already under way
    assert engine.counts() == (0, 0)
    engine.blocks.check()
    assert engine.blocks.num_held == 0 and engine.blocks.usage() == 0
    assert not engine.adapters.pool.pinned()


@pytest.mark.parametrize("params, prompt, match", [
    (SamplingParams(10), (), "empty"),
    (SamplingParams(10), (10**6,), "vocabulary"),
    (SamplingParams(0), PROMPT, "max_new_tokens"),
    (SamplingParams(126), PROMPT, "max_model_len 128"),
    (SamplingParams(5, temperature=float("nan")), PROMPT, "temperature"),
    (SamplingParams(5, temperature=101.0), PROMPT, "temperature"),
    (SamplingParams(5, top_p=0.0), PROMPT, "top_p"),
    (SamplingParams(5, min_p=float("nan")), PROMPT, "min_p"),
    (SamplingParams(5, min_p=-0.5), PROMPT, r"min_p must be in \[0, 1\], got -0.5"),
    (SamplingParams(5, repetition_penalty=0.0), PROMPT, "repetition_penalty"),
    (SamplingParams(5, stop=("",)), PROMPT, "stop strings"),
    (SamplingParams(5, stop=("a",) * 9), PROMPT, "limit is 8"),
])
def test_invalid_requests_are_refused_before_any_work(built, params, prompt, match):
    with pytest.raises(RequestInvalid, match=match):
        built.engine.validate(GenerationRequest("v", prompt, params))


def test_a_priority_is_refused_unless_the_server_schedules_by_priority(built):
    assert built.engine.config.scheduling == "fair"
    built.engine.validate(GenerationRequest("p", PROMPT, SamplingParams(5), priority=0))
    with pytest.raises(RequestInvalid, match=r"priority 2 is served only with --scheduling priority; this server "
                                             r"schedules by 'fair'"):
        built.engine.validate(GenerationRequest("p", PROMPT, SamplingParams(5), priority=2))


def test_a_default_max_new_tokens_fits_the_context_and_the_kv_cache(built):
    """A request that left max_new_tokens to the server gets the default, shrunk to what
    max_model_len and the KV pool leave after its prompt (at least 1, which validate then refuses
    when even that does not fit); one the client set is never changed."""
    def fitted(engine, n, max_new=16, fit=True):
        r = Engine.fitted(engine, GenerationRequest("f", (7,) * n, SamplingParams(max_new, fit_max_new_tokens=fit)))
        assert not r.sampling.fit_max_new_tokens
        return r.sampling.max_new_tokens
    assert [fitted(built.engine, n) for n in (5, 112, 120, 127, 200)] == [16, 16, 8, 1, 1]
    assert fitted(built.engine, 120, fit=False) == 16
    events = collect(built.engine, req("long", SamplingParams(16, ignore_eos=True, fit_max_new_tokens=True),
                                       prompt=(7,) * 120))[0]
    assert len(events) == 8 and events[-1].finish_reason is FinishReason.LENGTH
    # a pool smaller than max_model_len (a GPU sized from its free memory): the pool is the bound
    small_pool = SimpleNamespace(config=built.engine.config, blocks=SimpleNamespace(num_blocks=4, block_size=16))
    assert [fitted(small_pool, n) for n in (40, 50, 64)] == [16, 14, 1]


def test_queue_bound_is_atomic(built):
    engine = built.engine

    async def main():
        streams, refused = [], 0
        for i in range(40):
            try:
                streams.append(engine.submit(req(f"q{i}", SamplingParams(4, ignore_eos=True))))
            except QueueFull as e:
                assert "16" in str(e)
                refused += 1
        for s in streams:
            async for _ in s:
                pass
        return len(streams), refused

    accepted, refused = asyncio.run(main())
    assert (accepted, refused) == (16, 24)
    assert engine.num_in_flight == 0


def test_deadline_expires_while_queued(tiny_llama):
    import time

    from loramux.server.errors import RequestDeadlineExceeded

    built = build_engine(ServerConfig(model=str(tiny_llama), max_batch_size=1, max_model_len=256, default_max_new_tokens=16))
    built.engine.start()

    async def main():
        long = built.engine.submit(req("long", SamplingParams(200, ignore_eos=True)))
        first = await long.__anext__()  # the only slot is now busy
        queued = built.engine.submit(GenerationRequest("late", PROMPT, SamplingParams(5), None,
                                                       deadline=time.monotonic() + 0.05))
        with pytest.raises(RequestDeadlineExceeded):
            await queued.__anext__()
        rest = [e async for e in long]
        return first, rest

    try:
        first, rest = asyncio.run(main())
    finally:
        built.engine.stop()
    assert len(rest) + 1 == 200


def test_refused_requests_are_not_counted_as_served(built):
    """requests_served counts accepted requests: not those refused for a full queue or an unknown id."""
    engine, entry = built.engine, built.registry.get("attn-r4")

    async def main():
        served_before = entry.requests_served
        streams = [engine.submit(req(f"f{i}", SamplingParams(30, ignore_eos=True))) for i in range(16)]
        with pytest.raises(QueueFull):
            engine.submit(req("over", SamplingParams(4), "attn-r4"))
        assert entry.requests_served == served_before
        for s in streams:
            async for _ in s:
                pass
        with pytest.raises(AdapterNotFound):
            engine.submit(req("nope", SamplingParams(4), "no-such-adapter"))
        assert engine.num_in_flight == 0  # the refused request released its place
        async for _ in engine.submit(req("ok", SamplingParams(2), "attn-r4")):
            pass
        assert entry.requests_served == served_before + 1

    asyncio.run(main())


def test_an_adapter_root_not_there_yet_is_said_at_start_up_and_serves_once_it_is(tiny_llama, tiny_adapters, caplog,
                                                                                   tmp_path):
    """An --adapter-root that is not a folder at start-up (a volume mounted later) does not stop the
    server: a WARNING names it, and adapters are registered from it once it is there."""
    import shutil

    later = tmp_path / "later"
    with caplog.at_level("WARNING", logger="loramux.server.builder"):
        built = build_engine(ServerConfig(model=str(tiny_llama), max_model_len=64, default_max_new_tokens=8,
                                          base_linear="torch", adapter_roots=(str(tmp_path), str(later))))
    assert [r.getMessage() for r in caplog.records] == [
        f"--adapter-root {later} is not a folder (yet): no adapter can be registered from it until it is"]
    shutil.copytree(tiny_adapters["attn-r4"], later / "a")
    try:
        assert built.registry.register("a", later / "a").adapter_id == "a"
    finally:
        built.engine.stop()


def test_base_linear_flag_picks_the_rows_the_kernel_serves(tiny_llama, caplog, tmp_path):
    """--base-linear: auto times both paths at start-up and logs its choice (some subset of the
    counts up to --max-tokens-per-step), kernel takes all of those, torch none; kernel on a model
    the kernel cannot serve is a start-up error that names the flag."""
    from loramux.server.config import StartupError
    from loramux.server.ops.cpu_kernel import load_kernels

    def rows(**kw):
        return build_engine(ServerConfig(model=str(tiny_llama), max_model_len=64, default_max_new_tokens=8,
                                         cache_dir=tmp_path, **kw)).kernel_rows

    assert rows(base_linear="torch") == frozenset()
    if load_kernels() is None:
        with pytest.raises(StartupError, match="--base-linear kernel needs .*kernels not built"):
            rows(base_linear="kernel")
        return
    assert rows(base_linear="kernel", max_tokens_per_step=300) == frozenset(range(1, 301))
    with caplog.at_level("INFO", logger="loramux.server.builder"):
        assert rows(max_tokens_per_step=300) <= frozenset(range(1, 301))
    assert re.search(r"base projections timed at 1-32,40,48,56,64,96,128,192,256,300 rows over \d+ MiB of weights "
                     r"in \d", caplog.text)
    with pytest.raises(StartupError, match="--base-linear kernel needs a float32 model on a CPU .*bfloat16 on cpu"):
        rows(base_linear="kernel", dtype="bfloat16")
    assert rows(dtype="bfloat16") == frozenset()


def test_base_linear_timing_is_kept_between_starts(tiny_llama, caplog, tmp_path):
    """--base-linear auto times once per machine, model and build: a second start takes the kept
    timing (and the same rows); an entry that is damaged, or not of every timed count, is timed
    again and replaced."""
    from loramux.server.ops.cpu_kernel import load_kernels
    from loramux.server.ops.linear import timed_rows

    if load_kernels() is None:
        pytest.skip("the C++ kernels are not built: nothing is timed")

    budget = ServerConfig().max_tokens_per_step  # the most rows a step's projection takes
    TIMED_ROWS = timed_rows(budget)

    def start() -> tuple[frozenset, bool]:
        caplog.clear()
        with caplog.at_level("INFO", logger="loramux.server.builder"):
            rows = build_engine(ServerConfig(model=str(tiny_llama), max_model_len=64, default_max_new_tokens=8,
                                             cache_dir=tmp_path)).kernel_rows
        kept = re.search(r"base projections timed at \S+ rows over \d+ MiB of weights on an earlier start", caplog.text)
        timed = re.search(r"base projections timed at \S+ rows over \d+ MiB of weights in \d", caplog.text)
        assert bool(kept) != bool(timed), caplog.text
        return rows, bool(kept)

    _, kept = start()
    assert not kept
    [entry] = (tmp_path / "timings").glob("base-linear-*.json")
    stored = json.loads(entry.read_text())
    assert sorted(map(int, stored["value"]["timings"])) == sorted(TIMED_ROWS)
    # the kept timings decide the rows: make the kernel win everywhere, and a second start serves it so
    stored["value"]["timings"] = {m: [1.0, 0.5] for m in stored["value"]["timings"]}
    entry.write_text(json.dumps(stored))
    rows, kept = start()
    assert kept and rows == frozenset(range(1, budget + 1))
    for damaged in ("{not json", json.dumps({**stored, "value": {"timings": {"1": [1.0, 0.5]}}}),
                    json.dumps({**stored, "key": {**stored["key"], "torch": ["0.0", 1]}})):
        entry.write_text(damaged)
        _, kept = start()
        assert not kept  # timed again (its rows are this moment's choice) ...
        again = json.loads(entry.read_text())  # ... and the entry replaced by a whole one
        assert again["key"] == stored["key"] and sorted(map(int, again["value"]["timings"])) == sorted(TIMED_ROWS)
        assert again["value"]["timings"] != stored["value"]["timings"]


@pytest.mark.usefixtures("openmp_team")
@pytest.mark.parametrize("flush", [True, False])
def test_the_engine_thread_flushes_subnormals_unless_told_not_to(tiny_llama, flush):
    """--no-flush-denormals keeps them; by default the engine thread and its OpenMP team flush them
    (a probe run inside its steps: every thread of the team takes a part of it)."""
    import torch

    from helpers import SUBNORMAL_ELEMENTS, subnormals_made

    b = build_engine(ServerConfig(model=str(tiny_llama), max_model_len=64, default_max_new_tokens=2,
                                  flush_denormals=flush))
    step, seen = b.engine.runner.step, []

    def probed(items):
        seen.append(subnormals_made())
        return step(items)

    b.engine.runner.step = probed
    b.engine.start()
    try:
        collect(b.engine, req("r", SamplingParams(2, ignore_eos=True)))
    finally:
        b.engine.stop()
    if flush and not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    assert seen and set(seen) == {0 if flush else SUBNORMAL_ELEMENTS}
