"""Speculative decoding by prompt lookup (--num-speculative-tokens) on the default model: the same
greedy chat requests with drafts off and on, alternated in rounds in one process (the in-process
engine, no server; prefix caching off, so no round is served from an earlier one's KV).

Two tasks: "edit" asks the model to return a paragraph with one change (its answer copies most of
the prompt: prompt lookup's case), "free" asks for new text (few n-grams recur: its cost). Each at
several batch sizes. Prints tokens/s off and on, their quotient, the drafts' acceptance rate, and
how many requests' tokens differ between off and on (greedy: none, unless float rounding flips a
near-tie between a chunk's logits and one position's). The edit task also runs a third arm, drafts
on with the paragraph as each request's predicted output (OpenAI's prediction), and prints its
tokens/s against off and the prediction's drafts kept.

    python bench/speculative.py [--rounds 3] [--batches 1,8,32] [--new-tokens 96] [--k 4] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import cpu_name  # noqa: E402

PARAGRAPHS = [
    "The library opens at nine in the morning and closes at six in the evening. Members may borrow up to "
    "five books at a time, for three weeks each. Books can be renewed once, online or at the front desk.",
    "Our team meets every Monday to plan the week. Each person shares what they finished, what they will "
    "work on next, and anything that blocks them. The meeting should not take longer than thirty minutes.",
    "To make the soup, cut two onions and three carrots into small pieces. Cook them in a large pot with "
    "a little oil for ten minutes, then add the stock and the lentils, and let everything simmer for an hour.",
    "The train to the city leaves from platform four every twenty minutes. Tickets can be bought from the "
    "machines in the hall or from the app. Children under six travel for free with an adult.",
    "Please remember to water the plants on the balcony twice a week while we are away. The small ones "
    "need less water than the big ones. The keys are in the blue box next to the front door.",
    "The museum has three floors. The first floor shows old maps of the region, the second floor has "
    "paintings from local artists, and the third floor is used for special exhibitions that change often.",
    "Before you start the machine, check that the water tank is full and that the filter is clean. Press "
    "the green button once and wait until the light stops blinking. Then choose the program you want.",
    "The garden behind the house is long and narrow. Along the left side there is a row of apple trees, "
    "and along the right side a bed of roses. At the far end stands an old wooden bench under a large oak.",
]
TOPICS = ["a dragon who is afraid of the dark", "the first day at a new school", "a robot that learns to cook",
          "a city under the sea", "a lost dog finding its way home", "a journey across the desert",
          "a friendship between a cat and a bird", "the last tree on a small island"]


def prompts(tokenizer, task: str, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        if task == "edit":
            text = ("Rewrite the following text exactly as it is, but replace the last word with a synonym:\n\n"
                    + PARAGRAPHS[i % len(PARAGRAPHS)])
        else:
            text = f"Write a short story about {TOPICS[i % len(TOPICS)]}."
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    return out


def predicted_paragraphs(tokenizer, n: int) -> list[list[int]]:
    """The edit task's answers as predicted: each request's paragraph (its last word to change)."""
    return [tokenizer.encode(PARAGRAPHS[i % len(PARAGRAPHS)], add_special_tokens=False) for i in range(n)]


def run(engine, batch: list[list[int]], new: int, tag: str,
        predictions: list[list[int]] | None = None) -> tuple[float, list[list[int]], int, int]:
    """(generated tokens per second, each request's tokens, drafts run, drafts kept); with
    ``predictions``, each request's predicted output, and the drafts counted are the prediction's."""
    outs: list[list[int]] = [[] for _ in batch]
    predicted = [0, 0]

    async def one(i, ids):
        params = SamplingParams(new, ignore_eos=True)
        req = GenerationRequest(f"{tag}-{i}", tuple(ids), params, prediction=tuple(predictions[i] if predictions else ()))
        async for ev in engine.submit(req):
            outs[i].append(ev.token_id)
        predicted[0] += ev.accepted_prediction_tokens + ev.rejected_prediction_tokens
        predicted[1] += ev.accepted_prediction_tokens

    async def main():
        await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))

    drafts, kept = engine.draft_tokens, engine.accepted_tokens
    t = time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - t
    if predictions:
        return sum(map(len, outs)) / seconds, outs, predicted[0], predicted[1]
    return sum(map(len, outs)) / seconds, outs, engine.draft_tokens - drafts, engine.accepted_tokens - kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="--num-speculative-tokens of the runs with drafts")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    built = build_engine(ServerConfig(model=args.model, max_batch_size=max(batches), max_model_len=512,
                                      default_max_new_tokens=args.new_tokens, metrics_port=0, prefix_caching=False,
                                      num_speculative_tokens=args.k))
    engine, tokenizer = built.engine, built.loaded.tokenizer
    configs = {k: dataclasses.replace(engine.config, num_speculative_tokens=k) for k in (0, args.k)}
    engine.start()
    print(f"CPU: {cpu_name()}; model {built.loaded.name}, greedy, {args.new_tokens} new tokens, k = {args.k}")
    try:
        run(engine, prompts(tokenizer, "edit", 2), 8, "warm")
        for task in ("edit", "free"):
            for n in batches:
                batch = prompts(tokenizer, task, n)
                rate: dict[int, list[float]] = {0: [], args.k: []}
                outs, drafts, kept, pdrafts, pkept = {}, 0, 0, 0, 0
                for r in range(args.rounds):
                    for k in (0, args.k):
                        engine.config = configs[k]
                        tps, outs[k], d, a = run(engine, batch, args.new_tokens, f"{task}{n}-{r}-{k}")
                        rate[k].append(tps)
                        drafts, kept = drafts + d, kept + a
                    if task == "edit":  # the same, each request predicting its paragraph back
                        engine.config = configs[args.k]
                        tps, outs["p"], d, a = run(engine, batch, args.new_tokens, f"{task}{n}-{r}-p",
                                                   predicted_paragraphs(tokenizer, n))
                        rate.setdefault("p", []).append(tps)
                        pdrafts, pkept = pdrafts + d, pkept + a
                differ = sum(a != b for a, b in zip(outs[0], outs[args.k], strict=True))
                ratios = [on / off for off, on in zip(rate[0], rate[args.k], strict=True)]
                print(f"  {task:4s} batch {n:2d}: off {statistics.median(rate[0]):7.1f} tok/s, on "
                      f"{statistics.median(rate[args.k]):7.1f} tok/s, on/off {statistics.median(ratios):.2f} "
                      f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}); drafts kept "
                      f"{kept / drafts if drafts else 0:.0%} of {drafts // args.rounds} a round; "
                      f"requests whose tokens differ: {differ}/{n}")
                if "p" in rate:
                    pratios = [on / off for off, on in zip(rate[0], rate["p"], strict=True)]
                    pdiffer = sum(a != b for a, b in zip(outs[0], outs["p"], strict=True))
                    print(f"       with the paragraph predicted: {statistics.median(rate['p']):7.1f} tok/s, "
                          f"/off {statistics.median(pratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in pratios)}); "
                          f"the prediction's drafts kept {pkept / pdrafts if pdrafts else 0:.0%} of "
                          f"{pdrafts // args.rounds} a round; requests whose tokens differ: {pdiffer}/{n}")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
