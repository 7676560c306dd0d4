"""On a GPU a step waits for the device once: when its sampler copies the token ids to the host.
Any other synchronising call in a step (an ``.item()``, a blocking copy of host data, a device
tensor indexed by a Python list) stops the host from queueing work while the device runs, which
is what a launch-bound decode step cannot afford. CUDA's own sync debug mode finds each one, with
the Python line that made it. (On a CPU, test_sampling.py checks the sampler's copies by their
arguments, and test_decode_graphs.py the static forward's host reads.)"""

import asyncio
import warnings
from pathlib import Path

import pytest
import torch

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import EngineObserver
from loramux.server.requests import GenerationRequest, SamplingParams

from test_parity import make_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Kinds(EngineObserver):
    def __init__(self):
        self.last = None

    def step(self, stats) -> None:
        self.last = "decode" if not stats.num_prefill_tokens else "prefill" if not stats.num_decode_tokens else "mixed"


def synchronising_calls(fn):
    """fn()'s result and the call sites (file:line) of the synchronising CUDA calls it made."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_every_step_synchronises_at_most_once(graphs, tiny_llama, tiny_adapters):
    config = ServerConfig(model=str(tiny_llama), max_batch_size=8, max_model_len=96, max_tokens_per_step=24,
                          default_max_new_tokens=16, cuda_graphs=graphs, max_device_adapters=len(tiny_adapters),
                          max_host_adapters=len(tiny_adapters), adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine  # never started: this thread runs its steps, so the warnings are ours
    kinds = Kinds()
    engine.observers.append(kinds)
    names = [None, *tiny_adapters]
    steps = []

    async def drain(stream):
        async for _ in stream:
            pass

    async def run(round_: int, measure: bool):
        prompts = make_prompts(engine.vocab_size, 8, seed=round_)
        readers = []
        for turn in range(400):
            if turn % 3 == 0 and len(readers) < len(prompts):  # joins a running batch at staggered steps
                i = len(readers)
                readers.append(asyncio.create_task(drain(engine.submit(GenerationRequest(
                    f"r{round_}-{i}", tuple(prompts[i]), SamplingParams(10, ignore_eos=True), names[i % len(names)])))))
            await asyncio.sleep(0)
            (stepped, _), syncs = synchronising_calls(engine.run_once)
            if stepped and measure:
                steps.append((kinds.last, syncs))
            if not stepped:
                await asyncio.sleep(0.005)
            if len(readers) == len(prompts) and all(r.done() for r in readers):
                break
        for r in readers:
            r.result()

    try:
        with torch.inference_mode():
            asyncio.run(run(0, measure=False))  # adapters resident, kernels compiled, graphs in use
            asyncio.run(run(1, measure=True))
    finally:
        engine.stop()
    assert {kind for kind, _ in steps} >= {"prefill", "mixed", "decode"}
    extra = [(i, kind, syncs) for i, (kind, syncs) in enumerate(steps) if len(syncs) > 1]
    assert not extra, f"{len(extra)} of {len(steps)} steps wait for the device more than once: {extra}"
