"""Shared pieces of the benchmarks: synthetic PEFT-format adapters and engine timing."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.server.engine import EngineObserver, StepStats
from loramux.server.requests import GenerationRequest
from loramux.server.sampling import SamplingParams

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_peft_adapter(out: Path, layout, rank: int, seed: int, targets=ALL_PROJ, alpha: float | None = None) -> Path:
    """A PEFT-format LoRA adapter with random A and B for every module of ``layout`` in ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (_, kind) in layout.modules.items():
        if kind in targets:
            fin, fout = layout.shapes[kind]
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=gen) / fin**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
        "bias": "none", "lora_dropout": 0.0,
    }))
    return out


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


@dataclass
class RunResult:
    tokens_per_s: float
    decode_tokens_per_s: float
    ttft: list[float]
    wall_s: float


async def _run(engine, requests):
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
    outs = asyncio.run(_run(engine, reqs))
    wall = time.perf_counter() - t0
    engine.observers.remove(rec)
    generated = sum(len(o) for o in outs)
    return RunResult(generated / wall, rec.decode_throughput(),
                     [o[-1].timing.time_to_first_token_seconds for o in outs], wall)


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def median(xs):
    return statistics.median(xs)
