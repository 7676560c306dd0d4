"""Decode throughput: 32 requests over 32 distinct adapters (rank 16, all seven projections)
next to the same 32 requests on the base model alone, in one run. Target ratio >= 0.85.

    python bench/engine_decode.py [--rounds 3] [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters.synthetic import write_random_adapter  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402

from common import random_prompts, run_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    n = args.requests
    config = ServerConfig(model=args.model, max_batch_size=n, max_tokens_per_step=max(512, n),
                          max_model_len=args.prompt_len + args.new_tokens + 8, default_max_new_tokens=args.new_tokens,
                          max_lora_rank=args.rank,
                          max_device_adapters=n, max_host_adapters=n, metrics_port=0)
    loaded = load_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        layout = lora_layout(loaded.hf_model.config)
        adapters = tuple((f"a{i}", str(write_random_adapter(Path(tmp) / f"a{i}", layout, args.rank, seed=i)))
                         for i in range(n))
        built = build_engine(ServerConfig(**{**config.__dict__, "adapters": adapters}), loaded)
        engine = built.engine
        engine.start()
        prompts = random_prompts(loaded.hf_model.config.vocab_size, n, args.prompt_len)
        ids = [a for a, _ in adapters]
        run_batch(engine, prompts[:4], ids[:4], 4)  # warm-up: first-touch of pages, allocator
        run_batch(engine, prompts, ids, 2)  # every adapter resident before timing
        base, mixed = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            base.append(run_batch(engine, prompts, [None] * n, args.new_tokens).decode_tokens_per_s)
            mixed.append(run_batch(engine, prompts, ids, args.new_tokens).decode_tokens_per_s)
        engine.stop()
    result = {
        "model": loaded.name, "requests": n, "distinct_adapters": n, "rank": args.rank, "targets": "all 7 projections",
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "base_decode_tokens_per_s": median(base), "mixed_decode_tokens_per_s": median(mixed),
        "ratio": median(mixed) / median(base), "target": 0.85,
    }
    print(f"model {loaded.name}, {n} requests, decode tokens/s (median of {args.rounds}):")
    print(f"  base model only          {result['base_decode_tokens_per_s']:8.1f}")
    print(f"  {n} distinct adapters     {result['mixed_decode_tokens_per_s']:8.1f}")
    print(f"  ratio mixed / base       {result['ratio']:8.3f}   (target >= 0.85)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
