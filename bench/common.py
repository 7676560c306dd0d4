"""Shared pieces of the benchmarks: engine timing, request sets and statistics. Nothing here
imports grpc or the generated stubs, so the GPU benchmark runs where they are not installed."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.adapters.synthetic import write_random_adapter
from loramux.clients.stats import percentile, zipf_choices
from loramux.server.engine import EngineObserver, StepStats
from loramux.server.ops.linear import cpu_model_name
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.server.torch_threads import in_passing_thread

# One-off torch work runs in a passing thread: an OpenMP team left on the main thread would slow
# the engine thread's ops for the rest of the run (server/torch_threads.py).
write_adapter = in_passing_thread(write_random_adapter)


class StepRecorder(EngineObserver):
    def __init__(self):
        self.steps: list[StepStats] = []

    def step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def decode_throughput(self) -> float:
        """Generated tokens per second over decode-only steps (prefill excluded)."""
        decode = [s for s in self.steps if s.num_prefill_tokens == 0]
        seconds = sum(s.seconds for s in decode)
        return sum(s.num_decode_tokens for s in decode) / seconds if seconds else float("nan")

    def prefill_throughput(self) -> float:
        """Prompt tokens per second over the steps that prefill only (no decode rows in them)."""
        prefill = [s for s in self.steps if s.num_prefill_tokens and not s.num_decode_tokens]
        seconds = sum(s.seconds for s in prefill)
        return sum(s.num_prefill_tokens for s in prefill) / seconds if seconds else float("nan")

    def decode_step_seconds(self) -> float:
        """Median time of the decode-only steps with the most rows (the full batch)."""
        decode = [s for s in self.steps if s.num_prefill_tokens == 0]
        if not decode:
            return float("nan")
        full = max(s.num_decode_tokens for s in decode)
        return statistics.median(s.seconds for s in decode if s.num_decode_tokens == full)


@dataclass
class RunResult:
    tokens: int
    tokens_per_s: float
    decode_tokens_per_s: float
    ttft: list[float]
    wall_s: float
    steps: int
    decode_step_s: float = float("nan")
    prefill_tokens_per_s: float = float("nan")


async def run_requests(engine, requests):
    async def one(req):
        return [ev async for ev in engine.submit(req)]
    return await asyncio.gather(*(one(r) for r in requests))


def run_batch(engine, prompts, adapters, max_new_tokens: int) -> RunResult:
    """Submit all requests at once and wait for them; time decode steps through an observer."""
    rec = StepRecorder()
    engine.observers.append(rec)
    reqs = [GenerationRequest(f"b{i}", tuple(p), SamplingParams(max_new_tokens, ignore_eos=True), a)
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    t0 = time.perf_counter()
    outs = asyncio.run(run_requests(engine, reqs))
    wall = time.perf_counter() - t0
    engine.observers.remove(rec)
    generated = sum(len(o) for o in outs)
    return RunResult(generated, generated / wall, rec.decode_throughput(),
                     [o[-1].timing.time_to_first_token_seconds for o in outs], wall, len(rec.steps),
                     rec.decode_step_seconds(), rec.prefill_throughput())


def run_closed_loop(engine, prompts, adapters, max_new_tokens: int, concurrency: int) -> tuple[int, float]:
    """``concurrency`` clients that each send their next request when the last one is answered,
    over the requests in order (a request per prompt and adapter): (tokens generated, seconds)."""
    todo = iter(enumerate(zip(prompts, adapters, strict=True)))

    async def client() -> int:
        tokens = 0
        for i, (prompt, adapter) in todo:  # shared: each client takes the next request
            req = GenerationRequest(f"c{i}", tuple(prompt), SamplingParams(max_new_tokens, ignore_eos=True), adapter)
            tokens += len([ev async for ev in engine.submit(req)])
        return tokens

    async def clients() -> int:
        return sum(await asyncio.gather(*(client() for _ in range(concurrency))))

    t0 = time.perf_counter()
    tokens = asyncio.run(clients())
    return tokens, time.perf_counter() - t0


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


__all__ = ["RunResult", "StepRecorder", "percentile", "random_prompts", "run_batch", "run_closed_loop", "zipf_choices"]


def cpu_name() -> str:
    """The CPU's model name, with its widest x86 vector ISA, for benchmark reports."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "")
    return f"{cpu_model_name()}, {os.cpu_count()} cores" + (f", {isa}" if isa else "")


def steal_seconds(stat: Path = Path("/proc/stat")) -> float:
    """CPU time stolen from this VM so far, all its CPUs together (the hypervisor ran something else
    while a CPU of ours had work): the aggregate line's eighth value; 0 where that is not reported.
    A run that lost a share of its wall time this way is slower for a reason outside the code under
    test."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 and fields[0] == "cpu" else 0.0


@in_passing_thread
def build_random_llama(out: Path, shape: dict, tokenizer, device: torch.device, dtype) -> Path:
    """A Llama-architecture model of ``shape`` with random weights and ``tokenizer`` (``shape`` may
    set a smaller vocab_size than the tokenizer's: the model then emits only the first ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(**{"vocab_size": len(tokenizer), "max_position_embeddings": 4096, "bos_token_id": None,
                            "eos_token_id": tokenizer.eos_token_id, "architectures": ["LlamaForCausalLM"], **shape})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
