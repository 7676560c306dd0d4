"""The static decode path (decode_graphs.py) as an engine runs it: its forward pass never reads a
device value back to the host or bakes host data into the step (either breaks a CUDA graph's
capture, or replays a stale value), and a replay returns what the same step run eagerly returns.
Token-for-token parity with PEFT through it is in test_parity.py (``+graphs``) and test_families.py."""

import asyncio
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.decode_graphs import static_key
from loramux.server.ops import triton_available
from loramux.server.runner import WorkItem

from helpers import pinned_base_linear
from test_parity import make_prompts, run_staggered

# ops that wait for the device and read a value back (.item(), .tolist(), nonzero's size, bool(t)),
# and lift_fresh: a tensor made from Python data (torch.tensor) inside the step
HOST_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero", "aten::equal",
            "aten::lift_fresh"}


class HostOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_static_forward_has_no_host_sync_and_no_host_data(backend, tiny_llama, tiny_adapters):
    if not triton_available("cuda" if torch.cuda.is_available() else "cpu") and backend == "triton":
        pytest.skip("triton is not installed")
    config = ServerConfig(model=str(tiny_llama), dtype="float32", op_backend=backend, cuda_graphs="on",
                          base_linear=pinned_base_linear(backend), max_batch_size=8, max_model_len=96, default_max_new_tokens=16,
                          max_device_adapters=len(tiny_adapters), max_host_adapters=len(tiny_adapters),
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine
    graphs = engine.runner.graphs
    names = [None, *tiny_adapters]
    prompts = make_prompts(engine.vocab_size, 4)
    engine.start()
    try:  # adapters resident, the static rows filled by real steps
        asyncio.run(run_staggered(engine, [(names[i % len(names)], prompts[i]) for i in range(4)], 4))
    finally:
        engine.stop()
    assert graphs.steps > 0
    for bucket in graphs.buckets:
        for rank in (0, *graphs.ranks):
            with torch.inference_mode(), HostOps() as spy:
                graphs._hidden(bucket, rank)
            assert spy.seen == [], (bucket, rank, spy.seen)
    with torch.inference_mode(), HostOps() as spy:  # the spy sees what it must: an eager prefill reads ends back
        torch.tensor([1, 2]).tolist()
        torch.ones(3).nonzero()
    assert "aten::lift_fresh" in spy.seen and "aten::nonzero" in spy.seen


class Replay:
    """A captured graph's stand-in: replaying reruns the static forward into the output captured."""

    def __init__(self, graphs, key, out):
        self.graphs, self.key, self.out = graphs, key, out

    def replay(self):
        with torch.inference_mode():
            self.out.copy_(self.graphs._hidden(*self.key))


class DoneEvent:
    def query(self):
        return True

    def record(self):
        pass


def test_a_replay_reads_the_rows_uploaded_before_it(tiny_llama, tiny_adapters):
    """The capturing branch of ``run`` (CUDA's), with a stand-in graph that reruns the static forward:
    the step's rows are written on the host, uploaded into the buffer the graph reads, and the
    replay's rows come back in the items' order, equal to the same step run by ``run`` before (on a
    CPU eagerly; on CUDA by the graph captured at start-up)."""
    config = ServerConfig(model=str(tiny_llama), dtype="float32", op_backend="torch", cuda_graphs="on",
                          base_linear=pinned_base_linear("torch"), max_batch_size=8, max_model_len=96,
                          default_max_new_tokens=16, max_device_adapters=len(tiny_adapters),
                          max_host_adapters=len(tiny_adapters), keep_resident=tuple(tiny_adapters),
                          adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine
    graphs, pool = engine.runner.graphs, engine.adapters.pool
    deadline = time.monotonic() + 60
    while len(pool.resident_keys) < len(tiny_adapters):  # the kept adapters load on the I/O thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    resident = sorted((pool.pin(key) for key in pool.resident_keys), key=lambda res: res.pages.numel())
    resident = [resident[0], resident[-1]]  # the smallest rank and the largest: two graph ranks apart
    bs = engine.runner.kv.block_size
    items = [WorkItem([11 + i], 0, [i * bs], [i], None if res is None else res.lora_pages, i, True, True,
                      frozenset() if res is None else res.kinds) for i, res in enumerate([resident[0], None, resident[1]])]
    steps = graphs.steps  # the start-up warm-up's decode step among them
    with torch.inference_mode():
        expected = graphs.run(items).clone()
    key = static_key(items, graphs.buckets, graphs.ranks, graphs.eager_kinds)
    graphs.capturing, graphs._copied = True, graphs._copied or DoneEvent()
    graphs.buffer = torch.zeros_like(graphs.buffer)  # a "device" copy apart from the host rows: only the upload fills it
    out = expected.new_full((key[0], expected.shape[1]), float("nan"))
    graphs.graphs[key] = (Replay(graphs, key, out), out)
    with torch.inference_mode():
        got = graphs.run(items)
    assert got.shape[0] == 3
    if graphs.device.type == "cpu":
        assert torch.equal(got, expected)
    else:  # a real graph's replay against the same step run eagerly: cuBLAS may pick another algorithm
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert graphs.steps == steps + 2
