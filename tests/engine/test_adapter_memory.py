"""Adapter paging across disk, host and device: small caches give the same tokens as large ones."""

import asyncio
import random
import threading
import time

import pytest
import torch

from loramux.adapters.errors import AdapterInvalid, AdapterNotFound
from loramux.adapters.synthetic import write_random_adapter
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.server.torch_threads import IOCoreShare, openmp_library

from helpers import peft_generate, tiny_layout

NUM_ADAPTERS = 40
MAX_NEW = 8


@pytest.fixture(scope="module")
def many_adapters(tiny_llama, tmp_path_factory):
    layout = tiny_layout(tiny_llama)
    root = tmp_path_factory.mktemp("many")
    ranks = [4, 8, 16]
    return {f"m{i}": write_random_adapter(root / f"m{i}", layout, ranks[i % 3], seed=100 + i, b_scale=0.5)
            for i in range(NUM_ADAPTERS)}


def engine_for(tiny_llama, adapters, device, host, **kw):
    cfg = ServerConfig(model=str(tiny_llama), max_batch_size=16, max_tokens_per_step=64, max_model_len=64, default_max_new_tokens=16,
                       max_device_adapters=device, max_host_adapters=host, max_lora_rank=16,
                       max_queued_requests=512, adapters=tuple((n, str(p)) for n, p in adapters.items()), **kw)
    built = build_engine(cfg)
    built.engine.start()
    return built


async def _generate(engine, reqs):
    async def one(r):
        try:
            return [ev.token_id async for ev in engine.submit(r)]
        except Exception as e:  # noqa: BLE001 - the test inspects per-request failures
            return e
    return await asyncio.gather(*(one(r) for r in reqs))


def generate(engine, reqs):
    return asyncio.run(_generate(engine, reqs))


def workload(n, names, seed=0):
    rng = random.Random(seed)
    return [GenerationRequest(f"w{i}", tuple(rng.randrange(3, 300) for _ in range(rng.randint(3, 12))),
                              SamplingParams(MAX_NEW, ignore_eos=True), rng.choice(names)) for i in range(n)]


@pytest.mark.parametrize("io_threads", [1, 3])
def test_small_caches_page_adapters_with_identical_outputs(io_threads, tiny_llama, many_adapters, tmp_path):
    """The small server keeps converted adapters (--adapter-cache-dir): its reloads read those.
    With three I/O threads (--adapter-io-threads, CUDA's default), reads and copies overlap."""
    reqs = workload(200, [None, *many_adapters])
    big = engine_for(tiny_llama, many_adapters, device=NUM_ADAPTERS, host=NUM_ADAPTERS)
    try:
        expected = generate(big.engine, reqs)
    finally:
        big.engine.stop()
    small = engine_for(tiny_llama, many_adapters, device=4, host=8, adapter_cache_dir=str(tmp_path / "converted"),
                       adapter_io_threads=io_threads)
    threads, counted = set(), small.manager.on_load
    small.manager.on_load = lambda tier, s: (threads.add(threading.current_thread().name), counted and counted(tier, s))
    pool = small.manager.pool
    violations = []
    pool.on_evict = lambda key: violations.append(key) if pool.pin_count(key) else None
    try:
        got = generate(small.engine, reqs)
        counters = small.manager.tier_counters()
    finally:
        small.engine.stop()
    assert got == expected
    assert len(threads) == io_threads  # the reads ran on that many threads
    assert counters["device"].evictions > 0
    assert not any(key in small.manager.host for key in pool.resident_keys)  # CPU tiers are exclusive
    assert counters["device"].reloads <= counters["device"].evictions
    assert counters["host"].misses >= NUM_ADAPTERS  # every adapter was read from disk at least once
    assert len(list((tmp_path / "converted").glob("*.lmxa"))) == NUM_ADAPTERS  # each converted once, kept
    assert violations == []  # no pinned adapter was ever evicted
    assert not pool.pinned()
    # A sample matches PEFT too.
    for r, out in list(zip(reqs, got, strict=True))[:6]:
        ref = peft_generate(tiny_llama, many_adapters.get(r.adapter_id), [list(r.prompt_token_ids)], MAX_NEW,
                            eos_token_id=None)[0]
        assert out == ref


def test_pinned_adapters_are_never_evicted_and_requests_wait_for_pages(tiny_llama, many_adapters):
    """Device room for 2 adapters, 6 adapters wanted at once: the rest wait, none fails."""
    built = engine_for(tiny_llama, many_adapters, device=2, host=4, max_adapters_per_step=2)
    try:
        names = list(many_adapters)[:6]
        reqs = [GenerationRequest(f"p{i}", (5, 6, 7), SamplingParams(MAX_NEW, ignore_eos=True), names[i % 6])
                for i in range(24)]
        pool = built.manager.pool
        violations = []
        pool.on_evict = lambda key: violations.append(key) if pool.pin_count(key) else None
        out = generate(built.engine, reqs)
    finally:
        built.engine.stop()
    assert all(isinstance(o, list) and len(o) == MAX_NEW for o in out)
    assert violations == [] and pool.evictions > 0


def test_corrupted_adapter_fails_only_its_requests(tiny_llama, many_adapters, tmp_path):
    import shutil

    victim = shutil.copytree(many_adapters["m1"], tmp_path / "victim")
    adapters = {**{k: many_adapters[k] for k in ("m0", "m2")}, "victim": victim}
    built = engine_for(tiny_llama, adapters, device=2, host=2)
    try:
        weights = victim / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])  # truncated after registration
        reqs = [GenerationRequest(f"c{i}", (5, 6, 7), SamplingParams(MAX_NEW, ignore_eos=True), a)
                for i, a in enumerate(["m0", "victim", None, "m2", "victim", "m0"])]
        out = generate(built.engine, reqs)
    finally:
        built.engine.stop()
    for r, o in zip(reqs, out, strict=True):
        if r.adapter_id == "victim":
            assert isinstance(o, AdapterInvalid) and ("truncated" in str(o) or "offsets" in str(o))
        else:
            assert isinstance(o, list) and len(o) == MAX_NEW


def wait_until(condition, timeout: float = 10.0) -> bool:
    """The step loop frees memory at its next turn, which may come just after the client's answer."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_unregister_and_replace_under_load(tiny_llama, many_adapters):
    """Running requests finish on the weights they started with; new ones get the new weights; and
    once no request needs them, unregistered and replaced versions leave device and host memory at
    once (not when LRU reaches them: vllm#54839), without counting as evictions."""
    built = engine_for(tiny_llama, {"x": many_adapters["m3"]}, device=4, host=4)
    engine, registry, manager = built.engine, built.registry, built.manager
    registry.roots = (many_adapters["m4"].parent,)
    prompt, long = (9, 8, 7), SamplingParams(40, ignore_eos=True)
    try:
        old_ref = generate(engine, [GenerationRequest("r0", prompt, long, "x")])[0]
        registry.register("y", many_adapters["m4"])
        new_ref = generate(engine, [GenerationRequest("r1", prompt, long, "y")])[0]

        async def scenario():
            running = [asyncio.create_task(_generate(engine, [GenerationRequest(f"o{i}", prompt, long, "x")]))
                       for i in range(3)]
            await asyncio.sleep(0.05)  # they are decoding on the old weights
            registry.register("x", many_adapters["m4"], replace=True)
            swapped = await _generate(engine, [GenerationRequest("n", prompt, long, "x")])
            registry.unregister("x")
            with pytest.raises(AdapterNotFound):
                engine.submit(GenerationRequest("gone", prompt, long, "x"))
            return [(await t)[0] for t in running], swapped[0]

        old_runs, swapped = asyncio.run(scenario())
        assert wait_until(lambda: manager.pool.resident_keys == [registry.get("y").key]), manager.pool.resident_keys
        assert manager.resident()["host"] == (0, 0) and manager.pool.used_bytes == 8 * manager.pool.page_bytes
        assert manager.pool.evictions == 0 and manager.pool.total_pins() == 0
        registry.unregister("y")
        assert wait_until(lambda: manager.resident() == {"host": (0, 0), "device": (0, 0)}), manager.resident()
    finally:
        engine.stop()
    assert all(o == old_ref for o in old_runs)  # running requests finished on the old weights
    assert swapped == new_ref  # new requests got the new weights


@pytest.mark.usefixtures("openmp_team")
def test_device_copies_run_off_the_engine_thread(tiny_llama, many_adapters):
    """Host-to-device copies happen on the adapter I/O thread, never on the step loop, and that
    thread runs its torch ops serially (no OpenMP team to slow the engine's)."""
    import threading

    import torch

    built = engine_for(tiny_llama, many_adapters, device=2, host=4)
    pool = built.manager.pool
    fill_threads = []

    def recording(fill):
        def recording_fill(*args):
            fill_threads.append((threading.current_thread().name, torch.get_num_threads()))
            return fill(*args)
        return recording_fill

    # a host copy's fill, or a file converted straight into its pages
    pool.fill, pool.convert_into = recording(pool.fill), recording(pool.convert_into)
    try:
        reqs = [GenerationRequest(f"d{i}", (5, 6, 7), SamplingParams(4, ignore_eos=True), f"m{i % 6}")
                for i in range(12)]
        out = generate(built.engine, reqs)
    finally:
        built.engine.stop()
    assert all(isinstance(o, list) and len(o) == 4 for o in out)
    assert pool.evictions > 0 and len(fill_threads) >= 6
    assert all(name.startswith("adapter-io") for name, _ in fill_threads)
    if openmp_library() is not None:
        assert {threads for _, threads in fill_threads} == {1}


def test_adapter_pages_in_another_dtype_than_the_model_are_a_cpu_float32_option(tiny_llama, many_adapters):
    """--lora-dtype: float16 or bfloat16 pages under a float32 model on a CPU (pool, host copies and
    the registry's sizes in that dtype); any other mix is refused at start-up, naming the flag."""
    from loramux.server.config import StartupError
    from loramux.server.ops import triton_available

    adapters = {"m0": many_adapters["m0"]}
    with pytest.raises(StartupError, match="--lora-dtype float16 differs from the model's bfloat16"):
        engine_for(tiny_llama, adapters, device=2, host=2, dtype="bfloat16", lora_dtype="float16")
    if triton_available("cpu"):
        with pytest.raises(StartupError, match="with the triton ops"):
            engine_for(tiny_llama, adapters, device=2, host=2, op_backend="triton", lora_dtype="bfloat16")
    built = engine_for(tiny_llama, adapters, device=2, host=2, lora_dtype="float16")
    try:
        assert {a.dtype for pair in built.manager.pool.stores.values() for a in pair} == {torch.float16}
        out = generate(built.engine, [GenerationRequest("h", (5, 6, 7), SamplingParams(4, ignore_eos=True), "m0")])
        assert len(out[0]) == 4 and built.registry.element_size == 2
    finally:
        built.engine.stop()


def test_keep_resident_at_start_up(tiny_llama, many_adapters):
    """--keep-resident: a start-up adapter stays on the device while others page through; an
    unknown id, or more kept pages than leave room for one max-rank adapter, fail start-up."""
    from loramux.server.config import StartupError

    with pytest.raises(StartupError, match="no such start-up adapter"):
        engine_for(tiny_llama, {"m0": many_adapters["m0"]}, device=2, host=2, keep_resident=("nope",))
    big = {n: many_adapters[n] for n in ("m2", "m5")}  # rank 16 each: the pool holds 2 x 16 pages
    with pytest.raises(StartupError, match="must stay free"):
        engine_for(tiny_llama, big, device=2, host=2, keep_resident=("m2", "m5"))
    names = [f"m{i}" for i in range(8)]
    built = engine_for(tiny_llama, {n: many_adapters[n] for n in names}, device=2, host=4, keep_resident=("m1",))
    try:
        pool = built.manager.pool
        reqs = [GenerationRequest(f"k{i}", (5, 6, 7), SamplingParams(MAX_NEW, ignore_eos=True), names[i % 8])
                for i in range(24)]
        evicted = []
        pool.on_evict = evicted.append
        out = generate(built.engine, reqs)
    finally:
        built.engine.stop()
    assert all(isinstance(o, list) and len(o) == MAX_NEW for o in out)
    assert evicted and all(key[0] != "m1" for key in evicted)  # others paged; the kept one never left
    assert ("m1", built.registry.get("m1").version) in pool.resident_keys and built.manager.num_kept() == 1


def test_a_kept_adapter_whose_copy_failed_is_tried_again(tiny_llama, many_adapters, monkeypatch, caplog):
    """A kept adapter whose first device copy fails at start-up is tried again on a timer and
    lands, without a request having to fail first."""
    import time

    from loramux.server import adapter_admission

    monkeypatch.setattr(adapter_admission, "KEPT_RETRY_S", 0.2)
    caplog.set_level("INFO", logger="loramux.server.adapter_admission")
    built = engine_for(tiny_llama, {"k": many_adapters["m1"]}, device=2, host=2, keep_resident=("k",),
                       inject_fault="copy-fail:k")
    try:
        key = built.manager.resolve("k").key
        deadline = time.monotonic() + 20
        while built.manager.pool.pages_of(key) is None:
            assert time.monotonic() < deadline, "the kept adapter never landed"
            time.sleep(0.02)
        out = generate(built.engine, [GenerationRequest("r", (5, 6, 7), SamplingParams(MAX_NEW, ignore_eos=True), "k")])
    finally:
        built.engine.stop()
    assert "kept adapter k failed to load" in caplog.text  # it did fail once, and was retried
    assert isinstance(out[0], list) and len(out[0]) == MAX_NEW


@pytest.mark.usefixtures("openmp_team")
def test_the_engine_team_is_a_thread_smaller_while_an_io_job_runs(tiny_llama, many_adapters):
    """While the I/O thread copies an adapter, the engine's fused linears run with one OpenMP
    thread fewer (the I/O job has that core), and with the whole team again once no job runs."""
    import threading

    if IOCoreShare.for_this_process() is None:
        pytest.skip("no OpenMP team to share (one core, or not libgomp)")

    built = engine_for(tiny_llama, many_adapters, device=2, host=4)
    pool, full = built.manager.pool, torch.get_num_threads()
    copying, stepped = threading.Event(), threading.Event()
    during, after = [], []
    original = pool.fill

    def held_fill(*args):  # the I/O job stays running until a step has run a fused linear beside it
        copying.set()
        stepped.clear()
        stepped.wait(2.0)
        copying.clear()
        return original(*args)

    def before_check(*_):  # runs ahead of the share's check: was a copy already running then?
        held[0] = copying.is_set()

    def record(*_):
        if held[0] and copying.is_set():
            during.append(torch.get_num_threads())
            stepped.set()
        elif not copying.is_set():
            after.append(torch.get_num_threads())

    held = [False]
    pool.fill = held_fill
    fused = built.engine.runner.model.layers[0].lora_modules()[0]
    fused.register_forward_pre_hook(before_check, prepend=True)
    fused.register_forward_hook(record)
    try:
        reqs = [GenerationRequest(f"t{i}", (5, 6, 7), SamplingParams(6, ignore_eos=True), f"m{i % 6}")
                for i in range(12)]
        out = generate(built.engine, reqs)
        pool.fill = original
        generate(built.engine, [GenerationRequest("last", (5, 6), SamplingParams(2, ignore_eos=True))])
    finally:
        built.engine.stop()
    assert all(isinstance(o, list) and len(o) == 6 for o in out)
    assert during and set(during) == {full - 1}
    assert after[-1] == full


def test_start_up_adapters_register_on_several_threads_and_the_first_failure_in_order_is_named(
        tiny_llama, many_adapters, tmp_path, monkeypatch):
    """Start-up registrations read and hash their weights on a thread pool (a thousand adapters of
    a 1B model are 22 GB to hash); the server still refuses to start on the first bad adapter in
    the order given (ids and their count are checked before the model loads: tests/unit/test_config.py)."""
    from loramux.adapters.registry import AdapterRegistry
    from loramux.server.builder import register_startup_adapters
    from loramux.server.config import StartupError

    built = build_engine(ServerConfig(model=str(tiny_llama), max_lora_rank=16, max_device_adapters=2, max_host_adapters=4))
    registry = built.registry
    threads, register = set(), AdapterRegistry.register

    def slow_register(self, *args, **kwargs):  # long enough that a sequential loop would use one thread
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return register(self, *args, **kwargs)

    monkeypatch.setattr(AdapterRegistry, "register", slow_register)
    names = [f"m{i}" for i in range(8)]
    register_startup_adapters(registry, [(n, many_adapters[n]) for n in names], threads=4)
    assert len(threads) > 1
    assert all(registry.lookup(n).manifest.weights_sha256 for n in names)

    bad = []
    for name in ("bad-first", "bad-second"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{not json")
        bad.append((name, tmp_path / name))
    startup = [(f"n{i}", many_adapters[f"m{i}"]) for i in range(8, 14)]
    startup[2:2], startup[5:5] = [bad[0]], [bad[1]]
    for _ in range(3):  # whichever thread fails first, the error names the first bad adapter in order
        with pytest.raises(StartupError, match=r"^adapter 'bad-first' \("):
            register_startup_adapters(registry, startup, threads=4)
        for adapter_id, _ in startup:
            if registry.lookup(adapter_id) is not None:
                registry.unregister(adapter_id)
    built.engine.stop()
