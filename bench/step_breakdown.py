"""Where a decode step's time goes: the forward pass, sampling, logprobs, output processing
(detokenizing, stop checks, events) and the rest of the loop (scheduling, admission), for 32
sampling requests (temperature, top-k, top-p, repetition penalty, a stop string) over 32 distinct
adapters. The sampler and detokenizer of BASELINE_REV (read from git history) run side by side with
today's in the same run, rounds alternated, so the before/after breakdown is measured, not assumed.
``--profile`` adds torch.profiler's top ops of each variant's decode steps.

    python bench/step_breakdown.py [--models default small] [--rounds 2] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
import loramux.server.engine as engine_module  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.engine import EngineObserver, StepStats  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.ops import cpu_isa  # noqa: E402
from loramux.server.requests import GenerationRequest, SamplingParams  # noqa: E402

from common import cpu_name, random_prompts, run_requests, write_adapter  # noqa: E402
from engine_decode import each_model  # noqa: E402

BASELINE_REV = "074fd0b"  # before batched on-device sampling and one decode per token (issue #18)
REPO = Path(__file__).resolve().parent.parent
PHASES = ("forward", "sample", "logprobs", "output")


def baseline_module(tmp: Path, name: str):
    """server/<name>.py of BASELINE_REV as a module of its own, or None without git history."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_REV}:server/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp / f"baseline_{name}.py"
    path.write_text(source.replace("from .requests import", "from loramux.server.requests import"))
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class PhaseTimer(EngineObserver):
    """Wraps the step's phases (the engine module's functions, the runner and output processor),
    and records their seconds for each full-batch decode step it observes."""

    def __init__(self, engine, full: int):
        self.full = full
        self.current = dict.fromkeys(PHASES, 0.0)
        self.steps: list[dict[str, float]] = []
        self._undo = []
        self._wrap(engine.runner, "step", "forward")
        self._wrap(engine.output, "process", "output")
        self._wrap(engine_module, "sample", "sample")
        self._wrap(engine_module, "token_logprobs", "logprobs")

    def _wrap(self, owner, attr, phase):
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, inner))

    def unwrap(self):
        for owner, attr, inner in reversed(self._undo):
            if owner is engine_module:
                setattr(owner, attr, inner)
            else:
                delattr(owner, attr)  # back to the class's method

    def step(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens == 0 and stats.num_decode_tokens == self.full:
            self.steps.append({**self.current, "step": stats.seconds})
        self.current = dict.fromkeys(PHASES, 0.0)


class StepProfiler:
    """torch.profiler around each engine step, on the engine thread (a profiler started on another
    thread does not see its ops), summed over the steps: op -> (self CPU seconds, calls)."""

    def __init__(self, engine):
        self.engine, self.inner = engine, engine._step
        self.ops: dict[str, list[float]] = {}
        self.steps = 0
        engine._step = self._step

    def _step(self, *args, **kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = self.inner(*args, **kwargs)
        self.steps += 1
        for e in prof.key_averages():
            total = self.ops.setdefault(e.key, [0.0, 0])
            total[0] += e.self_cpu_time_total / 1e6
            total[1] += e.count
        return result

    def close(self) -> list[tuple[str, float, float]]:
        """Top ops: (name, self CPU ms per step, calls per step)."""
        del self.engine._step  # back to the class's method
        top = sorted(self.ops.items(), key=lambda kv: -kv[1][0])[:12]
        return [(name, sec * 1e3 / self.steps, calls / self.steps) for name, (sec, calls) in top]


def run(engine, prompts, adapters, new_tokens, profile: bool):
    """The requests once; returns the phase timer and, with ``profile``, the top ops per step."""
    timer = PhaseTimer(engine, len(prompts))
    engine.observers.append(timer)
    profiler = StepProfiler(engine) if profile else None
    params = SamplingParams(new_tokens, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                            stop=("zq-never-zq",), ignore_eos=True)
    reqs = [GenerationRequest(f"s{i}", tuple(p), params, a)
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    try:
        asyncio.run(run_requests(engine, reqs))
    finally:
        engine.observers.remove(timer)
        timer.unwrap()
        top = profiler.close() if profiler else None
    return timer, top


def bench_model(model, args, tmp: Path) -> dict:
    n = args.requests
    config = ServerConfig(model=model, max_batch_size=n, max_tokens_per_step=max(512, n),
                          max_model_len=args.prompt_len + args.new_tokens + 8, default_max_new_tokens=args.new_tokens,
                          max_lora_rank=16, max_device_adapters=n, max_host_adapters=n, metrics_port=0)
    loaded = load_model(config)
    layout = lora_layout(loaded.hf_model.config)
    adapters = tuple((f"a{i}", str(write_adapter(tmp / f"{loaded.name}-a{i}", layout, 16, seed=i))) for i in range(n))
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": adapters}), loaded)
    engine = built.engine
    variants = {"now": (engine_module.sample, engine_module.IncrementalDetokenizer)}
    old_sampling, old_detok = baseline_module(tmp, "sampling"), baseline_module(tmp, "detokenizer")
    if old_sampling and old_detok:
        def old_sample(logits, states, seen, *rows):  # its rows ask for none of the later sampling options
            return old_sampling.sample(logits, states, seen)

        def old_detokenizer(tokenizer, prompt_ids, *options):  # it always skipped special tokens, without spaces
            return old_detok.IncrementalDetokenizer(tokenizer, prompt_ids)
        variants = {BASELINE_REV: (old_sample, old_detokenizer), **variants}
    prompts = random_prompts(loaded.hf_model.config.vocab_size, n, args.prompt_len)
    ids = [a for a, _ in adapters]
    engine.start()
    steps: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    tables = {}
    try:
        # round 0 warms up; a profiled round comes last and is left out of the timings
        for round_ in range(args.rounds + 1 + args.profile):
            profiled = round_ > args.rounds
            for name, (sample, detok) in variants.items():
                engine_module.sample, engine_module.IncrementalDetokenizer = sample, detok
                timer, table = run(engine, prompts, ids, args.new_tokens, profiled)
                if round_ and not profiled:
                    steps[name] += timer.steps
                if table is not None:
                    tables[name] = table
    finally:
        engine_module.sample, engine_module.IncrementalDetokenizer = variants["now"]
        engine.stop()
    out = {"model": loaded.name, "requests": n, "new_tokens": args.new_tokens, "variants": {}}
    for name, rows in steps.items():
        row = {f"{p}_ms": median(r[p] for r in rows) * 1e3 for p in (*PHASES, "step")}
        row["rest_ms"] = row["step_ms"] - sum(row[f"{p}_ms"] for p in PHASES)
        out["variants"][name] = row
    out["profiles"] = tables
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "small"], choices=["default", "small"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    reports = []
    for r in each_model(args, bench_model):
        reports.append(r)
        print(f"model {r['model']}, {r['requests']} sampling requests over as many adapters; ms per decode step "
              f"(medians over {args.rounds} rounds' full-batch decode steps; 'rest': events and bookkeeping):")
        print(f"  {'variant':10s} {'step':>7s} {'forward':>8s} {'sample':>7s} {'logprobs':>8s} {'output':>7s} "
              f"{'rest':>6s}")
        for name, row in r["variants"].items():
            print(f"  {name:10s} {row['step_ms']:7.1f} {row['forward_ms']:8.1f} {row['sample_ms']:7.2f} "
                  f"{row['logprobs_ms']:8.2f} {row['output_ms']:7.2f} {row['rest_ms']:6.1f}")
        for name, top in r["profiles"].items():
            print(f"  torch.profiler, {name}: top ops by self CPU time, ms and calls per step")
            for op, ms, calls in top:
                print(f"    {op:40s} {ms:8.2f} {calls:7.1f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "results": reports}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
