"""Paged KV and prefix caching, measured side by side in one run (default model, in-process engine).

1. TTFT: 8 adapters, each with its own 512-token system prompt; 64 requests (8 per adapter, a
   short distinct question each) from 8 closed-loop clients. Prefix caching on vs off; target: p50
   TTFT at least 3x lower with it on.
2. A burst: 32 requests to one adapter, a 128-token system prompt and a short question each, all
   queued at once. Caching on vs off: TTFT p50 and the share of prompt tokens served from the
   cache, against the most there is to serve (every request's system prompt but the first's full
   blocks: requests that arrive together compute their common prefix once).
3. Concurrency at equal KV memory: requests of 100 prompt + 100 new tokens, --max-model-len 2048,
   --max-batch-size 256. The pool gets the memory the old design reserved for SLOTS sequences
   (SLOTS x 2048 tokens); the peak number of running sequences holding KV is compared with SLOTS.
   Target: at least 8x.

4. Conversations: 8 clients, each holding one conversation of 4 turns (its own 256-token system
   prompt, a user message of 16-32 tokens a turn, answers of 64 tokens); every later turn sends
   the whole conversation so far. Caching on vs off: later turns' TTFT p50 and their prompt
   tokens served from the cache, against the most there is to serve (the previous turns, prompts
   and answers, in full blocks).

5. Few-shot prompts in one request (as evaluation harnesses send a batch): 8 prompts of 32 tokens
   each after the same 512 (new ones each of 5 rounds), submitted together as the server submits a
   request's prompts. Caching on vs off: TTFT p50, and the share of prompt tokens from the cache
   against the most (every prompt's shared full blocks but the first's).

6. Branches: 16 requests one after another, each the first 128-983 tokens of one 1024-token root
   (a random length each: an agent's rewritten history, a document quoted to varying depth) and 32
   tokens of its own. Caching on vs off: TTFT p50 and mean, and the share of prompt tokens from
   the cache against the most (what each shares with an earlier one, in full blocks). A hybrid serves that
   only where a state is cached below where it parts: ``--cached-state-interval`` (README).

    python bench/prefix_cache.py [--slots 16] [--cached-state-interval 0] [--json out.json]

With ``--model`` a model with recurrent layers (a hybrid), parts 1, 2 and 4 measure prefix caching
by cached states (README), and ``--concurrency-requests 0`` skips part 3, which is about K/V alone.
Requests of parts 1, 2 and 4 say where their system prompt ends (``shared_prefix_ends``), as the
server's renderer marks a chat's system messages: a hybrid caches a state there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

sys.path.insert(0, str(Path(__file__).parent))
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.engine import EngineObserver  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import random_prompts, run_batch, write_adapter  # noqa: E402


def ttft_run(engine, adapters, systems, questions, clients: int, max_new: int) -> list[float]:
    """Each client sends its requests one after another; returns every request's TTFT."""
    jobs = [(adapters[i % len(adapters)], systems[i % len(adapters)], questions[i]) for i in range(len(questions))]
    per_client = [jobs[c::clients] for c in range(clients)]

    async def client(c, mine):
        out = []
        for j, (adapter, system, question) in enumerate(mine):
            req = GenerationRequest(f"c{c}-{j}", (*system, *question), SamplingParams(max_new, ignore_eos=True), adapter,
                                    shared_prefix_ends=(len(system),))
            events = [ev async for ev in engine.submit(req)]
            out.append(events[-1].timing.time_to_first_token_seconds)
        return out

    async def main():
        return await asyncio.gather(*(client(c, m) for c, m in enumerate(per_client)))

    return [t for ts in asyncio.run(main()) for t in ts]


class PeakRunning(EngineObserver):
    def __init__(self, engine):
        self.engine, self.peak = engine, 0

    def step(self, stats) -> None:
        self.peak = max(self.peak, self.engine.counts()[0])


def conversations_run(engine, adapters, systems, users, answer_len: int) -> list[tuple[float, int, int, int]]:
    """Client c holds a conversation under ``adapters[c % len(adapters)]``: turn t sends
    ``systems[c]``, then each earlier turn's user message and answer, then ``users[c][t]``. Returns,
    for every turn after the first: its TTFT, prompt tokens, tokens served from the cache, and
    the most the cache can serve (the earlier turns in full blocks)."""
    bs = engine.blocks.block_size

    async def client(c):
        history, out = list(systems[c]), []
        for t, user in enumerate(users[c]):
            prompt = history + user
            req = GenerationRequest(f"v{c}-{t}", tuple(prompt), SamplingParams(answer_len, ignore_eos=True),
                                    adapters[c % len(adapters)], shared_prefix_ends=(len(systems[c]),))
            events = [ev async for ev in engine.submit(req)]
            if t:
                out.append((events[-1].timing.time_to_first_token_seconds, len(prompt),
                            events[-1].cached_prompt_tokens, len(history) // bs * bs))
            history = prompt + [ev.token_id for ev in events]
        return out

    async def main():
        return await asyncio.gather(*(client(c) for c in range(len(systems))))

    return [row for rows in asyncio.run(main()) for row in rows]


SHOTS_LEN = 512  # part 5: the tokens its prompts share
BRANCH_ROOT_LEN = 1024  # part 6: the prompt its requests share a prefix of


def fewshot_run(engine, batches: list[list[list[int]]]) -> tuple[list[float], int, int]:
    """Each batch's prompts submitted in one go (as ``Service.generate_choices`` submits a
    request's), one batch after another: every request's TTFT, the prompt tokens, and those
    served from the cache."""
    async def batch(k, prompts):
        streams = [engine.submit(GenerationRequest(f"s{k}.{i}", tuple(p), SamplingParams(8, ignore_eos=True), None))
                   for i, p in enumerate(prompts)]

        async def read(stream):
            return [ev async for ev in stream][-1]

        return await asyncio.gather(*map(read, streams))

    last = [ev for k, prompts in enumerate(batches) for ev in asyncio.run(batch(k, prompts))]
    return ([ev.timing.time_to_first_token_seconds for ev in last], sum(len(p) for b in batches for p in b),
            sum(ev.cached_prompt_tokens for ev in last))


def branches_run(engine, prompts: list[list[int]]) -> tuple[list[float], int, int]:
    """The prompts one after another: every request's TTFT, the prompt tokens, and those served
    from the cache."""
    async def one(k, prompt):
        req = GenerationRequest(f"b{k}", tuple(prompt), SamplingParams(8, ignore_eos=True), None)
        return [ev async for ev in engine.submit(req)][-1]

    last = [asyncio.run(one(k, p)) for k, p in enumerate(prompts)]
    return ([ev.timing.time_to_first_token_seconds for ev in last], sum(map(len, prompts)),
            sum(ev.cached_prompt_tokens for ev in last))


def turns_summary(rows: list[tuple[float, int, int, int]]) -> tuple[float, float, float]:
    """``conversations_run``'s rows: TTFT p50, the share of prompt tokens served from the cache and
    the most it could serve."""
    tokens = sum(r[1] for r in rows)
    return median(r[0] for r in rows), sum(r[2] for r in rows) / tokens, sum(r[3] for r in rows) / tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--burst", type=int, default=32, help="requests of the burst, queued at once")
    ap.add_argument("--burst-system-len", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16, help="old-design slots whose memory the pool gets")
    ap.add_argument("--concurrency-requests", type=int, default=256, help="part 3's requests (0: skip it)")
    ap.add_argument("--conversations", type=int, default=8, help="part 4's clients, one conversation each (0: skip it)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--few-shot", type=int, default=8, help="part 5's prompts a request (0: skip it)")
    ap.add_argument("--branches", type=int, default=16, help="part 6's requests (0: skip it)")
    ap.add_argument("--cached-state-interval", type=int, default=0,
                    help="a model with recurrent layers: the server's flag (a multiple of 16)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = ServerConfig(model=args.model, max_batch_size=32, max_tokens_per_step=512, max_model_len=1024,
                        default_max_new_tokens=8, max_lora_rank=16, max_device_adapters=args.adapters,
                        max_host_adapters=args.adapters, metrics_port=0,
                        cached_state_interval=args.cached_state_interval)
    loaded = load_model(base)
    vocab = loaded.hf_model.config.vocab_size
    rng = random.Random(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        layout = lora_layout(loaded.hf_model.config)
        adapters = tuple((f"t{i}", str(write_adapter(Path(tmp) / f"t{i}", layout, 16, seed=i)))
                         for i in range(args.adapters))
        ids = [a for a, _ in adapters]
        systems = random_prompts(vocab, args.adapters, args.system_len, seed=1)
        questions = [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 24))] for _ in range(args.requests)]
        burst_system = random_prompts(vocab, 1, args.burst_system_len, seed=2)
        burst_questions = [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 24))] for _ in range(args.burst)]
        talk_systems = random_prompts(vocab, args.conversations, 256, seed=3)
        talk_users = [[[rng.randrange(100, vocab) for _ in range(rng.randint(16, 32))] for _ in range(args.turns)]
                      for _ in range(args.conversations)]
        shot_batches = [[[*shot, *(rng.randrange(100, vocab) for _ in range(32))] for _ in range(args.few_shot)]
                        for shot in random_prompts(vocab, 5, SHOTS_LEN, seed=4)] if args.few_shot else []
        (root,) = random_prompts(vocab, 1, BRANCH_ROOT_LEN, seed=6)
        depths = [rng.randrange(128, BRANCH_ROOT_LEN - 40) for _ in range(args.branches)]  # + 32 + 8 fit 1024
        branches = [[*root[:d], *(rng.randrange(100, vocab) for _ in range(32))] for d in depths]
        for d, b in zip(depths, branches, strict=True):  # its own tokens part from the root at once
            b[d] = root[d] + 1 if root[d] + 1 < vocab else 100
        ttft, burst, talks, fewshot, branched = {}, {}, {}, {}, {}
        for caching in (False, True):
            built = build_engine(ServerConfig(**{**base.__dict__, "adapters": adapters, "prefix_caching": caching}),
                                 loaded)
            engine = built.engine
            engine.start()
            run_batch(engine, random_prompts(vocab, 4, 32, seed=9), ids[:4], 2)  # warm-up (no shared prefix)
            t0 = time.perf_counter()
            ttft[caching] = ttft_run(engine, ids, systems, questions, args.clients, 8)
            wall = time.perf_counter() - t0
            hits = engine.prefix_hit_tokens / max(1, engine.prefix_queried_tokens)
            print(f"prefix caching {'on ' if caching else 'off'}: TTFT p50 {median(ttft[caching]) * 1e3:7.1f} ms, "
                  f"{args.requests} requests in {wall:.1f} s, prompt tokens from the cache {hits:.0%}")
            queried, hit = engine.prefix_queried_tokens, engine.prefix_hit_tokens
            burst[caching] = ttft_run(engine, ids[:1], burst_system, burst_questions, args.burst, 8)
            burst_hits = (engine.prefix_hit_tokens - hit) / max(1, engine.prefix_queried_tokens - queried)
            print(f"  burst of {args.burst}: TTFT p50 {median(burst[caching]) * 1e3:7.1f} ms, "
                  f"prompt tokens from the cache {burst_hits:.0%}")
            if args.conversations:
                talks[caching] = p50, share, most = turns_summary(
                    conversations_run(engine, ids, talk_systems, talk_users, args.answer_len))
                print(f"  {args.conversations} conversations of {args.turns} turns, later turns: TTFT p50 "
                      f"{p50 * 1e3:7.1f} ms, prompt tokens from the cache {share:.0%}, of at most {most:.0%}")
            if shot_batches:
                fewshot[caching] = times, tokens, served = fewshot_run(engine, shot_batches)
                print(f"  {args.few_shot} few-shot prompts a request: TTFT p50 {median(times) * 1e3:7.1f} ms, "
                      f"prompt tokens from the cache {served / tokens:.0%}")
            if branches:
                branched[caching] = times, tokens, served = branches_run(engine, branches)
                print(f"  {args.branches} branches of one root: TTFT p50 {median(times) * 1e3:7.1f} ms, mean "
                      f"{mean(times) * 1e3:7.1f} ms, prompt tokens from the cache {served / tokens:.0%}")
            engine.stop()
        ratio = median(ttft[False]) / median(ttft[True])
        print(f"  TTFT p50 off / on          {ratio:.2f}x   (target >= 3)")
        bs = base.kv_block_size
        prompt_tokens = sum(args.burst_system_len + len(q) for q in burst_questions)
        most = (args.burst - 1) * (args.burst_system_len // bs * bs) / prompt_tokens
        print(f"  burst TTFT p50 off / on    {median(burst[False]) / median(burst[True]):.2f}x; from the cache "
              f"{burst_hits:.0%} of prompt tokens, of at most {most:.0%}")
        results["ttft_p50_off_s"], results["ttft_p50_on_s"], results["ttft_ratio"] = (
            median(ttft[False]), median(ttft[True]), ratio)
        results.update(burst_ttft_p50_off_s=median(burst[False]), burst_ttft_p50_on_s=median(burst[True]),
                       burst_cache_share=burst_hits, burst_cache_share_most=most)
        if args.conversations:
            (off, _, _), (on, share, most) = talks[False], talks[True]
            print(f"  later turns' TTFT p50 off / on {off / on:.2f}x")
            results.update(turn_ttft_p50_off_s=off, turn_ttft_p50_on_s=on, turn_ttft_ratio=off / on,
                           turn_cache_share=share, turn_cache_share_most=most)
        if shot_batches:
            (off, _, _), (on, tokens, served) = fewshot[False], fewshot[True]
            most = sum((len(b) - 1) * (SHOTS_LEN // bs * bs) for b in shot_batches) / tokens
            print(f"  few-shot TTFT p50 off / on {median(off) / median(on):.2f}x; from the cache "
                  f"{served / tokens:.0%} of prompt tokens, of at most {most:.0%}")
            results.update(fewshot_ttft_p50_off_s=median(off), fewshot_ttft_p50_on_s=median(on),
                           fewshot_cache_share=served / tokens, fewshot_cache_share_most=most)

        if branches:
            (off, _, _), (on, tokens, served) = branched[False], branched[True]
            most = sum(min(d, max(depths[:i])) // bs * bs for i, d in enumerate(depths) if i) / tokens
            print(f"  branches TTFT p50 off / on {median(off) / median(on):.2f}x, mean {mean(off) / mean(on):.2f}x; "
                  f"from the cache {served / tokens:.0%} of prompt tokens, of at most {most:.0%}")
            results.update(branch_ttft_p50_off_s=median(off), branch_ttft_p50_on_s=median(on),
                           branch_ttft_mean_off_s=mean(off), branch_ttft_mean_on_s=mean(on),
                           branch_cache_share=served / tokens, branch_cache_share_most=most,
                           cached_state_interval=args.cached_state_interval)

    if args.concurrency_requests:
        concurrency(args, base, loaded, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def concurrency(args, base: ServerConfig, loaded, results: dict) -> None:
    """Part 3: the most sequences running at once in the KV memory of ``--slots`` old-design slots."""
    max_len = 2048
    tokens = args.slots * max_len
    config = ServerConfig(**{**base.__dict__, "adapters": (), "max_model_len": max_len, "max_batch_size": 256,
                             "max_tokens_per_step": 2048, "default_max_new_tokens": 100,
                             "kv_cache_tokens": tokens})
    built = build_engine(config, loaded)
    engine = built.engine
    peak = PeakRunning(engine)
    engine.observers.append(peak)
    engine.start()
    t0 = time.perf_counter()
    run_batch(engine, random_prompts(loaded.hf_model.config.vocab_size, args.concurrency_requests, 100, seed=5),
              [None] * args.concurrency_requests, 100)
    wall = time.perf_counter() - t0
    preemptions = engine.num_preemptions
    engine.stop()
    print(f"KV memory of {args.slots} slots x {max_len} tokens = {tokens} tokens "
          f"({built.engine.runner.kv.nbytes / 2**20:.0f} MiB):")
    print(f"  peak running sequences     {peak.peak} (old design: {args.slots}); "
          f"{args.concurrency_requests} requests in {wall:.1f} s, {preemptions} preemptions")
    print(f"  concurrency paged / slots  {peak.peak / args.slots:.2f}x   (target >= 8)")
    results.update(slots=args.slots, peak_running=peak.peak, concurrency_ratio=peak.peak / args.slots,
                   preemptions=preemptions)


if __name__ == "__main__":
    raise SystemExit(main())
