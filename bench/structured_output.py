"""What a structured output costs a decode step: 32 sampling requests on the default model, free
text against the same requests constrained by a JSON schema and by a regex, alternated in rounds
in one process (the in-process engine, no server). Prints each run's median full-batch decode step
and the constrained runs' step time over the free run's of the same round.

    python bench/structured_output.py [--rounds 3] [--requests 32] [--new-tokens 48] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.requests import GenerationRequest, OutputKind, SamplingParams, StructuredOutput  # noqa: E402

from common import StepRecorder, cpu_name  # noqa: E402

SCHEMA = {"type": "object", "required": ["name", "tags", "age"],
          "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                         "age": {"type": "integer"}}}
CONSTRAINTS = {"free": None, "json_schema": StructuredOutput(OutputKind.JSON_SCHEMA, json.dumps(SCHEMA)),
               "regex": StructuredOutput(OutputKind.REGEX, "[a-z ]{1,400}")}


def run(engine, recorder: StepRecorder, output, n: int, new: int, tag: str) -> float:
    """The median decode step with all ``n`` rows (seconds)."""
    async def one(i):
        params = SamplingParams(new, temperature=1.0, seed=i, ignore_eos=True, structured_output=output)
        async for _ in engine.submit(GenerationRequest(f"{tag}-{i}", tuple(range(100 + i, 132 + i)), params)):
            pass

    async def main():
        await asyncio.gather(*(one(i) for i in range(n)))

    recorder.steps.clear()
    asyncio.run(main())
    return statistics.median(s.seconds for s in recorder.steps if not s.num_prefill_tokens and s.num_decode_tokens == n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    args = ap.parse_args()
    built = build_engine(ServerConfig(model=args.model, max_batch_size=args.requests, max_model_len=256,
                                      default_max_new_tokens=64, metrics_port=0))
    recorder = StepRecorder()
    built.engine.observers.append(recorder)
    built.engine.start()
    print(f"CPU: {cpu_name()}")
    steps: dict[str, list[float]] = {name: [] for name in CONSTRAINTS}
    try:
        run(built.engine, recorder, CONSTRAINTS["json_schema"], 4, 4, "warm")  # the tokenizer's index, once
        for r in range(args.rounds):
            for name, output in CONSTRAINTS.items():
                steps[name].append(run(built.engine, recorder, output, args.requests, args.new_tokens, f"{name}{r}"))
    finally:
        built.engine.stop()
    for name, times in steps.items():
        ratios = [t / f for t, f in zip(times, steps["free"], strict=True)]
        print(f"  {name:12s} decode step {1e3 * statistics.median(times):6.1f} ms "
              f"(rounds: {', '.join(f'{1e3 * t:.1f}' for t in times)}), over free text: "
              f"{statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
