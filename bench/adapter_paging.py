"""Adapter paging: 1000 registered adapters (ranks 8/16/32/64), device capacity 32, Zipf(1.0)
popularity and Poisson arrivals, next to the same workload over 8 adapters that are all resident.
Target: throughput ratio >= 0.9. Also prints time to first token of cold vs warm requests.

    python bench/adapter_paging.py [--adapters 1000] [--requests 192] [--rate 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters.synthetic import write_random_adapter  # noqa: E402
from loramux.clients.stats import percentile, zipf_choices  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.requests import (
    GenerationRequest,  # noqa: E402
    SamplingParams,  # noqa: E402
)

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "v_proj")


def make_adapters(root: Path, layout, n: int) -> list[tuple[str, str]]:
    """Written once and reused: ``root`` keeps them between runs."""
    out = []
    for i in range(n):
        path = root / f"adapter-{i:04d}"
        if not (path / "adapter_model.safetensors").exists():
            write_random_adapter(path, layout, RANKS[i % len(RANKS)], seed=i, targets=TARGETS, dtype=torch.float16)
        out.append((f"adapter-{i:04d}", str(path)))
    return out


async def run_open_loop(engine, requests, arrivals):
    async def one(req, at, t0):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return [ev async for ev in engine.submit(req)]

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(r, a, t0) for r, a in zip(requests, arrivals, strict=True)))
    return outs, time.perf_counter() - t0


def run(config, loaded, adapters, picks, prompts, arrivals, max_new):
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters)}), loaded)
    built.engine.start()
    try:
        reqs = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new, ignore_eos=True), adapters[a][0])
                for i, (a, p) in enumerate(zip(picks, prompts, strict=True))]
        outs, wall = asyncio.run(run_open_loop(built.engine, reqs, arrivals))
        counters = built.manager.tier_counters()
    finally:
        built.engine.stop()
    last = [o[-1] for o in outs]
    cold = [e.timing.time_to_first_token_seconds for e in last if e.timing.adapter_load_seconds > 0]
    warm = [e.timing.time_to_first_token_seconds for e in last if e.timing.adapter_load_seconds == 0]
    return {
        "tokens_per_s": sum(len(o) for o in outs) / wall, "wall_s": wall,
        "ttft_cold_p50": percentile(cold, 50), "ttft_warm_p50": percentile(warm, 50),
        "ttft_cold_p90": percentile(cold, 90), "ttft_warm_p90": percentile(warm, 90),
        "cold_requests": len(cold), "device_evictions": counters["device"].evictions,
        "host_misses": counters["host"].misses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--rate", type=float, default=40.0, help="Poisson arrival rate, requests/s (saturating)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "adapters")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    config = ServerConfig(model=args.model, max_batch_size=32, max_model_len=160, max_lora_rank=64,
                          default_max_new_tokens=args.new_tokens,
                          max_device_adapters=32, max_host_adapters=128, metrics_port=0)
    loaded = load_model(config)
    layout = lora_layout(loaded.hf_model.config)
    t = time.perf_counter()
    adapters = make_adapters(args.cache, layout, args.adapters)
    print(f"{len(adapters)} adapters ready in {time.perf_counter() - t:.0f} s ({args.cache})")
    rng = random.Random(0)
    vocab = loaded.hf_model.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 64))] for _ in range(args.requests)]
    arrivals, at = [], 0.0
    for _ in range(args.requests):
        at += rng.expovariate(args.rate)
        arrivals.append(at)
    picks = zipf_choices(args.adapters, args.requests, 1.0, rng)
    # The same request sequence folded onto 8 adapters (one of each rank, twice), all resident.
    few = [a for a in adapters[:8]]
    many = run(config, loaded, adapters, picks, prompts, arrivals, args.new_tokens)
    resident = run(config, loaded, few, [p % 8 for p in picks], prompts, arrivals, args.new_tokens)
    ratio = many["tokens_per_s"] / resident["tokens_per_s"]
    print(f"model {loaded.name}; {args.requests} requests, Poisson {args.rate}/s, Zipf(1.0), device capacity 32")
    print(f"  {args.adapters} adapters: {many['tokens_per_s']:7.1f} tok/s   ({many['cold_requests']} cold requests, "
          f"{many['device_evictions']} device evictions, {many['host_misses']} disk reads)")
    print(f"  8 resident:    {resident['tokens_per_s']:7.1f} tok/s")
    print(f"  ratio          {ratio:7.3f}   (target >= 0.9)")
    print(f"  TTFT p50 cold {many['ttft_cold_p50']:.3f} s vs warm {many['ttft_warm_p50']:.3f} s; "
          f"p90 cold {many['ttft_cold_p90']:.3f} s vs warm {many['ttft_warm_p90']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"many": many, "resident": resident, "ratio": ratio,
                                         "adapters": args.adapters, "requests": args.requests}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
