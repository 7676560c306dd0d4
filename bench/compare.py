"""`make bench`: loramux side by side with what users would pick instead, in one run, on one
machine, one model (default SmolLM2-135M-Instruct) and one request set (rank-16 adapters on all
seven projections, 32 distinct adapters unless a row says otherwise).

Rows: 1 loramux over gRPC, mixed adapters; 2 the same requests on the base model only (each the
median of --passes passes, with prompts of their own, in pairs whose order swaps every pass;
row1/row2 is the median of the pairs' quotients);
3 loramux's in-process engine (no gRPC; the median of as many passes, prompts of their own);
4 PEFT, one mixed-adapter batch (adapter_names);
5 PEFT, one adapter at a time (set_adapter); 6 transformers' continuous batching (generate_batch,
base model); 7 loramux with 1..1000 registered adapters (device capacity 32, Zipf 1.0; the 1000/8
quotient is the median of --scale-repeats adjacent pairs of fresh servers, the order swapped each
pair); 8 row 1's load through the OpenAI-compatible HTTP API (streamed completions) instead of
gRPC (the median of --http-pairs runs; HTTP/gRPC is the median of those adjacent pairs' quotients,
the order swapped each pair). Every timed run has prompts of its own, none from the prefix cache.

    python bench/compare.py [--quick] [--model DIR] [--scale-repeats N] [--passes N] [--http-pairs N]
                            [--lora-dtype D]
                            [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from loramux.clients.bench import (
    LoadSpec,
    format_report,
    free_ports,
    percentile,
    run_load,
    scrape_adapter_cache,
    summarize,
)
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.model_loader import resolve_model_dir
from loramux.server.models import lora_layout
from loramux.server.requests import GenerationRequest, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, write_adapter  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Server:
    """The real server as a subprocess, ready when its readiness health check says SERVING."""

    def __init__(self, model_dir: Path, extra: list[str], log: Path):
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.target = f"127.0.0.1:{self.port}"
        self.http_base = f"http://127.0.0.1:{self.http_port}/v1"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), *extra],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.metrics_url, timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; see {log}") from None
                time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)
        self._log.close()


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (an odd count: a real run, its latencies with it)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def load_row(server: Server, spec: LoadSpec, api: str = "grpc") -> dict:
    before = scrape_adapter_cache(server.metrics_url)
    target = server.http_base if api == "openai" else server.target
    records, wall = asyncio.run(run_load(target, spec, progress=False, api=api))
    return summarize(records, wall, before, scrape_adapter_cache(server.metrics_url))


def engine_row(model_dir, adapters, passes, warm_up, lora_dtype: str = "auto") -> dict:
    """``warm_up`` first (adapters resident, allocator warm), as row 1's server gets, then each pass
    of ``passes`` (lists of requests, prompts of their own, as row 1's) timed; the median pass. Other
    prompts warm up, so that the timed prompts are not in the prefix cache."""
    built = build_engine(ServerConfig(model=str(model_dir), adapter_dirs=(str(adapters),), max_batch_size=32,
                                      max_model_len=256, default_max_new_tokens=16, max_lora_rank=16,
                                      max_device_adapters=32, max_host_adapters=32, metrics_port=0,
                                      lora_dtype=lora_dtype))
    built.engine.start()

    async def run(tag: str, requests):
        async def one(r):
            start, first, n = time.perf_counter(), None, 0
            async for _ in built.engine.submit(GenerationRequest(
                    f"{r.request_id}-{tag}", tuple(r.prompt_token_ids),
                    SamplingParams(r.sampling.max_new_tokens, ignore_eos=True), r.adapter_id or None)):
                first = first or time.perf_counter() - start
                n += 1
            return first, n
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(r) for r in requests))
        return out, time.perf_counter() - t0

    try:
        asyncio.run(run("warm-up", warm_up))
        timed = [asyncio.run(run(f"timed-{i}", requests)) for i, requests in enumerate(passes)]
    finally:
        built.engine.stop()
    return median_run([row_from(wall, sum(n for _, n in out), [t for t, _ in out], len(out)) for out, wall in timed])


def row_from(wall: float, tokens: int, ttft: list[float], num_requests: int) -> dict:
    return {"tokens_per_s": tokens / wall, "requests_per_s": num_requests / wall, "wall_seconds": wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
            "itl_p50": None, "itl_p99": None, "errors": {}}


def _left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask


def peft_rows(model_dir, adapter_dirs: dict[str, Path], requests, new_tokens: int) -> tuple[dict, dict]:
    """Row 4 (one mixed batch with adapter_names) and row 5 (set_adapter, one adapter at a time)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    prompts = [list(r.prompt_token_ids) for r in requests]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def first_token_time(ids, mask, **extra):
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1}, **extra)
        return time.perf_counter() - t

    with torch.no_grad():
        ids, mask = _left_pad(prompts, 0)
        adapters = [r.adapter_id or "__base__" for r in requests]
        ttft = first_token_time(ids, mask, adapter_names=adapters)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters, **kw)
        mixed = row_from(time.perf_counter() - t, len(prompts) * new_tokens, [ttft] * len(prompts), len(prompts))
        t0, ttfts = time.perf_counter(), []
        for name in names:
            mine = [p for p, r in zip(prompts, requests, strict=True) if r.adapter_id == name]
            if not mine:
                continue
            model.set_adapter(name)
            ids, mask = _left_pad(mine, 0)
            started = time.perf_counter() - t0
            ttfts += [started + first_token_time(ids, mask)] * len(mine)  # waits behind earlier adapters
            model.generate(input_ids=ids, attention_mask=mask, **kw)
        one_by_one = row_from(time.perf_counter() - t0, len(prompts) * new_tokens, ttfts, len(prompts))
    return mixed, one_by_one


def generate_batch_row(model_dir, requests, new_tokens: int) -> dict:
    """With loramux's budgets (32 requests, 512 tokens a step) and a KV cache that holds every
    request twice over: left to itself on a CPU, generate_batch sizes its cache from free memory and
    spends seconds touching it (19 s of 20 for 8 short requests on the tiny test model)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    try:  # transformers 5.x; older ones take no such config and keep their own sizing
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = ContinuousBatchingConfig.page_size
        blocks = 2 * sum(-(-(len(r.prompt_token_ids) + new_tokens) // page) for r in requests)  # past its safety margin
        kw = {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=512,
                                                                     max_requests_per_batch=32)}
    except (ImportError, AttributeError, TypeError):
        kw = {}
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(inputs=[list(r.prompt_token_ids) for r in requests], generation_config=cfg, **kw)
    wall = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    ttft = [o.timestamps[0] - o.created_time for o in out.values() if o.timestamps]
    return row_from(wall, tokens, ttft, len(out))


def make_adapters(root: Path, layout, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if not (root / f"a{i:02d}" / "adapter_model.safetensors").exists():
            write_adapter(root / f"a{i:02d}", layout, 16, seed=i, targets=TARGETS)
    return root


def scaled_dir(root: Path, distinct: Path, n: int) -> Path:
    """n registered ids; each is its own adapter in loramux's caches, their files cycle over the
    distinct ones (symlinks) to keep the disk footprint bounded."""
    out = root / f"scale-{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sources = sorted(p for p in distinct.iterdir() if p.is_dir())
    for i in range(n):
        (out / f"s{i:04d}").symlink_to(sources[i % len(sources)].resolve())
    return out


def plot(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    scale = report["scaling"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s["adapters"] for s in scale], [s["tokens_per_s"] for s in scale], marker="o")
    ax.set_xscale("log")
    ax.set(xlabel="registered adapters", ylabel="tokens/s", title="Throughput vs number of adapters")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_adapters.png")
    files.append("throughput_vs_adapters.png")
    load = report["load_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([x["concurrency"] for x in load], [x["ttft_p50"] for x in load], marker="o", label="TTFT p50")
    ax.plot([x["concurrency"] for x in load], [x["ttft_p90"] for x in load], marker="o", label="TTFT p90")
    ax.set(xlabel="requests in flight", ylabel="seconds", title="Latency vs load (mixed adapters)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png")
    files.append("latency_vs_load.png")
    plt.close("all")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~2-minute version")
    ap.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--scale-repeats", type=int, default=None,
                    help="adjacent pairs of row 7's 8- and last-adapter runs whose quotients give the median (default 5; 1 --quick, whose first pair is the sweep's own runs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--http-pairs", type=int, default=None,
                    help="adjacent pairs of row 1's requests over gRPC and over HTTP whose quotients give row 8's median (default 5; 1 --quick)")
    ap.add_argument("--lora-dtype", default="auto", help="loramux's --lora-dtype in rows 1, 3, 7 and 8")
    ap.add_argument("--passes", type=int, default=None,
                    help="alternated pairs of rows 1 and 2 (row1/row2: their quotients' median), and passes of "
                         "row 3, the median of each row reported (default 5; 1 --quick)")
    args = ap.parse_args()

    quick = args.quick
    args.scale_repeats = args.scale_repeats or (1 if quick else 5)
    args.passes = args.passes or (1 if quick else 5)
    args.http_pairs = args.http_pairs or (1 if quick else 5)
    n_req, new_tokens, prompt_len = (8, 8, 16) if quick else (32, 32, 32)
    scale_points = (1, 8, 64) if quick else (1, 8, 64, 512, 1000)
    model_dir = resolve_model_dir(ServerConfig(model=args.model))[0]
    from transformers import AutoConfig

    layout = lora_layout(AutoConfig.from_pretrained(model_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    distinct = make_adapters(work / f"adapters-{model_dir.name}", layout, n_req if quick else 32)
    spec = LoadSpec(num_requests=n_req, concurrency=n_req, adapters=tuple(sorted(p.name for p in distinct.iterdir())),
                    popularity="distinct", prompt_len=(prompt_len, prompt_len), output_len=(new_tokens, new_tokens),
                    vocab=(100, min(20000, layout_vocab(model_dir))))
    from loramux.clients.bench import make_requests

    requests = make_requests(spec)
    rows, t_start = {}, time.perf_counter()
    common = ["--max-batch-size", "32", "--max-model-len", "256", "--default-max-new-tokens", "16",
              "--max-lora-rank", "16", "--max-device-adapters", "32", "--max-host-adapters", "64",
              "--lora-dtype", args.lora_dtype]
    server = Server(model_dir, [*common, "--adapter-dir", str(distinct)], work / "server.log")
    try:
        # Every timed run on this server has prompts of its own (same lengths, seeds of its own), so
        # that none is served from an earlier run's prefix cache and all rows pay the same prefill.
        def fresh(offset: int, **changes) -> LoadSpec:
            return LoadSpec(**{**spec.__dict__, "seed": spec.seed + offset, **changes})

        warm = fresh(1)  # same adapters, other prompts:
        load_row(server, warm)  # warm-up (adapters resident, allocator warm), not the prefix cache
        # Rows 1 and 2 drive four ratios: interleaved passes, each row's median pass. Each pass is a
        # pair with the order swapped every pass (row 1 always first put the VM's drift on one side);
        # row1/row2 is the median of the pairs' quotients, as row 7's and HTTP's.
        ones, twos = [], []
        for i in range(args.passes):
            one = fresh(100 * i)  # pass 0: spec's own
            two = LoadSpec(**{**one.__dict__, "adapters": ()})
            order = ((ones, one), (twos, two))
            for runs, load in order if i % 2 == 0 else order[::-1]:
                runs.append(load_row(server, load))
        pass_ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ones, twos, strict=True)]
        rows["1 loramux gRPC, mixed adapters"] = median_run(ones)
        rows["2 loramux gRPC, base model only"] = median_run(twos)
        load_row(server, fresh(2), api="openai")  # warm-up of the HTTP path
        # HTTP against gRPC: adjacent pairs of row 1's load (prompts of their own, as row 1's), the
        # order swapped each pair, so that drift hits both alike; the quotient is the pairs' median.
        # (A best-of over unequal numbers of rounds favoured the side with more draws.)
        http, http_ratios = [], []
        for pair in range(args.http_pairs):
            apis = ("grpc", "openai") if pair % 2 == 0 else ("openai", "grpc")
            runs = {api: load_row(server, fresh(1000 + 10 * pair + side), api=api) for side, api in enumerate(apis)}
            http.append(runs["openai"])
            http_ratios.append(runs["openai"]["tokens_per_s"] / runs["grpc"]["tokens_per_s"])
        rows["8 loramux HTTP (OpenAI API), mixed"] = median_run(http)
        sweep = []
        for c in ((1, n_req) if quick else (1, 8, 32)):
            r = load_row(server, fresh(2000 + c, concurrency=c))
            sweep.append({"concurrency": c, **{k: r[k] for k in ("ttft_p50", "ttft_p90", "tokens_per_s")}})
    finally:
        server.stop()
    passes = [make_requests(LoadSpec(**{**spec.__dict__, "seed": spec.seed + 100 * i})) for i in range(args.passes)]
    rows["3 loramux in-process engine, mixed"] = engine_row(model_dir, distinct, passes, make_requests(warm),
                                                            args.lora_dtype)
    adapter_dirs = {p.name: p for p in sorted(distinct.iterdir())}
    rows["4 PEFT, one mixed batch"], rows["5 PEFT, one adapter at a time"] = peft_rows(
        model_dir, adapter_dirs, requests, new_tokens)
    rows["6 transformers generate_batch, base"] = generate_batch_row(model_dir, requests, new_tokens)

    def scale_row(n: int) -> dict:
        """Zipf(1.0) over n registered adapters on a fresh server (every first use is a cold load)."""
        folder = scaled_dir(work, distinct, n)
        server = Server(model_dir, [*common, "--adapter-dir", str(folder)], work / f"server-{n}.log")
        try:
            zipf = LoadSpec(**{**spec.__dict__, "adapters": tuple(f"s{i:04d}" for i in range(n)),
                               "popularity": "zipf:1.0", "num_requests": 2 * n_req, "seed": 7})
            return load_row(server, zipf)
        finally:
            server.stop()

    scaling = []
    for n in scale_points:
        r = scale_row(n)
        scaling.append({"adapters": n, **{k: r[k] for k in ("tokens_per_s", "ttft_p50", "ttft_p90", "ttft_p99")},
                        "adapter_cache_hit_rate": r.get("adapter_cache_hit_rate")})
        rows[f"7 loramux, {n} adapters (Zipf 1.0)"] = r
    # The target's quotient from adjacent pairs of runs, the order swapped every pair (the VM's speed
    # drifts within minutes: one short run moved it by +-25%). The sweep's last run opens the first
    # pair, with a run of 8 right after it.
    last = scale_points[-1]
    scale_ratios = []
    for pair in range(args.scale_repeats):
        if pair % 2 == 0:  # the last point first (pair 0's is the sweep's run; --quick's run of 8 too, a start fewer)
            many = scaling[-1]["tokens_per_s"] if pair == 0 else scale_row(last)["tokens_per_s"]
            few = next(s["tokens_per_s"] for s in scaling if s["adapters"] == 8) if pair == 0 and quick \
                else scale_row(8)["tokens_per_s"]
        else:
            few = scale_row(8)["tokens_per_s"]
            many = scale_row(last)["tokens_per_s"]
        scale_ratios.append(many / few)
    tps = {k.split()[0] + ("" if not k.startswith("7") else k.split(",")[1].split()[0]): v["tokens_per_s"]
           for k, v in rows.items()}
    ratios = {
        f"row1/row2, median of {len(pass_ratios)} alternated pairs (target >= 0.85)": statistics.median(pass_ratios),
        "row1/row2, the rows' median passes": tps["1"] / tps["2"], "row1/row4 (target >= 3)": tps["1"] / tps["4"],
        "row1/row5 (target >= 10)": tps["1"] / tps["5"], "row2/row6 (target >= 2)": tps["2"] / tps["6"],
        f"{last} adapters / 8 adapters, median of {len(scale_ratios)} alternated pairs (target >= 0.9)":
            statistics.median(scale_ratios),
        "row1/row3 (target >= 0.9)": tps["1"] / tps["3"],
        f"row8/row1, HTTP/gRPC, median of {len(http_ratios)} alternated pairs (target >= 0.9)":
            statistics.median(http_ratios),
    }
    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "model": model_dir.name, "quick": quick, "lora_dtype": args.lora_dtype, "requests": n_req,
              "new_tokens": new_tokens,
              "prompt_tokens": prompt_len, "rows": rows, "scaling": scaling, "load_sweep": sweep, "ratios": ratios,
              "pass_ratios": pass_ratios, "scale_ratios": scale_ratios, "http_ratios": http_ratios,
              "seconds": time.perf_counter() - t_start}
    report["plots"] = plot(report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nmodel {model_dir.name}, {n_req} requests x {new_tokens} new tokens, {report['seconds']:.0f} s")
    for name, r in rows.items():
        print(format_report(name, r))
    print()
    for name, value in ratios.items():
        print(f"  {name:45s} {value:7.2f}")
    print(f"report: {args.out / 'report.json'}; plots: {', '.join(report['plots']) or 'none (no matplotlib)'}")
    return 0


def layout_vocab(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


if __name__ == "__main__":
    sys.exit(main())
