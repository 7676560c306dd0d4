"""Failure isolation inside the engine, through its Python API: per-request faults after the
forward pass, stalled consumers, delivery accounting for drain, adapter I/O failures and timeouts,
and the fatal path."""

import asyncio
import logging
import threading
import time

import pytest
import torch

from loramux.adapters.errors import AdapterLoadFailed, AdapterLoadTimeout
from loramux.adapters.loader import LoRAWeights
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import EngineObserver, InjectedFatalFault
from loramux.server.errors import EngineUnavailable, RequestCancelled, RequestFailed, status_name
from loramux.server.requests import GenerationRequest, SamplingParams

PROMPT = (10, 20, 30, 40, 50)


def make(tiny_llama, tiny_adapters, **kw):
    config = ServerConfig(model=str(tiny_llama), max_batch_size=8, max_tokens_per_step=32, max_model_len=128,
                          default_max_new_tokens=16, max_queued_requests=64,
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()), **kw)
    built = build_engine(config)
    built.engine.start()
    return built


def req(rid, n=8, adapter=None, **params):
    return GenerationRequest(rid, PROMPT, SamplingParams(n, ignore_eos=True, **params), adapter)


async def outcome(engine, r):
    try:
        return [ev.token_id async for ev in engine.submit(r)]
    except Exception as e:  # noqa: BLE001 - the tests look at each request's own failure
        return e


def run_all(engine, reqs):
    async def main():
        return await asyncio.gather(*(outcome(engine, r) for r in reqs))
    return asyncio.run(main())


def idle(engine):
    return engine.counts() == (0, 0) and engine.num_in_flight == 0 and not engine.adapters.pool.pinned() \
        and engine.blocks.num_held == 0


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_adapters):
    b = make(tiny_llama, tiny_adapters)
    yield b
    b.engine.stop()


def test_a_failure_after_the_forward_pass_fails_that_request_alone(built, monkeypatch):
    """Sampling, detokenizing and stop checks run per request: a fault in any of them is that
    request's INTERNAL error, and the others in the same step finish exact."""
    engine = built.engine
    expected = run_all(engine, [req(f"ok{i}", adapter=a) for i, a in enumerate([None, "attn-r4", "all-r8"])])
    original = engine.tokenizer.decode

    def decode(ids, **kw):  # the detokenizer of one request breaks
        if threading.current_thread().name == "engine" and ids and ids[-1] == 99999:
            raise UnicodeError("broken decode")
        return original(ids, **kw)

    import loramux.server.engine as engine_module

    real_sample = engine_module.sample

    def sample(logits, states, *rows):  # ... and the sampler of another hits a NaN row
        out = real_sample(logits, states, *rows)
        for i, state in enumerate(states):
            if state.params.seed == 7:
                out[i] = 99999
            if state.params.seed == 8:
                out[i] = FloatingPointError("nan in sampling")
        return out

    monkeypatch.setattr(engine.tokenizer, "decode", decode)
    monkeypatch.setattr(engine_module, "sample", sample)
    bad = [req("bad-detok", seed=7), req("bad-sample", seed=8)]
    got = run_all(engine, [*bad, *(req(f"ok{i}", adapter=a) for i, a in enumerate([None, "attn-r4", "all-r8"]))])
    assert all(isinstance(e, RequestFailed) and status_name(e) == "INTERNAL" for e in got[:2])
    assert "nan in sampling" in str(got[1])
    assert got[2:] == expected
    assert idle(engine) and engine.fatal_error is None


def test_a_stalled_consumer_is_cancelled_and_frees_its_place(tiny_llama, tiny_adapters):
    # the stall timeout well under 120 tokens' generation: about 50 ms on a fast CPU (an AMD Zen 5)
    b = make(tiny_llama, tiny_adapters, stream_stall_timeout=0.01)
    engine = b.engine

    async def main():
        stream = engine.submit(req("stalled", n=120))
        while engine.num_in_flight:  # never reads; a loop that blocks still lets the engine cancel it
            time.sleep(0.01)
        events = 0
        with pytest.raises(RequestCancelled, match="--stream-stall-timeout"):
            async for _ in stream:
                events += 1
        return events

    try:
        events = asyncio.run(main())
        assert 0 < events < 119  # cut short, not generated to the end
        assert idle(engine)
    finally:
        engine.stop()


def test_delivery_is_counted_until_the_caller_takes_the_last_event(built):
    """Drain waits on num_undelivered: generation can end long before the caller has read it."""
    engine = built.engine

    async def main():
        stream = engine.submit(req("slow-reader", n=6))
        while engine.num_in_flight:  # generated completely, nothing read yet
            await asyncio.sleep(0.01)
        assert engine.num_undelivered == 1
        events = [ev async for ev in stream]
        assert engine.num_undelivered == 0
        return events

    assert len(asyncio.run(main())) == 6
    assert engine.num_undelivered == 0


def test_a_failed_device_copy_fails_its_waiters_and_the_next_request_succeeds(tiny_llama, tiny_adapters, caplog):
    b = make(tiny_llama, tiny_adapters)
    pool, calls = b.manager.pool, []

    class Exploding:  # a tensor whose copy into the pages fails (by torch ops: .to; by the C++ row copy: .contiguous)
        def to(self, *args, **kwargs):
            raise RuntimeError("device copy failed")

        contiguous = to

    def failing(fill):
        def failing_fill(key, pages, weights, *convert):
            calls.append(key)
            if len(calls) == 1 and convert:  # a file converted straight into its pages: the conversion fails
                convert = (Exploding().to,)
            elif len(calls) == 1:  # fails inside the pool's copy, as a real device error would
                weights = LoRAWeights(weights.rank, {k: Exploding() for k in weights.a}, weights.b)
            return fill(key, pages, weights, *convert)
        return failing_fill

    pool.fill, pool.convert_into = failing(pool.fill), failing(pool.convert_into)
    try:
        t0 = time.monotonic()
        first = run_all(b.engine, [req("cold", adapter="attn-r64")])[0]
        assert time.monotonic() - t0 < 10  # answered, not retried forever
        assert isinstance(first, AdapterLoadFailed) and status_name(first) == "INTERNAL"
        assert "device copy failed" in str(first) and "device copy failed" in caplog.text
        again = run_all(b.engine, [req("retry", adapter="attn-r64")])[0]
        assert isinstance(again, list) and len(again) == 8
        assert idle(b.engine)
    finally:
        b.engine.stop()


@pytest.mark.usefixtures("openmp_team")
def test_a_hung_disk_read_times_out_and_later_reads_still_run(tiny_llama, tiny_adapters, monkeypatch):
    import loramux.adapters.manager as manager_module

    release = threading.Event()

    def hanging(read):
        def hung_read(path, *args, **kw):
            if path.name == "attn-r64":
                release.wait(30)  # a disk that does not answer
            return read(path, *args, **kw)
        return hung_read

    for name in ("load_adapter", "decode_adapter"):  # a load into a host copy, or one straight into pages
        monkeypatch.setattr(manager_module, name, hanging(getattr(manager_module, name)))
    b = make(tiny_llama, tiny_adapters, adapter_read_timeout=1.0)
    threads = []  # the engine's OpenMP threads at a fused linear: a hung read must not keep a core
    b.engine.runner.model.layers[0].lora_modules()[0].register_forward_hook(
        lambda *_: threads.append(torch.get_num_threads()))
    try:
        t0 = time.monotonic()
        hung, other = run_all(b.engine, [req("hung", adapter="attn-r64"), req("other", adapter="all-r16-rslora")])
        assert time.monotonic() - t0 < 10
        assert isinstance(hung, AdapterLoadTimeout) and "--adapter-read-timeout" in str(hung)
        assert status_name(hung) == "UNAVAILABLE"
        assert isinstance(other, list) and len(other) == 8  # read by the fresh I/O thread
        assert idle(b.engine)
        assert threads and set(threads) == {torch.get_num_threads()}
    finally:
        release.set()
        b.engine.stop()


def test_the_fatal_path_answers_everyone_even_when_finishing_one_fails(tiny_llama, tiny_adapters):
    b = make(tiny_llama, tiny_adapters)
    engine = b.engine

    class Flaky(EngineObserver):
        def finish(self, seq, status, error, timing):
            if seq.request.request_id == "r0":
                raise RuntimeError("observer broke")

    def hook(seq):
        if seq.request.request_id == "boom" and seq.num_generated >= 1:
            raise InjectedFatalFault("boom")

    engine.observers.append(Flaky())
    engine.output.fault_hook = hook
    try:
        async def main():
            others = [asyncio.create_task(outcome(engine, req(f"r{i}", n=100))) for i in range(4)]
            await asyncio.sleep(0.05)
            boom = await asyncio.wait_for(outcome(engine, req("boom", n=100)), 20)
            done = await asyncio.wait_for(asyncio.gather(*others), 20)
            late = []  # submits racing the dead engine: refused, never left waiting
            for i in range(20):
                try:
                    late.append(await asyncio.wait_for(outcome(engine, req(f"late{i}")), 5))
                except EngineUnavailable as e:
                    late.append(e)
            return boom, done, late

        boom, done, late = asyncio.run(main())
        assert isinstance(boom, RequestFailed)
        assert all(isinstance(r, RequestFailed) for r in done)
        assert all(isinstance(r, (EngineUnavailable, RequestFailed)) for r in late)
        assert engine.num_in_flight == 0
    finally:
        engine.stop()


def test_submit_after_the_inbox_closes_is_refused(built):
    """The race itself, made deterministic: once the fatal path has closed the inbox, submit
    refuses instead of queueing into an inbox that nobody will read."""
    engine = built.engine
    with engine._inbox_lock:
        engine._closed = True
    try:
        async def main():
            with pytest.raises(EngineUnavailable):
                engine.submit(req("late"))
        asyncio.run(main())
        assert engine.num_in_flight == 0 and engine.num_undelivered == 0
    finally:
        with engine._inbox_lock:
            engine._closed = False


def test_a_request_still_in_the_inbox_counts_as_waiting(tiny_llama, tiny_adapters):
    """Submitted but not yet taken in by the step loop, a request is waiting (the gauges, its
    adapter among the waiting ones, and what a test's wait for idle reads): (0, 0) never shows
    while a request is on its way."""
    config = ServerConfig(model=str(tiny_llama), max_model_len=128, default_max_new_tokens=16,
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine  # never started: this thread turns the step loop
    try:
        async def main():
            stream = engine.submit(req("early", n=4))
            cold = engine.submit(req("cold", n=4, adapter="attn-r4"))
            assert engine.counts() == (0, 2) and engine.adapter_ids() == (set(), {"attn-r4"})
            cold.cancel()
            engine.run_once()
            assert engine.counts() == (1, 0) and engine.adapter_ids() == (set(), set())
            stream.cancel()
            assert engine.counts() == (1, 0)  # its cancel is in the inbox too
            engine.run_once()
            assert engine.counts() == (0, 0) and engine.num_in_flight == 0
            for cancelled in (stream, cold):
                with pytest.raises(RequestCancelled):
                    [ev async for ev in cancelled]
        asyncio.run(main())
    finally:
        engine.stop()


def test_a_fault_between_the_inbox_and_the_queue_still_answers_that_request(tiny_llama, tiny_adapters, monkeypatch):
    """The fatal path fails the requests it knows of, those still arriving included: one the step
    loop had taken from the inbox but not yet queued when the fault struck is answered too, as is
    the one behind it in the inbox (each once)."""
    config = ServerConfig(model=str(tiny_llama), max_model_len=128, default_max_new_tokens=16,
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine

    def join(seq):
        raise InjectedFatalFault("joining broke")

    monkeypatch.setattr(engine, "_join", join)
    try:
        async def main():
            streams = [engine.submit(req(f"r{i}", n=4)) for i in range(2)]  # in the inbox: not started yet
            engine.start()
            return await asyncio.wait_for(asyncio.gather(*(outcome_of(s) for s in streams)), 20)

        async def outcome_of(stream):
            try:
                return [ev.token_id async for ev in stream]
            except Exception as e:  # noqa: BLE001
                return e

        assert [type(r) for r in asyncio.run(main())] == [RequestFailed, RequestFailed]
        assert engine.num_in_flight == 0 and engine.counts() == (0, 0)
    finally:
        engine.stop()


def test_a_stopped_engine_and_its_pools_are_freed_without_a_garbage_collection(tiny_llama, tiny_adapters):
    """Dropped once stopped, an engine's KV pool, adapter pages and host tier go at once: none sits
    in a reference cycle until a collection runs (a benchmark building one engine after another
    held 11 GB where it needed 4). An unregistered adapter's copies still go (the registry's
    weak call into the manager)."""
    import gc
    import weakref

    config = ServerConfig(model=str(tiny_llama), max_model_len=128, default_max_new_tokens=16,
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    built = build_engine(config)
    built.engine.start()
    assert len(run_all(built.engine, [req("a", adapter="attn-r4"), req("b", adapter="all-r8")])[0]) == 8
    built.engine.stop()
    key = built.registry.get("attn-r4").key
    assert built.manager.tier(key) == "device"
    built.registry.unregister("attn-r4")
    built.manager.drop_retired(needed=())
    assert built.manager.tier(key) == "disk"
    m = built.manager
    parts = {"engine": built.engine, "kv": built.engine.runner.kv, "registry": built.registry, "manager": m,
             "pool": m.pool, "host": m.host}
    refs = {name: weakref.ref(part) for name, part in parts.items()}
    enabled = gc.isenabled()
    gc.disable()  # before the last references go: only reference counting may free them
    try:
        del built, m, parts
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("direct", [True, False], ids=["into-pages", "via-host-copy"])
def test_nan_weights_found_as_a_load_lands_fail_their_requests_and_free_their_pages(direct, tiny_llama,
                                                                                    tiny_adapters, tmp_path, caplog):
    """Without --adapter-cache-dir a CPU load with room in the pool is converted straight into its
    pages (the C++ convert_to_pages), or else into a flat copy first: either way a NaN found then
    fails the adapter's requests with FAILED_PRECONDITION naming the module (a warning, no
    traceback: the adapter's fault), and its pages go back, while a request for another adapter in
    the same batch finishes."""
    from safetensors.torch import load_file, save_file

    from loramux.server.ops.cpu_kernel import load_kernels

    if direct and load_kernels() is None:
        pytest.skip("the C++ kernel needs a compiler")
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tiny_adapters["attn-r4"] / "adapter_config.json").read_text())
    tensors = load_file(tiny_adapters["attn-r4"] / "adapter_model.safetensors")
    save_file({k: v * float("nan") if "lora_B" in k else v for k, v in tensors.items()},
              bad / "adapter_model.safetensors")
    b = make(tiny_llama, {"nan": bad, "all-r8": tiny_adapters["all-r8"]})
    pool, converted = b.manager.pool, []
    if not direct:
        b.manager.convert_to_pages = None
    pool.convert_into = (lambda into: lambda *args: converted.append(args[0]) or into(*args))(pool.convert_into)
    try:
        bad_out, good = run_all(b.engine, [req("bad", adapter="nan"), req("good", adapter="all-r8")])
        assert isinstance(good, list) and len(good) == 8
        assert isinstance(bad_out, Exception) and status_name(bad_out) == "FAILED_PRECONDITION"
        assert "has NaN or Inf weights once scaled" in str(bad_out) and "self_attn" in str(bad_out)
        assert idle(b.engine)
        assert sorted(k[0] for k in converted) == (["all-r8", "nan"] if direct else [])
        assert "adapter nan cannot be loaded: module" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert all(k[0] != "nan" for k in pool.resident_keys)
        assert pool.free_pages + sum(pool.pages_of(k).numel() for k in pool.resident_keys) == pool.num_pages
    finally:
        b.engine.stop()
