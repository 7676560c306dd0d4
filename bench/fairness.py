"""Fairness between adapters: one adapter floods the server, a light one sends a few requests just
after. Light p99 TTFT against its TTFT alone, and the flood's throughput against the flood alone
run right before (the median of --repeats such pairs), under --scheduling fifo and fair, in one run (default
model, in-process engine). ``--policies priority`` adds --scheduling priority, the light requests at
priority -1 over the flood's 0.

Targets (issue #17): the light adapter's p99 TTFT <= 2x alone; the flood's throughput drops < 5%.

    python bench/fairness.py [--batch 8] [--flood-factor 10] [--light 3] [--max-tokens-per-step 512]
                             [--target-step-ms MS] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import percentile, random_prompts, write_adapter  # noqa: E402


async def one(engine, request_id, adapter, prompt, max_new, priority=0):
    req = GenerationRequest(request_id, tuple(prompt), SamplingParams(max_new, ignore_eos=True), adapter,
                            priority=priority)
    events, arrivals = [], []
    async for ev in engine.submit(req):
        events.append(ev)
        arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return events[-1].timing.time_to_first_token_seconds, len(events), arrivals[-1], gaps


def scenario(engine, flood, light, delay: float, light_priority: int = 0):
    """flood, light: lists of (prompt, max_new). Returns (light TTFTs, flood tokens/s, the flood's
    gaps between tokens)."""
    async def main():
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(engine, f"f{i}", "flood", p, n)) for i, (p, n) in enumerate(flood)]
        if light:
            await asyncio.sleep(delay)
            tasks += [asyncio.create_task(one(engine, f"l{i}", "light", p, n, light_priority))
                      for i, (p, n) in enumerate(light)]
        done = await asyncio.gather(*tasks)
        flood_done = done[: len(flood)]
        tokens = sum(n for _, n, _, _ in flood_done)
        end = max((t for _, _, t, _ in flood_done), default=t0)
        return ([ttft for ttft, _, _, _ in done[len(flood):]], tokens / (end - t0) if flood else 0.0,
                [g for *_, gaps in flood_done for g in gaps])
    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=8, help="--max-batch-size")
    ap.add_argument("--max-tokens-per-step", type=int, default=512,
                    help="the step budget: the step under way is what a newly arrived request waits behind")
    ap.add_argument("--target-step-ms", type=float, default=None,
                    help="the server's --target-step-ms (default: off): the step budget sized in time")
    ap.add_argument("--flood-factor", type=int, default=10, help="flood requests = this x batch")
    ap.add_argument("--light", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds after the flood the light requests come")
    ap.add_argument("--repeats", type=int, default=3,
                    help="flood-alone and mixed runs, alternated; the median drop is reported (this VM is noisy)")
    ap.add_argument("--policies", nargs="+", default=["fifo", "fair"], choices=["fifo", "fair", "priority"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = ServerConfig(model=args.model, max_batch_size=args.batch, max_tokens_per_step=args.max_tokens_per_step,
                        target_step_ms=args.target_step_ms, max_model_len=256,
                        default_max_new_tokens=48, max_lora_rank=16, max_device_adapters=2, max_host_adapters=2,
                        metrics_port=0)
    loaded = load_model(base)
    vocab = loaded.hf_model.config.vocab_size
    rng = random.Random(0)
    n_flood = args.flood_factor * args.batch
    prompts = random_prompts(vocab, n_flood + args.light, 32, seed=2)
    flood = [(prompts[i], rng.randint(16, 48)) for i in range(n_flood)]
    light = [(prompts[n_flood + i], 32) for i in range(args.light)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        layout = lora_layout(loaded.hf_model.config)
        adapters = tuple((name, str(write_adapter(Path(tmp) / name, layout, 16, seed=i)))
                         for i, name in enumerate(("flood", "light")))
        for policy in args.policies:
            built = build_engine(ServerConfig(**{**base.__dict__, "adapters": adapters, "scheduling": policy}), loaded)
            engine = built.engine
            engine.start()
            urgent = -1 if policy == "priority" else 0
            scenario(engine, flood[:4], light[:1], 0.0)  # warm-up: both adapters resident
            alone, floods_alone, floods_mixed, mixed, gaps = [], [], [], [], []
            for _ in range(args.repeats):  # alternated, so drift on the machine hits both sides alike
                alone += scenario(engine, [], light, 0.0)[0]
                floods_alone.append(scenario(engine, flood, [], 0.0)[1])
                ttfts, tok_s, flood_gaps = scenario(engine, flood, light, args.delay, urgent)
                mixed += ttfts
                floods_mixed.append(tok_s)
                gaps += flood_gaps
            engine.stop()
            # each repeat's drop against the flood alone right before it: the VM drifts by more
            # than 5% between repeats a minute apart
            drops = [1 - m / a for a, m in zip(floods_alone, floods_mixed, strict=True)]
            p99_alone, p99 = percentile(alone, 99), percentile(mixed, 99)
            results[policy] = dict(light_p99_alone_s=p99_alone, light_p99_s=p99, ttft_ratio=p99 / p99_alone,
                                   flood_tok_s_alone=floods_alone, flood_tok_s=floods_mixed, flood_drops=drops,
                                   flood_drop=statistics.median(drops), flood_itl_p50_s=percentile(gaps, 50),
                                   flood_itl_p99_s=percentile(gaps, 99))
            r = results[policy]
            print(f"{policy}: light p99 TTFT {p99 * 1e3:7.0f} ms (alone {p99_alone * 1e3:5.0f} ms) = "
                  f"{r['ttft_ratio']:5.2f}x (target <= 2); flood drop {r['flood_drop']:+.1%}, median of "
                  + ", ".join(f"{m:.1f}/{a:.1f} tok/s ({d:+.1%})" for a, m, d in zip(floods_alone, floods_mixed, drops, strict=True))
                  + f" (with light / alone; target < 5%); the flood's gaps between tokens p50 "
                  f"{r['flood_itl_p50_s'] * 1e3:.0f} ms, p99 {r['flood_itl_p99_s'] * 1e3:.0f} ms")
    if args.json:
        settings = dict(max_tokens_per_step=args.max_tokens_per_step, target_step_ms=args.target_step_ms)
        args.json.write_text(json.dumps({"settings": settings, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
