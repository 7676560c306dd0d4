"""#18's held-out shape, end to end: a small Llama (the 25M one of `make bench-decode`), 16 rank-16
all-projection adapters, prompts as long as the outputs (so prefill counts), all through gRPC.

One server with every adapter resident; alternated pairs of closed-loop runs (mixed adapters,
uniform; then the base model only, the order swapped every other pair, fresh prompts each run);
prints each pair's mixed/base and the median.

    python bench/prefill_heavy_grpc.py [--pairs 3] [--length 64] [--requests 64] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).parent))
from compare import Server, load_row, make_adapters  # noqa: E402

from loramux.clients.bench import LoadSpec  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402

from common import cpu_name  # noqa: E402
from engine_decode import SMALL, build_small_llama  # noqa: E402

ADAPTERS = 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--length", type=int, default=64, help="prompt and output tokens of every request")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(build_small_llama(tmp))
        adapters = make_adapters(tmp / "adapters", lora_layout(AutoConfig.from_pretrained(model)), ADAPTERS)
        try:
            server = Server(model, ["--adapter-dir", str(adapters), "--max-batch-size", str(args.concurrency),
                                "--max-lora-rank", "16", "--max-device-adapters", str(ADAPTERS),
                                "--max-host-adapters", str(ADAPTERS), "--max-model-len", str(max(512, 4 * args.length))],
                            tmp / "server.log")
        except RuntimeError:
            print((tmp / "server.log").read_text()[-2000:])  # the folder goes with the error
            raise
        def run(adapters: tuple[str, ...], seed: int) -> dict:
            spec = LoadSpec(num_requests=args.requests, concurrency=args.concurrency, adapters=adapters,
                            prompt_len=(args.length, args.length), output_len=(args.length, args.length),
                            vocab=(100, SMALL["vocab_size"]), seed=seed)
            row = load_row(server, spec)
            assert not row["errors"], row["errors"]
            return row

        order = [("mixed", tuple(f"a{i:02d}" for i in range(ADAPTERS))), ("base", ())]
        ratios = []
        try:
            for pair in range(args.pairs):
                rows = {name: run(a, 100 * pair + k) for k, (name, a) in enumerate(order[:: 1 - 2 * (pair % 2)])}
                ratios.append(rows["mixed"]["tokens_per_s"] / rows["base"]["tokens_per_s"])
                print(f"pair {pair}: mixed {rows['mixed']['tokens_per_s']:.1f} tok/s, base "
                      f"{rows['base']['tokens_per_s']:.1f} tok/s, mixed/base {ratios[-1]:.3f}; TTFT p50 "
                      f"{rows['mixed']['ttft_p50']:.2f} / {rows['base']['ttft_p50']:.2f} s", flush=True)
        finally:
            server.stop()
    print(f"{cpu_name()}: {ADAPTERS} adapters, {args.length}+{args.length} tokens, mixed/base median "
          f"{statistics.median(ratios):.3f} over {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
