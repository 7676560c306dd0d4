"""What DoRA costs next to plain LoRA: the default model serving 32 requests over 8 adapters of
rank 16 on every projection, as plain LoRA adapters and as DoRA adapters with the same A and B,
and the base model alone, alternated in rounds in one process (the in-process engine, no server).
Prints each run's median full-batch decode step and prefill throughput, DoRA's decode step over
LoRA's, and what DoRA adds over the LoRA path (DoRA - LoRA) / (LoRA - base).

    python bench/dora.py [--rounds 3] [--requests 32] [--adapters 8] [--prompt 64] [--new-tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters.synthetic import write_random_adapter  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import StepRecorder, cpu_name, random_prompts  # noqa: E402

RANK = 16


def run(engine, recorder: StepRecorder, prompts, adapters, new: int, tag: str) -> tuple[float, float]:
    """(median full-batch decode step in seconds, prefill tokens per second)."""
    async def one(i, prompt):
        params = SamplingParams(new, ignore_eos=True)
        async for _ in engine.submit(GenerationRequest(f"{tag}-{i}", tuple(prompt), params,
                                                       adapters[i % len(adapters)] if adapters else None)):
            pass

    async def main():
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    recorder.steps.clear()
    asyncio.run(main())
    return recorder.decode_step_seconds(), recorder.prefill_throughput()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    args = ap.parse_args()
    built = build_engine(ServerConfig(model=args.model, enable_dora=True, max_batch_size=args.requests, max_model_len=256,
                                      max_lora_rank=RANK, max_device_adapters=2 * args.adapters + 2,
                                      max_host_adapters=2 * args.adapters + 2, default_max_new_tokens=64,
                                      max_tokens_per_step=max(512, args.requests * args.prompt), metrics_port=0))
    layout = built.engine.runner.model.lora_layout()
    runs: dict[str, list[str] | None] = {"base": None, "lora": [], "dora": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.adapters):  # the same A and B under both names
            for kind in ("lora", "dora"):
                path = write_random_adapter(Path(tmp) / f"{kind}{i}", layout, RANK, seed=i, dora=kind == "dora")
                built.registry.register(f"{kind}{i}", path, trusted=True)
                runs[kind].append(f"{kind}{i}")
        recorder = StepRecorder()
        built.engine.observers.append(recorder)
        built.engine.start()
        print(f"CPU: {cpu_name()}")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        try:
            for r in range(-1, args.rounds):  # round -1 warms: every adapter loaded, every shape run once
                for k, (name, adapters) in enumerate(runs.items()):
                    # a seed per run: prompts the prefix cache has not seen
                    prompts = random_prompts(built.engine.vocab_size, args.requests, args.prompt, 10 * r + k + 10)
                    result = run(built.engine, recorder, prompts, adapters, args.new_tokens if r >= 0 else 4,
                                 f"{name}{r}")
                    if r >= 0:
                        results[name].append(result)
        finally:
            built.engine.stop()
    for name, rounds in results.items():
        steps = [d for d, _ in rounds]
        print(f"  {name:5s} decode step {1e3 * statistics.median(steps):6.1f} ms (rounds: "
              f"{', '.join(f'{1e3 * d:.1f}' for d in steps)}), prefill {statistics.median(p for _, p in rounds):7.0f} "
              "tok/s")
    step = {name: [d for d, _ in rounds] for name, rounds in results.items()}
    over = statistics.median(d / lo for d, lo in zip(step["dora"], step["lora"], strict=True))
    added = statistics.median((d - lo) / (lo - b) for d, lo, b in zip(step["dora"], step["lora"], step["base"],
                                                                       strict=True))
    prefill = statistics.median(d[1] / lo[1] for d, lo in zip(results["dora"], results["lora"], strict=True))
    print(f"  DoRA decode step over LoRA's: {over:.3f}; DoRA adds {100 * added:.1f}% to the LoRA path's "
          f"time; DoRA prefill over LoRA's: {prefill:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
