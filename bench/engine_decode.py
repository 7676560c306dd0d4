"""Decode at the memory floor: 32 requests over 32 distinct adapters (rank 16, all seven
projections) next to the same 32 requests on the base model alone, in one run, for the default
model and for a small Llama (hidden 512, 6 layers, about 25M parameters, random weights, built
on the fly), where per-call overhead dominates.

The floor is the time to read one decode step's distinct adapter bytes once (every page of every
adapter in the batch), measured with the same threads in the same run: a sum over as many bytes on
the same (huge) pages. The LoRA overhead is the mixed decode step time minus the base one (medians
over each run's full-batch decode steps). On a shared VM whose speed drifts by more than the whole
overhead between runs of a few seconds, that difference is noise, so each round also runs the
mixed batch once more with the LoRA op skipped on every other step, and the floor read on the
engine thread after each step: adjacent steps, a few hundred ms apart, differ by the LoRA work
alone, and the median over pairs of (difference / floor read next to it) is the quotient the
target is judged on. Targets: overhead <= 1.3x the floor (issue #18), and
mixed/base decode throughput >= 0.85.

A third paired run puts a plain read (a sum) of the very pages each LoRA call would read in that
call's place: what reading the step's adapter bytes costs inside the step, where they also push the
base weights out of the CPU's caches, against the floor's read on its own. The LoRA op's overhead
over that in-step read is the part a faster kernel could still remove.

Prefill is measured side by side too: 32 prompts of 256 tokens over the same 32 adapters against
the base model (prefill-only steps), each round's mixed run divided by the base run right before
it, the median reported (target mixed/base >= 0.9). As for decode, runs of ten seconds drift by
more than the LoRA work, so a paired run skips the LoRA op on every other full prefill step (as
many tokens as a step takes): each adjacent pair gives the step without over the step with, and
the median over pairs is printed next to the run-against-run ratio.

    python bench/engine_decode.py [--models default small] [--rounds 5] [--new-tokens 48] [--prefill-len 256]
                                  [--dtype bfloat16] [--lora-dtype ...] [--op-backend ...] [--lm-head]
                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters import huge_pages  # noqa: E402
from loramux.adapters.synthetic import ALL_PROJ  # noqa: E402
from loramux.clients.runs import runs  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.engine import EngineObserver, StepStats  # noqa: E402
from loramux.server.model_loader import load_model, resolve_model_dir  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.ops import cpu_isa  # noqa: E402
from loramux.server.torch_threads import in_passing_thread  # noqa: E402

from common import build_random_llama, cpu_name, random_prompts, run_batch, write_adapter  # noqa: E402

SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, tie_word_embeddings=True)  # about 25M parameters


def build_small_llama(tmp: Path) -> str:
    """The 25M Llama (random weights, the default model's tokenizer), written under ``tmp``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(ServerConfig())[0])
    return str(build_random_llama(tmp / "small-llama", SMALL, tokenizer, torch.device("cpu"), torch.float32))


def each_model(args, bench):
    """Print the CPU, then yield ``bench(model, args, tmp)`` for each of ``args.models`` ("default":
    ``args.model``, or the embedded one; "small": the 25M Llama, built on the fly under ``tmp``)."""
    print(f"CPU: {cpu_name()}; torch dispatches {cpu_isa()}; {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for which in args.models:
            yield bench(build_small_llama(tmp) if which == "small" else getattr(args, "model", None), args, tmp)


@in_passing_thread
def floor_buffer(nbytes: int) -> torch.Tensor:
    """A float32 buffer of ``nbytes``, written now (so page faults stay out of the timing), on the
    same huge pages as the adapter store it stands for."""
    return huge_pages.zeros((max(1, nbytes // 4),), torch.float32, "cpu").fill_(1.0)


def read_seconds(buf: torch.Tensor) -> float:
    """Time to read ``buf`` once (a sum) with this thread's torch threads."""
    t = time.perf_counter()
    buf.sum()
    return time.perf_counter() - t


@dataclass
class Pair:
    overhead: float  # the LoRA step's seconds minus its neighbour's without
    floor: float  # seconds to read the floor buffer, next to them (the mean of the reads after each)
    base: float  # the seconds of the step without


class AlternatingLoRA(EngineObserver):
    """Stands in for the runner's LoRA op and skips it on every other step, so that adjacent
    steps of one run (a few hundred ms apart) differ by the LoRA work alone. It records the
    full-batch decode steps (or, with ``prefill_tokens``, the prefill-only steps of that many
    tokens); after each, on the engine thread (the engine's own threads), it reads the floor
    buffer once, if it has one. The VM's speed
    drifts by more than the whole overhead between runs of a few seconds; adjacent steps and the
    reads between them share it. The skipped steps' tokens are wrong, which a timing run does not
    read."""

    def __init__(self, op, full_batch: int, floor_buf: torch.Tensor | None = None, prefill_tokens: int = 0):
        self.op, self.full_batch, self.floor_buf, self.on = op, full_batch, floor_buf, True
        self.prefill_tokens = prefill_tokens  # > 0: record prefill-only steps of that many tokens instead
        # (LoRA computed, seconds, floor read after it: NaN without a buffer) of each recorded step
        self.steps: list[tuple[bool, float, float]] = []

    def __call__(self, *args, **kwargs):
        if self.on:
            self.op(*args, **kwargs)

    def with_linear(self, *args, **kwargs):
        """The op's base linear with LoRA in one call (TorchLoRA.with_linear) on the LoRA steps;
        None on the others, and for stand-ins without it, so the caller runs the linear alone."""
        with_linear = getattr(self.op, "with_linear", None)
        return with_linear(*args, **kwargs) if self.on and with_linear is not None else None

    def step(self, stats: StepStats) -> None:  # called after the step's time was taken
        if self.prefill_tokens:
            recorded = stats.num_prefill_tokens == self.prefill_tokens and stats.num_decode_tokens == 0
        else:
            recorded = stats.num_prefill_tokens == 0 and stats.num_decode_tokens == self.full_batch
        if recorded:
            floor = read_seconds(self.floor_buf) if self.floor_buf is not None else float("nan")
            self.steps.append((self.on, stats.seconds, floor))
        self.on = not self.on

    def pairs(self) -> list[Pair]:
        """Adjacent recorded steps, one with LoRA and one without."""
        s = self.steps
        pairs = [(a, b) if a[0] else (b, a) for a, b in zip(s[:-1:2], s[1::2], strict=True) if a[0] != b[0]]
        return [Pair(on[1] - off[1], (on[2] + off[2]) / 2, off[1]) for on, off in pairs]


def by_floor_thirds(pairs: list[Pair]) -> tuple[float, float]:
    """The median overhead / floor of the pairs whose floor read was in the fastest third, and of
    those in the slowest third: the memory's speed swings within a run on these VMs, and the
    quotient is not the same in a fast stretch as in a slow one."""
    ranked = sorted(pairs, key=lambda p: p.floor)
    third = max(1, len(ranked) // 3)
    return (median(p.overhead / p.floor for p in ranked[:third]),
            median(p.overhead / p.floor for p in ranked[-third:]))


def page_runs(pages: torch.Tensor) -> list[tuple[int, int]]:
    """The distinct entries of ``pages`` as ascending [lo, hi) runs of consecutive page indices."""
    return [(lo, hi + 1) for lo, hi in runs(pages.flatten().tolist())]


class PageRead:
    """Stands in for the LoRA op (same signature): reads every page of A and of B that a call's
    plan names, once, with a sum over each run of consecutive pages, and computes nothing else.
    Where a page's A and B rows are one row of memory (the pool the C++ op reads), the run's rows
    are summed whole, as one stretch of memory."""

    def __init__(self):
        self._runs: dict[int, tuple[object, list[tuple[int, int]]]] = {}  # id(plan) -> (plan, runs)

    def runs(self, plan) -> list[tuple[int, int]]:
        """The plan's page runs, computed once: a step's layers share its plans."""
        hit = self._runs.get(id(plan))
        if hit is None or hit[0] is not plan:  # an id of a plan gone since is reused
            if len(self._runs) > 64:
                self._runs.clear()
            hit = (plan, page_runs(torch.cat([g.pages for g in plan.groups])))
            self._runs[id(plan)] = hit
        return hit[1]

    @staticmethod
    def stretches(a_store, b_store, lo: int, hi: int) -> list[torch.Tensor]:
        """The memory of pages [lo, hi): their rows whole where a page's A and B are one row of
        memory, else the A rows and the B rows."""
        row = a_store.stride(0)
        if b_store.stride(0) == row and 0 < b_store.data_ptr() - a_store.data_ptr() < row * a_store.element_size():
            return [a_store.as_strided((hi - lo, row), (row, 1), a_store.storage_offset() + lo * row)]
        return [a_store[lo:hi], b_store[lo:hi]]

    def __call__(self, y, x, a_store, b_store, plan, bounds=None, used=None, bias=None) -> None:
        for lo, hi in self.runs(plan):
            for t in self.stretches(a_store, b_store, lo, hi):
                t.sum()


def paired_run(engine, prompts, ids, new_tokens: int, floor_buf: torch.Tensor | None, op=None,
               prefill_tokens: int = 0) -> list[Pair]:
    """Alternate steps with and without ``op`` (default: the runner's LoRA op); pairs of full-batch
    decode steps, or with ``prefill_tokens`` of prefill-only steps of that many tokens."""
    runner = engine.runner
    original = runner.apply_lora
    alt = AlternatingLoRA(op or original, len(prompts), floor_buf, prefill_tokens)
    runner.apply_lora = alt
    engine.observers.append(alt)
    try:
        run_batch(engine, prompts, ids, new_tokens)
    finally:
        engine.observers.remove(alt)
        runner.apply_lora = original
    return alt.pairs()


def bench_model(model: str | None, args, tmp: Path) -> dict:
    n = args.requests
    config = ServerConfig(model=model, max_batch_size=n, max_tokens_per_step=max(512, n),
                          max_model_len=max(args.prompt_len + args.new_tokens, args.prefill_len) + 8,
                          default_max_new_tokens=args.new_tokens, max_lora_rank=args.rank, max_device_adapters=n,
                          max_host_adapters=n, metrics_port=0, dtype=args.dtype, lora_dtype=args.lora_dtype,
                          op_backend=args.op_backend, enable_lm_head_lora=args.lm_head,
                          prefix_caching=False)  # rounds repeat their prompts: each must prefill in full
    loaded = load_model(config)
    layout, targets = lora_layout(loaded.hf_model.config), ALL_PROJ
    if args.lm_head:
        layout, targets = layout.with_head(*reversed(loaded.hf_model.lm_head.weight.shape)), (*ALL_PROJ, "lm_head")
    adapters = tuple((f"a{i}", str(write_adapter(tmp / f"{loaded.name}-a{i}", layout, args.rank, seed=i,
                                                 targets=targets))) for i in range(n))
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": adapters}), loaded)
    engine = built.engine
    engine.start()
    try:
        prompts = random_prompts(loaded.hf_model.config.vocab_size, n, args.prompt_len)
        ids = [a for a, _ in adapters]
        run_batch(engine, prompts[:4], ids[:4], 4)  # warm-up: first-touch of pages, allocator
        run_batch(engine, prompts, ids, 2)  # every adapter resident before timing
        long_prompts = random_prompts(loaded.hf_model.config.vocab_size, n, args.prefill_len, seed=1)
        adapter_bytes = n * args.rank * built.manager.pool.page_bytes  # every page of every adapter in the step
        floor_buf = floor_buffer(adapter_bytes)
        base, mixed, pairs, read_pairs, prefill_base, prefill_mixed, prefill_pairs = [], [], [], [], [], [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            base.append(run_batch(engine, prompts, [None] * n, args.new_tokens))
            mixed.append(run_batch(engine, prompts, ids, args.new_tokens))
            pairs += paired_run(engine, prompts, ids, args.new_tokens, floor_buf)
            read_pairs += paired_run(engine, prompts, ids, args.new_tokens, floor_buf, PageRead())
            if args.prefill_len:
                prefill_base.append(run_batch(engine, long_prompts, [None] * n, 1))
                prefill_mixed.append(run_batch(engine, long_prompts, ids, 1))
                prefill_pairs += paired_run(engine, long_prompts, ids, 1, None,
                                            prefill_tokens=config.max_tokens_per_step)
    finally:
        engine.stop()
    step_base = median(r.decode_step_s for r in base)
    step_mixed = median(r.decode_step_s for r in mixed)
    floor = median(p.floor for p in pairs)
    params = sum(p.numel() for p in loaded.hf_model.parameters())
    fast_third, slow_third = by_floor_thirds(pairs)
    return {
        "model": loaded.name, "parameters": params, "requests": n, "distinct_adapters": n, "rank": args.rank,
        "targets": "all 7 projections" + (" and lm_head" if args.lm_head else ""), "rounds": args.rounds,
        "dtype": str(loaded.dtype).removeprefix("torch."), "lora_dtype": args.lora_dtype,
        "base_decode_tokens_per_s": median(r.decode_tokens_per_s for r in base),
        "mixed_decode_tokens_per_s": median(r.decode_tokens_per_s for r in mixed),
        "ratio": median(r.decode_tokens_per_s for r in mixed) / median(r.decode_tokens_per_s for r in base),
        "base_step_ms": step_base * 1e3, "mixed_step_ms": step_mixed * 1e3,
        "lora_overhead_ms": (step_mixed - step_base) * 1e3, "adapter_bytes_per_step": adapter_bytes,
        "floor_ms": floor * 1e3, "overhead_over_floor": (step_mixed - step_base) / floor,
        "paired_lora_overhead_ms": median(p.overhead for p in pairs) * 1e3, "paired_pairs": len(pairs),
        "paired_overhead_over_floor": median(p.overhead / p.floor for p in pairs),
        "paired_overhead_over_floor_fast_third": fast_third, "paired_overhead_over_floor_slow_third": slow_third,
        "paired_floor_ms_range": [min(p.floor for p in pairs) * 1e3, max(p.floor for p in pairs) * 1e3],
        "in_step_read_ms": median(p.overhead for p in read_pairs) * 1e3,
        "in_step_read_over_floor": median(p.overhead / p.floor for p in read_pairs),
        "paired_overhead_over_in_step_read": median(p.overhead for p in pairs) / median(p.overhead for p in read_pairs),
        "prefill_len": args.prefill_len,
        "base_prefill_tokens_per_s": median(r.prefill_tokens_per_s for r in prefill_base) if prefill_base else None,
        "mixed_prefill_tokens_per_s": median(r.prefill_tokens_per_s for r in prefill_mixed) if prefill_mixed else None,
        # each round's mixed prefill against the base prefill right before it, then the median
        "prefill_ratio": median(m.prefill_tokens_per_s / b.prefill_tokens_per_s
                                for b, m in zip(prefill_base, prefill_mixed, strict=True)) if prefill_base else None,
        # full prefill steps with and without the LoRA op, adjacent: without / with, the median over pairs
        "paired_prefill_ratio": median(p.base / (p.base + p.overhead) for p in prefill_pairs) if prefill_pairs else None,
        "paired_prefill_pairs": len(prefill_pairs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the default model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--models", nargs="+", default=["default", "small"], choices=["default", "small"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-len", type=int, default=256, help="prompt length of the prefill comparison (0: skip)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--lora-dtype", default="auto", help="the server's --lora-dtype (the floor reads the pages' bytes)")
    ap.add_argument("--op-backend", default="auto", help="the server's --op-backend")
    ap.add_argument("--lm-head", action="store_true", help="the adapters target lm_head too (--enable-lm-head-lora)")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (auto: float32 on a CPU; bfloat16 runs the "
                                                    "base matmuls on AMX where the CPU has it)")
    args = ap.parse_args()

    results = []
    for r in each_model(args, bench_model):
        results.append(r)
        print(f"model {r['model']} ({r['parameters'] / 1e6:.0f}M parameters), {r['requests']} requests, "
              f"median of {r['rounds']}, {r['dtype']}, --lora-dtype {r['lora_dtype']}, rank {r['rank']} on "
              f"{r['targets']}:")
        print(f"  decode tokens/s: base {r['base_decode_tokens_per_s']:7.1f}, {r['requests']} distinct adapters "
              f"{r['mixed_decode_tokens_per_s']:7.1f}, ratio {r['ratio']:.3f} (target >= 0.85)")
        print(f"  step: base {r['base_step_ms']:6.1f} ms, mixed {r['mixed_step_ms']:6.1f} ms; LoRA overhead "
              f"{r['lora_overhead_ms']:6.1f} ms against a floor of {r['floor_ms']:5.1f} ms "
              f"({r['adapter_bytes_per_step'] / 2**20:.0f} MiB read once) = {r['overhead_over_floor']:.2f}x")
        print(f"  paired steps (LoRA on and off in adjacent steps of one run, the floor read between them; median "
              f"of {r['paired_pairs']} pairs): overhead {r['paired_lora_overhead_ms']:5.1f} ms, "
              f"{r['paired_overhead_over_floor']:.2f}x its floor (target <= 1.3)")
        lo, hi = r["paired_floor_ms_range"]
        print(f"    the pairs whose floor read was fastest (a third of them): {r['paired_overhead_over_floor_fast_third']:.2f}x; "
              f"slowest: {r['paired_overhead_over_floor_slow_third']:.2f}x (floor reads {lo:.1f}-{hi:.1f} ms)")
        print(f"  the same pages read (a sum) in the LoRA op's place, paired the same way: {r['in_step_read_ms']:5.1f} ms, "
              f"{r['in_step_read_over_floor']:.2f}x the floor; the LoRA op costs "
              f"{r['paired_overhead_over_in_step_read']:.2f}x that in-step read")
        if r["prefill_ratio"] is not None:
            print(f"  prefill tokens/s ({r['requests']} prompts of {r['prefill_len']}): base "
                  f"{r['base_prefill_tokens_per_s']:7.1f}, {r['requests']} distinct adapters "
                  f"{r['mixed_prefill_tokens_per_s']:7.1f}, ratio {r['prefill_ratio']:.3f} (target >= 0.9)")
        if r["paired_prefill_ratio"] is not None:
            print(f"  paired prefill steps ({r['paired_prefill_pairs']} pairs of adjacent full steps, LoRA on and off): "
                  f"ratio {r['paired_prefill_ratio']:.3f} (target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
