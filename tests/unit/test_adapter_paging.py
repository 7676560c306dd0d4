"""Adapter paging policies without a model: eviction, page-bounded residency, kept adapters,
reload accounting, look-ahead order and staging."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.adapters.config import AdapterSpec
from loramux.adapters.device_pool import DevicePool, select_victims
from loramux.adapters.errors import AdapterInvalid
from loramux.adapters.loader import DecodedAdapter, LoRALayout, LoRAWeights, convert_adapter
from loramux.adapters.reloads import ReloadTracker
from loramux.server.adapter_admission import AdapterAdmission
from loramux.server.ops.cpu_kernel import load_kernels
from loramux.server.scheduler import Fairness, SeqView, adapter_order

LAYOUT = LoRALayout(modules={"l0.q": (0, "q"), "l0.v": (0, "v")}, shapes={"q": (8, 8), "v": (8, 4)}, num_layers=1)


def weights(rank: int, value: float = 1.0) -> LoRAWeights:
    return LoRAWeights(rank, {(0, "q"): torch.full((rank, 8), value)}, {(0, "q"): torch.full((rank, 8), value)})


def load(pool: DevicePool, key, rank: int, evict: bool = True, **kw) -> bool:
    pages = pool.reserve(key, rank, evict, **kw)
    if pages is None:
        return False
    pool.fill(key, pages, weights(rank))
    return True


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    data=st.data(),
)
def test_victims_are_never_pinned_or_protected_and_unneeded_ones_go_first(sizes, data):
    keys = list(range(len(sizes)))
    lru = list(zip(keys, sizes, strict=True))
    pinned = set(data.draw(st.sets(st.sampled_from(keys))))
    protected = set(data.draw(st.sets(st.sampled_from(keys))))
    needed = {k: data.draw(st.integers(0, 20)) for k in data.draw(st.sets(st.sampled_from(keys)))}
    want = data.draw(st.integers(1, sum(sizes) + 2))
    victims = select_victims(lru, pinned, want, needed, protected)
    free_to_take = [(k, p) for k, p in lru if k not in pinned | protected]
    if sum(p for _, p in free_to_take) < want:
        assert victims is None
        return
    assert victims is not None and not set(victims) & (pinned | protected)
    assert sum(sizes[k] for k in victims) >= want
    assert sum(sizes[k] for k in victims[:-1]) < want  # no more than it takes
    kinds = [k in needed for k in victims]
    assert kinds == sorted(kinds)  # every unneeded victim before any needed one
    unneeded = [k for k in victims if k not in needed]
    assert unneeded == [k for k, _ in free_to_take if k not in needed][: len(unneeded)]  # least recently used
    later = [needed[k] for k in victims if k in needed]
    assert later == sorted(later, reverse=True)  # the one wanted furthest back goes first


def test_residency_is_bounded_by_pages_not_by_a_count():
    pool = DevicePool(LAYOUT, num_pages=16 * 32, dtype=torch.float32, device="cpu")  # 16 adapters of rank 32
    for i in range(64):
        assert load(pool, ("small", i), 8, evict=False)
    assert len(pool.resident_keys) == 64 and pool.free_pages == 0 and pool.evictions == 0
    assert not load(pool, ("one more", 0), 8, evict=False)
    assert load(pool, ("one more", 0), 8)  # by evicting the least recently used
    assert ("small", 0) not in pool.resident_keys and pool.evictions == 1


def test_an_adapter_takes_the_lowest_free_pages_in_ascending_order():
    """So its pages run forward through memory, next to the adapter before it where they can: after
    evictions and a cancelled copy, the freed pages go out again lowest first."""
    pool = DevicePool(LAYOUT, num_pages=12, dtype=torch.float32, device="cpu")
    for key, rank in (("a", 4), ("b", 2), ("c", 4)):
        assert load(pool, key, rank, evict=False)
    assert [pool.pages_of(k).tolist() for k in "abc"] == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]
    pool.evict("a")
    pool.evict("c")
    reserved = pool.reserve("d", 3, evict=False)
    assert reserved.tolist() == [0, 1, 2]
    pool.cancel("d", reserved)
    assert load(pool, "e", 6, evict=False) and pool.pages_of("e").tolist() == [0, 1, 2, 3, 6, 7]
    assert pool.free_pages == 4


@pytest.mark.parametrize("zero_untargeted", [True, False])
def test_pages_of_kinds_an_adapter_does_not_target_are_zeroed_for_static_plans(zero_untargeted):
    """With ``zero_untargeted`` (decode graphs' static plans read every kind of every row's pages),
    an adapter's pages of a kind it does not target read zero, not the last adapter's rows there;
    the zero page past the others stays zero whatever is loaded."""
    pool = DevicePool(LAYOUT, num_pages=4, dtype=torch.float32, device="cpu")
    pool.zero_untargeted = zero_untargeted
    both = LoRAWeights(4, {(0, "q"): torch.ones(4, 8), (0, "v"): torch.ones(4, 8)},
                       {(0, "q"): torch.ones(4, 8), (0, "v"): torch.ones(4, 4)})
    pool.fill(("both", 0), pool.reserve(("both", 0), 4, evict=False), both)
    assert load(pool, ("q only", 0), 4)  # the same four pages, after evicting the first
    pages = pool.pages_of(("q only", 0))
    a_v, b_v = pool.stores[(0, "v")]
    assert bool((a_v[pages] == 0).all() and (b_v[pages] == 0).all()) == zero_untargeted
    assert bool((pool.stores[(0, "q")][0][pages] == 1).all())
    for a, b in pool.stores.values():
        assert a.shape[0] == b.shape[0] == 5 and not a[pool.zero_page].any() and not b[pool.zero_page].any()


@pytest.mark.skipif(load_kernels() is None, reason="no C++ kernel is built")
def test_a_fill_by_the_cpp_row_copy_equals_the_torch_ops():
    """Fused stores (q|k|v share one), a kind missing from a layer (zero rows), a second adapter;
    pages whose A and B rows are one row of memory (interleave) hold the same values."""
    layout = LoRALayout(modules={f"l{i}.{k}": (i, k) for i in range(2) for k in ("q", "k", "v")},
                        shapes={"q": (8, 8), "k": (8, 4), "v": (8, 4)}, num_layers=2, fused=(("q", "k", "v"),))
    gen = torch.Generator().manual_seed(0)
    pools = [DevicePool(layout, 10, torch.float32, "cpu"),
             DevicePool(layout, 10, torch.float32, "cpu", copy_rows=load_kernels().copy_rows),
             DevicePool(layout, 10, torch.float32, "cpu", copy_rows=load_kernels().copy_rows, interleave=True),
             DevicePool(layout, 10, torch.float32, "cpu", interleave=True)]
    for key, rank in ((("a", 0), 3), (("b", 0), 4)):
        present = [m for m in layout.modules.values() if m != (1, "v")]
        w = LoRAWeights(rank, {m: torch.randn(rank, 8, generator=gen) for m in present},
                        {m: torch.randn(rank, layout.shapes[m[1]][1], generator=gen) for m in present})
        for pool in pools:
            pool.fill(key, pool.reserve(key, rank, evict=False), w)
    for other in pools[1:]:
        for (a0, b0), (a1, b1) in zip(pools[0].fused_stores.values(), other.fused_stores.values(), strict=True):
            assert torch.equal(a0, a1) and torch.equal(b0, b1)


@pytest.mark.skipif(load_kernels() is None, reason="no C++ kernel is built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [False, True])
def test_a_file_converted_straight_into_pages_equals_a_fill_of_its_host_copy(dtype, interleave):
    """DevicePool.convert_into against fill(convert_adapter(...)): fused stores, a kind missing from
    a layer (zero rows), ranks below the pages'; a NaN fails the fill, naming the module, and the
    pages go back."""
    layout = LoRALayout(modules={f"l{i}.{k}": (i, k) for i in range(2) for k in ("q", "k", "v")},
                        shapes={"q": (8, 8), "k": (8, 4), "v": (8, 4)}, num_layers=2, fused=(("q", "k", "v"),))
    gen = torch.Generator().manual_seed(1)
    present = [m for m in sorted(layout.modules.values()) if m != (1, "v")]
    ranks = {m: 3 if m[1] == "k" else 4 for m in present}
    decoded = DecodedAdapter(
        AdapterSpec(r=4, lora_alpha=8, target_modules=("q", "k", "v")), 4, present, [f"l{i}.{k}" for i, k in present],
        [torch.randn(ranks[m], 8, generator=gen) for m in present],
        [torch.randn(layout.shapes[m[1]][1], ranks[m], generator=gen) for m in present],
        [2.0 if m[1] == "q" else 0.5 for m in present], [None] * len(present))
    kernels = load_kernels()
    pools = [DevicePool(layout, 10, dtype, "cpu", copy_rows=kernels.copy_rows, interleave=i) for i in (False, interleave)]
    for pool in pools:  # pages that held another adapter's values
        pool.fused_stores[(0, ("q", "k", "v"))][0].fill_(3.0)
    pools[0].fill("a", pools[0].reserve("a", 4, evict=False), convert_adapter(decoded, layout, dtype,
                                                                              convert=kernels.convert_adapter))
    pools[1].convert_into("a", pools[1].reserve("a", 4, evict=False), decoded, kernels.convert_to_pages)
    for (a0, b0), (a1, b1) in zip(pools[0].fused_stores.values(), pools[1].fused_stores.values(), strict=True):
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
    assert pools[1].resident_keys == ["a"]
    decoded.b[2][1, 0] = float("nan")
    with pytest.raises(AdapterInvalid, match="module 'l0.v' has NaN or Inf weights once scaled by 0.5"):
        pools[1].convert_into("b", pools[1].reserve("b", 4, evict=False), decoded, kernels.convert_to_pages)
    assert pools[1].resident_keys == ["a"] and pools[1].free_pages == 6


def test_kept_and_pinned_adapters_are_never_evicted():
    pool = DevicePool(LAYOUT, num_pages=12, dtype=torch.float32, device="cpu")
    pool.keep("kept")
    assert load(pool, "kept", 4) and load(pool, "pinned", 4) and load(pool, "free", 4)
    pool.pin("pinned")
    assert pool.reserve("new", 8, evict=True) is None  # only "free" (4 pages) may go
    assert load(pool, "new", 4) and set(pool.resident_keys) == {"kept", "pinned", "new"}
    pool.unkeep("kept")
    assert load(pool, "other", 4) and "kept" not in pool.resident_keys  # evictable once no longer kept


def test_a_load_soon_after_an_eviction_is_a_reload():
    now = [0.0]
    tracker = ReloadTracker(window=60.0, clock=lambda: now[0])
    assert not tracker.loaded("a")  # a first load
    tracker.evicted("a")
    now[0] = 59.0
    assert tracker.loaded("a") and tracker.count == 1
    tracker.evicted("a")
    now[0] = 120.0
    assert not tracker.loaded("a") and tracker.count == 1  # more than a minute later: not thrash
    tracker.evicted("b")
    now[0] = 200.0
    tracker.evicted("c")  # forgets "b", older than the window
    assert list(tracker._evicted) == ["c"]


def test_the_device_tier_counts_reloads():
    pool = DevicePool(LAYOUT, num_pages=4, dtype=torch.float32, device="cpu")
    assert load(pool, "a", 4) and load(pool, "b", 4) and load(pool, "a", 4)
    assert pool.reloads.count == 1 and pool.evictions == 2


def view(i, adapter):
    return SeqView(i, adapter, 4, 0, tenant=adapter)


def test_adapters_are_wanted_in_admission_order():
    waiting = [view(0, "a"), view(1, None), view(2, "b"), view(3, "a"), view(4, "c")]
    assert adapter_order(waiting, None) == ["a", "b", "c"]  # fifo: first arrival
    served = Fairness({"a": 30.0, "b": 10.0})  # "c" joined with no service yet
    assert adapter_order(waiting, served) == ["c", "b", "a"]
    assert adapter_order(waiting, Fairness({})) == ["a", "b", "c"]  # ties: first arrival


class FakeManager:
    """What AdapterAdmission.stage asks of the adapter manager, recorded."""

    def __init__(self, room: set, kept=(), failed=None):
        self.room = room  # keys a copy can start for
        self.calls = []
        self._kept = list(kept)
        self.failed = dict(failed or {})  # key -> time.monotonic() of its failure
        self.host = type("Host", (), {"capacity": 8})()

    def kept(self):
        return self._kept

    def failed_since(self, key):
        return self.failed.get(key)

    def forget_failure(self, key):
        self.failed.pop(key, None)

    def readiness(self, key):
        return None

    def stage(self, key, needed, protected):
        self.calls.append((key, set(protected)))
        return key in self.room


def test_staging_never_evicts_what_is_wanted_sooner():
    manager = FakeManager(room={"a", "c", "d"})
    order = ["r", "a", "b", "c", "d", "e", "f"]  # "r" is ready; the window is host capacity / 2 = 4
    AdapterAdmission(manager).stage(order, ready={"r"})
    calls = dict(manager.calls)
    assert list(calls) == ["a", "b", "c"]  # in order, within the window
    assert calls["a"] == {"r"} and calls["b"] == {"r", "a"}
    assert calls["c"] == set(order)  # behind a blocked one: it may take only unneeded adapters' pages


def test_kept_adapters_are_staged_first():
    manager = FakeManager(room={"k", "a"}, kept=["k"])
    AdapterAdmission(manager).stage(["a"], ready=set())
    assert manager.calls == [("k", set()), ("a", {"k"})]


def test_a_kept_adapter_that_failed_is_tried_again_after_a_while():
    """No request may ask for a kept adapter soon, so its failure is forgotten on a timer, not left
    for the next request to inherit; a fresh failure (or another adapter's) is left alone."""
    import time

    from loramux.server.adapter_admission import KEPT_RETRY_S

    now = time.monotonic()
    manager = FakeManager(room=set(), kept=[("old",), ("new",)],
                          failed={("old",): now - KEPT_RETRY_S - 1, ("new",): now, ("other",): now - 1000})
    AdapterAdmission(manager).stage([], ready=set())
    assert set(manager.failed) == {("new",), ("other",)}


def test_cpu_tiers_are_exclusive_and_reads_reuse_one_buffer(tmp_path):
    """On a CPU an adapter read with device room goes straight into pages, without a host copy; one
    read ahead of room waits in the host tier in memory of its own, and leaves it, and its buffer for
    the next, when staged. The I/O thread converts every read into the same buffer, and no resident
    adapter's pages change."""
    import threading

    from loramux.adapters.host_cache import HostCache
    from loramux.adapters.loader import load_adapter
    from loramux.adapters.manager import AdapterManager, Readiness
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.synthetic import write_random_adapter

    layout = LoRALayout(modules={"model.layers.0.self_attn.q_proj": (0, "q_proj"),
                                 "model.layers.0.self_attn.v_proj": (0, "v_proj")},
                        shapes={"q_proj": (8, 8), "v_proj": (8, 4)}, num_layers=1)
    registry = AdapterRegistry(layout, 4, 4)
    paths = {n: write_random_adapter(tmp_path / n, layout, 4, seed=i, targets=("q_proj", "v_proj"))
             for i, n in enumerate("abcd")}
    for n, p in paths.items():
        registry.register(n, p, trusted=True)
    pool = DevicePool(layout, 8, torch.float32, "cpu")  # room for two of rank 4
    manager = AdapterManager(registry, HostCache(4), pool, torch.float32)
    done = threading.Event()
    manager.notify = done.set

    def read(name):
        key = manager.resolve(name).key
        done.clear()
        assert manager.readiness(key) is Readiness.LOADING
        assert done.wait(10)
        return key

    def rows(key):
        pages = pool.pages_of(key)
        return {k: (a[pages].clone(), b[pages].clone()) for k, (a, b) in pool.stores.items()}

    try:
        a, b = read("a"), read("b")
        assert manager.tier(a) == manager.tier(b) == "device" and len(manager.host) == 0

        def check(name, got):
            expected = load_adapter(paths[name], layout, 4, torch.float32)
            for module, (ra, rb) in got.items():
                assert torch.equal(ra, expected.a[module]) and torch.equal(rb, expected.b[module])
        check("a", rows(a))  # b's read reused the buffer a was converted in
        check("b", rows(b))
        c, d = read("c"), read("d")  # no room: read ahead into the host tier
        host_c = manager.host.get(c)
        assert manager.tier(c) == manager.tier(d) == "host"
        check("c", {m: (host_c.a[m], host_c.b[m]) for m in host_c.a})  # its own memory: d's read left it be
        done.clear()
        assert manager.stage(c, needed={}, protected={b}) is True  # evicts a
        assert done.wait(10)
        assert manager.tier(c) == "device" and manager.tier(a) == "disk" and c not in manager.host
        check("b", rows(b))
        check("c", rows(c))
        read("a")  # back from disk, read ahead in the buffer c's host copy left
        assert manager.tier(a) == "host" and manager.host.get(a).flat.data_ptr() == host_c.flat.data_ptr()
    finally:
        manager.close()


def test_versions_nothing_holds_leave_no_records_behind(tmp_path):
    """A server that replaces and drops adapters for weeks keeps no record of old versions: an
    entry lives while its version is registered or a request holds it, and read, copy and
    failure records of versions gone are dropped. A version a request still holds is read."""
    import gc
    import logging
    import threading

    from loramux.adapters.host_cache import HostCache
    from loramux.adapters.manager import AdapterManager, Readiness
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.synthetic import write_random_adapter

    layout = LoRALayout(modules={"model.layers.0.self_attn.q_proj": (0, "q_proj")}, shapes={"q_proj": (8, 8)},
                        num_layers=1)
    registry = AdapterRegistry(layout, 4, 4)
    path = write_random_adapter(tmp_path / "x", layout, 4, seed=0, targets=("q_proj",))
    manager = AdapterManager(registry, HostCache(4), DevicePool(layout, 8, torch.float32, "cpu"), torch.float32)
    done = threading.Event()
    manager.notify = done.set

    def fault(stage, adapter_id):
        if adapter_id == "bad":
            raise OSError("injected")
    manager.fault_hook = fault

    def load(name):
        """Read, then copy to the device (evicting): every version passes through both tiers."""
        entry = manager.resolve(name)
        done.clear()
        assert manager.readiness(entry.key) is Readiness.LOADING
        assert done.wait(10)
        if manager.tier(entry.key) == "host":
            done.clear()
            assert manager.stage(entry.key) is True and done.wait(10)
            assert manager.tier(entry.key) == "device"
        return entry

    logger, quiet = logging.getLogger("loramux.adapters.manager"), logging.NullHandler()
    logger.propagate = False  # pytest's log capture would keep each failure's frames, and its entry
    logger.addHandler(quiet)
    try:
        for _ in range(40):
            for name in ("x", "bad"):
                registry.register(name, path, replace=True, trusted=True)
                load(name)
        registry.register("x", path, replace=True, trusted=True)
        held = manager.resolve("x")  # a request holds this version through its unregistering
        registry.unregister("x")
        registry.unregister("bad")
        gc.collect()
        assert list(manager._entries) == [held.key]
        done.clear()
        assert manager.readiness(held.key) is Readiness.LOADING and done.wait(10)
        assert manager.tier(held.key) in ("host", "device")
        for records in (manager._failed, manager._resident_since):  # at most 2 live versions: x and bad
            assert len(records) <= 2 * 2 + 17, len(records)
    finally:
        logger.propagate = True
        logger.removeHandler(quiet)
        manager.close()


@pytest.mark.parametrize("outcome", ["lands", "fails"])
def test_a_read_in_flight_lands_in_the_pages_staging_reserved_for_it(tmp_path, outcome):
    """The pool is full of an adapter nobody needs while b's read runs: staging b evicts it and
    reserves b's pages at once, and the read lands in them, with no host copy and no second copy.
    A read that fails gives its reserved pages back."""
    import threading

    from loramux.adapters.host_cache import HostCache
    from loramux.adapters.loader import load_adapter
    from loramux.adapters.manager import AdapterManager, Readiness
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.synthetic import write_random_adapter

    layout = LoRALayout(modules={"model.layers.0.self_attn.q_proj": (0, "q_proj")}, shapes={"q_proj": (8, 8)},
                        num_layers=1)
    registry = AdapterRegistry(layout, 4, 4)
    for i, name in enumerate("ab"):
        registry.register(name, write_random_adapter(tmp_path / name, layout, 4, seed=i, targets=("q_proj",)),
                          trusted=True)
    pool = DevicePool(layout, 4, torch.float32, "cpu")  # room for one of rank 4
    manager = AdapterManager(registry, HostCache(4), pool, torch.float32)
    done, release, reading = threading.Event(), threading.Event(), threading.Event()
    manager.notify = done.set
    host_copies = []
    manager._host_copy = lambda w: host_copies.append(w) or w.clone()

    def hook(stage, adapter_id):
        if adapter_id == "b" and stage == "read":
            reading.set()
            assert release.wait(10)
            if outcome == "fails":
                raise OSError("injected read failure")
    manager.fault_hook = hook
    try:
        a, b = manager.resolve("a").key, manager.resolve("b").key
        assert manager.readiness(a) is Readiness.LOADING and done.wait(10)
        assert manager.tier(a) == "device" and pool.free_pages == 0
        done.clear()
        assert manager.readiness(b) is Readiness.LOADING and reading.wait(10)
        assert manager.stage(b, needed={b: 0}, protected=set()) is True  # evicts a, for b's read
        assert manager.tier(a) == "disk" and manager.stage(b, needed={b: 0}) is None  # reserved once
        release.set()
        assert done.wait(10)
        if outcome == "lands":
            assert manager.readiness(b) is Readiness.READY and b not in manager.host and not host_copies
            w = load_adapter(manager.resolve("b").path, layout, 4, torch.float32)
            a_store, b_store = pool.stores[(0, "q_proj")]
            assert torch.equal(a_store[pool.pages_of(b)], w.a[(0, "q_proj")])
            assert torch.equal(b_store[pool.pages_of(b)], w.b[(0, "q_proj")])
        else:
            assert manager.readiness(b) is Readiness.FAILED and pool.free_pages == 4
            assert pool.reserve(b, 4, evict=False) is not None  # nothing left reserved for b
    finally:
        release.set()
        manager.close()


def test_versions_no_longer_registered_leave_memory_once_no_request_needs_them(tmp_path):
    """Unregistering or replacing frees a version's device pages and host copy at the step loop's
    next turn (``drop_retired``), not when LRU reaches them; never while a running request pins it
    or a waiting one needs it; a read in flight lands first and then goes. Not an eviction."""
    import threading

    from loramux.adapters.host_cache import HostCache
    from loramux.adapters.manager import AdapterManager, Readiness
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.synthetic import write_random_adapter

    layout = LoRALayout(modules={"model.layers.0.self_attn.q_proj": (0, "q_proj")}, shapes={"q_proj": (8, 8)},
                        num_layers=1)
    registry = AdapterRegistry(layout, 4, 4)
    path = write_random_adapter(tmp_path / "x", layout, 4, seed=0, targets=("q_proj",))
    pool = DevicePool(layout, 8, torch.float32, "cpu")
    manager = AdapterManager(registry, HostCache(4), pool, torch.float32)
    done, release = threading.Event(), threading.Event()
    manager.notify = done.set
    manager.fault_hook = lambda stage, adapter_id: adapter_id != "slow" or release.wait(10)

    def read(name):
        entry = manager.resolve(name)
        done.clear()
        assert manager.readiness(entry.key) is Readiness.LOADING and done.wait(10)
        return entry

    try:
        for name in ("a", "b", "slow"):
            registry.register(name, path, trusted=True)
        a = read("a").key  # into device pages
        b = read("b").key
        assert manager.tier(a) == manager.tier(b) == "device"
        manager.pin(a)
        registry.register("a", path, replace=True, trusted=True)
        registry.unregister("b")
        manager.drop_retired({b})  # a request waits for b; a running one pins a
        assert manager.tier(a) == manager.tier(b) == "device"
        manager.release(a)
        manager.drop_retired(set())
        assert manager.tier(a) == manager.tier(b) == "disk" and pool.free_pages == 8 and pool.evictions == 0
        held = manager.resolve("slow")  # a request holds it while its read runs
        done.clear()
        assert manager.readiness(held.key) is Readiness.LOADING
        registry.unregister("slow")
        manager.drop_retired(set())
        assert held.key in manager._retired  # still reading
        done.clear()  # retiring it woke the step loop too
        release.set()
        assert done.wait(10) and manager.tier(held.key) == "device"
        manager.drop_retired(set())
        assert manager.tier(held.key) == "disk" and not manager._retired and pool.free_pages == 8
    finally:
        release.set()
        manager.close()
