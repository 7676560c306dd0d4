"""`make bench` row 7's 8- and 1000-adapter points in process, step by step: where 1000/8 is lost.

The same load as row 7 (rank-16 adapters on all seven projections, Zipf 1.0 over n registered ids,
64 requests of 32 prompt and 32 new tokens in a closed loop of 32, device capacity 32, host 64,
a fresh engine a run), in alternated pairs, without the gRPC server. Each run prints its wall time,
its decode-only steps (count, mean time, rows, distinct adapters), its steps with prefill, and the
adapter I/O thread's CPU time; the summary puts the decode steps' difference next to the floor of
the extra distinct adapters' bytes (`make bench-decode`'s read of that many bytes on huge pages,
same threads, same run), the part of the loss no scheduling can remove while adapter reads run in
series with the base model.

    python bench/scale_steps.py [--pairs 3] [--many 1000] [--model DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import adapter_paging  # noqa: E402
from compare import make_adapters, scaled_dir  # noqa: E402

from loramux.clients.stats import zipf_choices  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model, resolve_model_dir  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import StepRecorder, cpu_name  # noqa: E402
from engine_decode import floor_buffer, read_seconds  # noqa: E402

REQUESTS, CONCURRENCY, PROMPT, NEW = 64, 32, 32, 32


async def closed_loop(engine, picks: list[int], rng: random.Random, vocab: int) -> tuple[int, float]:
    queue, tokens, start = list(range(REQUESTS)), 0, time.perf_counter()

    async def client():
        nonlocal tokens
        while queue:
            i = queue.pop(0)
            prompt = tuple(rng.randrange(100, vocab) for _ in range(PROMPT))
            async for _ in engine.submit(GenerationRequest(f"r{i}", prompt, SamplingParams(NEW, ignore_eos=True),
                                                           f"s{picks[i]:04d}")):
                tokens += 1

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return tokens, time.perf_counter() - start


def one_run(loaded, base: ServerConfig, folder: Path, n: int) -> dict:
    rng = random.Random(7)
    picks = zipf_choices(n, REQUESTS, 1.0, rng)
    built = build_engine(ServerConfig(**{**base.__dict__, "adapter_dirs": (str(folder),)}), loaded)
    recorder = StepRecorder()
    built.engine.observers.append(recorder)
    built.engine.start()
    try:
        vocab = min(20000, loaded.hf_model.config.vocab_size)  # row 7's prompts: ids in [100, 20000)
        tokens, wall = asyncio.run(closed_loop(built.engine, picks, rng, vocab))
        io = adapter_paging.thread_cpu_seconds("adapter-io")
    finally:
        built.engine.stop()
    decode = [s for s in recorder.steps if not s.num_prefill_tokens]
    prefill = [s for s in recorder.steps if s.num_prefill_tokens]
    return {"n": n, "tok_s": tokens / wall, "wall": wall, "decode_steps": len(decode),
            "decode_ms": 1e3 * statistics.mean(s.seconds for s in decode),
            "rows": statistics.mean(s.num_decode_tokens for s in decode),
            "adapters": statistics.mean(s.num_adapters for s in decode),
            "prefill_steps": len(prefill), "prefill_s": sum(s.seconds for s in prefill), "io_cpu_s": io}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    ap.add_argument("--work", type=Path, default=Path("bench/results/work"), help="adapter folders (make bench's)")
    args = ap.parse_args()
    base = ServerConfig(model=args.model, max_batch_size=32, max_model_len=256, default_max_new_tokens=16,
                        max_lora_rank=16, max_device_adapters=32, max_host_adapters=64, metrics_port=0)
    loaded = load_model(base)
    layout = lora_layout(loaded.hf_model.config)
    distinct = make_adapters(args.work / f"adapters-{resolve_model_dir(base)[0].name}", layout, 32)
    folders = {n: scaled_dir(args.work, distinct, n) for n in (8, args.many)}
    adapter_bytes = sum(f.stat().st_size for f in distinct.glob("a00/*.safetensors"))
    print(cpu_name())
    runs: dict[int, list[dict]] = {8: [], args.many: []}
    for pair in range(args.pairs):
        for n in (8, args.many) if pair % 2 == 0 else (args.many, 8):
            r = one_run(loaded, base, folders[n], n)
            runs[n].append(r)
            print(f"  {n:5d} adapters: {r['tok_s']:6.1f} tok/s, wall {r['wall']:.2f} s; {r['decode_steps']} decode "
                  f"steps of {r['decode_ms']:.1f} ms ({r['rows']:.1f} rows, {r['adapters']:.1f} adapters); "
                  f"{r['prefill_steps']} with prefill, {r['prefill_s']:.2f} s; I/O thread {r['io_cpu_s']:.2f} s CPU",
                  flush=True)
    few, many = runs[8], runs[args.many]
    ratio = statistics.median(m["tok_s"] / f["tok_s"] for f, m in zip(few, many, strict=True))
    extra_ms = statistics.median(m["decode_ms"] - f["decode_ms"] for f, m in zip(few, many, strict=True))
    extra_adapters = statistics.mean(m["adapters"] - f["adapters"] for f, m in zip(few, many, strict=True))
    buf = floor_buffer(int(extra_adapters * adapter_bytes))  # on huge pages, as the adapter store
    floor_ms = 1e3 * statistics.median(read_seconds(buf) for _ in range(5))
    prefill_s = statistics.median(m["prefill_s"] - f["prefill_s"] for f, m in zip(few, many, strict=True))
    print(f"{args.many}/8 median {ratio:.3f}; decode steps {extra_ms:+.1f} ms for {extra_adapters:.1f} more distinct "
          f"adapters a step, whose bytes read once take {floor_ms:.1f} ms ({extra_ms / floor_ms:.2f}x); "
          f"steps with prefill {prefill_s:+.2f} s")


if __name__ == "__main__":
    main()
