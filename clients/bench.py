"""Load generator for a running loramux server (``loramux bench``).

Closed loop (a fixed number of requests in flight) or open loop (Poisson arrivals at a rate), over
N adapters whose popularity is distinct, uniform, Zipf(alpha) or identical (Punica's and S-LoRA's
settings), with prompt and output lengths drawn from ranges. Reports throughput, time to first
token, inter-token latency, per-adapter fairness, the adapter cache hit rate (from /metrics) and
errors by status. ``--api openai`` sends the same request set through the OpenAI-compatible HTTP API
(streamed completions, read as raw server-sent events, as the gRPC side reads the raw stub), so both
front-ends are measured alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from ..v1 import loramux_pb2 as pb
from .aio import AsyncLoraMuxClient
from .stats import percentile

LOW_PORT = 10000  # free_port draws at or above this


def free_port() -> int:
    """A loopback port free now, for a server about to be started. Drawn at random below the
    kernel's ephemeral range where it is known (Linux: 32768 up by default), so that no client
    connection is given it meanwhile. Under pytest-xdist each worker draws only the ports equal to
    its index modulo the worker count, so two workers starting servers at once never pick the same."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 0
    top = ephemeral if ephemeral >= 2 * LOW_PORT else 65536
    draw = random.SystemRandom()  # not the seeded global generator a test may have reset
    for _ in range(1000):
        port = draw.randrange(LOW_PORT + (worker - LOW_PORT) % workers, top, workers)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
        return port
    raise OSError(f"no free port in {LOW_PORT}-{top - 1} after 1000 draws")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (for one server's listeners): each draw of free_port is free now,
    but two draws can be the same port."""
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


@dataclass(frozen=True)
class LoadSpec:
    num_requests: int = 64
    concurrency: int | None = 32  # closed loop; None: open loop at ``rate``
    rate: float | None = None  # requests/s, Poisson arrivals
    adapters: tuple[str, ...] = ()  # ids; "" is the base model; empty: base model only
    popularity: str = "uniform"  # distinct | uniform | identical | zipf:<alpha>
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (16, 64)
    vocab: tuple[int, int] = (100, 20000)  # token ids drawn from this range
    seed: int = 0


@dataclass
class Record:
    adapter: str
    status: str = "OK"
    arrival: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    total: float | None = None
    tokens: int = 0


def pick_adapters(spec: LoadSpec, rng: random.Random) -> list[str]:
    ids, n = list(spec.adapters) or [""], spec.num_requests
    kind, _, arg = spec.popularity.partition(":")
    if kind == "distinct":
        return [ids[i % len(ids)] for i in range(n)]
    if kind == "identical":
        return [ids[0]] * n
    if kind == "uniform":
        return [rng.choice(ids) for _ in range(n)]
    if kind == "zipf":
        alpha = float(arg or 1.0)
        weights = [1.0 / (k + 1) ** alpha for k in range(len(ids))]
        return rng.choices(ids, weights=weights, k=n)
    raise ValueError(f"popularity must be distinct, uniform, identical or zipf:<alpha>, got {spec.popularity!r}")


def make_requests(spec: LoadSpec) -> list[pb.GenerateRequest]:
    rng = random.Random(spec.seed)
    out = []
    for i, adapter in enumerate(pick_adapters(spec, rng)):
        prompt = [rng.randrange(*spec.vocab) for _ in range(rng.randint(*spec.prompt_len))]
        out.append(pb.GenerateRequest(
            request_id=f"bench-{spec.seed}-{i}", adapter_id=adapter, prompt_token_ids=prompt,
            sampling=pb.SamplingParams(max_new_tokens=rng.randint(*spec.output_len), ignore_eos=True)))
    return out


async def _one(client: AsyncLoraMuxClient, req: pb.GenerateRequest, t0: float) -> Record:
    rec = Record(req.adapter_id, arrival=time.perf_counter() - t0)
    start = last = time.perf_counter()
    try:
        async for _ in client.stub.GenerateStream(req):
            now = time.perf_counter()
            if rec.ttft is None:
                rec.ttft = now - start
            else:
                rec.itl.append(now - last)
            last = now
            rec.tokens += 1
        rec.total = time.perf_counter() - start
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name
    return rec


def _httpx():
    """The HTTP client module the openai package brings (httpx2 in its newer releases)."""
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:  # pragma: no cover - a test dependency, optional for users
            raise SystemExit("loramux bench --api openai needs httpx: pip install openai (which brings it)") from None
    return httpx


class OpenAIDriver:
    """The same requests as streamed /v1/completions calls, read as raw server-sent events (as
    vLLM's benchmark_serving reads them): a chunk with a choice is a token event, and the token
    count comes from the final usage chunk. The openai package, building its typed objects from
    every chunk, cost the client four times the gRPC stub's CPU, taken from the cores a local
    server shares (BENCHMARKS.md, fiftieth session): the benchmark measured the client."""

    def __init__(self, base_url: str, token: str | None):
        self.httpx = _httpx()
        self.base = base_url.rstrip("/")
        self.client = self.httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=600,
            limits=self.httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.base_model = None

    async def start(self) -> None:
        models = await self.client.get(f"{self.base}/models")
        models.raise_for_status()
        self.base_model = next(m["id"] for m in models.json()["data"] if m.get("parent") is None)

    async def one(self, req: pb.GenerateRequest, t0: float) -> Record:
        rec = Record(req.adapter_id, arrival=time.perf_counter() - t0)
        body = {"model": req.adapter_id or self.base_model, "prompt": list(req.prompt_token_ids),
                "max_tokens": req.sampling.max_new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        start = last = time.perf_counter()
        try:
            async with self.client.stream("POST", f"{self.base}/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    rec.status = f"HTTP_{response.status_code}"
                    return rec
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if "error" in chunk:  # an error event mid-stream, with the status it would have had
                        rec.status = f"HTTP_{chunk['error'].get('code') or 500}"
                        return rec
                    if not chunk.get("choices"):  # the usage chunk, last
                        rec.tokens = (chunk.get("usage") or {}).get("completion_tokens", rec.tokens)
                        continue
                    if rec.ttft is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
            rec.total = time.perf_counter() - start
        except self.httpx.TransportError:
            rec.status = "UNAVAILABLE"
        return rec

    async def close(self) -> None:
        await self.client.aclose()


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:5.2f} req/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def run_load(target: str, spec: LoadSpec, token: str | None = None, progress: bool = True,
                   api: str = "grpc") -> tuple[list[Record], float]:
    """Run ``spec`` against ``target``: a gRPC address, or with ``api="openai"`` an HTTP base URL
    (``http://host:8000/v1``)."""
    requests = make_requests(spec)
    bar = Progress(len(requests), progress)
    if api == "openai":
        driver = OpenAIDriver(target, token)
        await driver.start()
        try:
            return await _drive(driver.one, requests, spec, bar)
        finally:
            await driver.close()
    async with AsyncLoraMuxClient(target, token=token) as client:
        return await _drive(lambda req, t0: _one(client, req, t0), requests, spec, bar)


async def _drive(one, requests, spec: LoadSpec, bar: Progress) -> tuple[list[Record], float]:
    """Closed or open loop over ``requests``; ``one(request, t0)`` sends one and records it."""
    t0 = time.perf_counter()
    if spec.concurrency:
        queue = list(reversed(requests))
        records: list[Record] = []

        async def worker():
            while queue:
                records.append(await one(queue.pop(), t0))
                bar.tick()

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    else:
        rng = random.Random(spec.seed + 1)
        at, arrivals = 0.0, []
        for _ in requests:
            at += rng.expovariate(spec.rate)
            arrivals.append(at)

        async def timed(req, when):
            await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
            rec = await one(req, t0)
            bar.tick()
            return rec

        records = list(await asyncio.gather(*(timed(r, a) for r, a in zip(requests, arrivals, strict=True))))
    return records, time.perf_counter() - t0


def scrape_adapter_cache(metrics_url: str | None) -> dict[str, float]:
    if not metrics_url:
        return {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    for name in ("hits", "misses"):
        for tier in ("host", "device"):
            m = re.search(rf'loramux_adapter_cache_{name}_total{{tier="{tier}"}} ([0-9.e+]+)', text)
            out[f"{tier}_{name}"] = float(m.group(1)) if m else 0.0
    return out


def summarize(records: list[Record], wall: float, cache_before=None, cache_after=None) -> dict:
    ok = [r for r in records if r.status == "OK"]
    errors: dict[str, int] = {}
    for r in records:
        if r.status != "OK":
            errors[r.status] = errors.get(r.status, 0) + 1
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    per_adapter: dict[str, list[float]] = {}
    for r in ok:
        per_adapter.setdefault(r.adapter or "base", []).append(r.total)
    means = [statistics.mean(v) for v in per_adapter.values()]
    report = {
        "requests": len(records), "ok": len(ok), "errors": errors, "wall_seconds": wall,
        "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "fairness": {  # spread of mean request latency across adapters
            "adapters": len(per_adapter),
            "latency_mean_min": min(means) if means else None, "latency_mean_max": max(means) if means else None,
            "latency_mean_cv": statistics.pstdev(means) / statistics.mean(means) if len(means) > 1 else 0.0,
        },
    }
    if cache_before is not None and cache_after is not None:
        delta = {k: cache_after[k] - cache_before.get(k, 0.0) for k in cache_after}
        lookups = delta["device_hits"] + delta["device_misses"]
        report["adapter_cache_hit_rate"] = delta["device_hits"] / lookups if lookups else None
    return report


def format_report(name: str, r: dict) -> str:
    def ms(x):
        return "   -  " if x is None else f"{x * 1000:6.0f}"
    return (f"{name:34s} {r['tokens_per_s']:8.1f} tok/s {r['requests_per_s']:6.2f} req/s  TTFT p50/p90/p99 "
            f"{ms(r['ttft_p50'])}/{ms(r['ttft_p90'])}/{ms(r['ttft_p99'])} ms  ITL p50/p99 {ms(r['itl_p50'])}/"
            f"{ms(r['itl_p99'])} ms  errors {r['errors'] or 0}")


def add_bench_command(sub, with_server) -> None:
    b = with_server(sub.add_parser("bench", help="load-test a running server"))
    b.add_argument("--requests", type=int, default=64)
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 32)")
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    b.add_argument("--adapters", default="", help="comma-separated adapter ids ('' for the base model)")
    b.add_argument("--popularity", default="uniform", help="distinct, uniform, identical or zipf:<alpha>")
    b.add_argument("--prompt-len", default="16:64", help="MIN:MAX tokens")
    b.add_argument("--output-len", default="16:64", help="MIN:MAX tokens")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--metrics-url", default=None, help="e.g. http://127.0.0.1:9400/metrics, for the cache hit rate")
    b.add_argument("--token", default=None, help="bearer token")
    b.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                   help="the front-end to load: gRPC (--server) or the OpenAI HTTP API (--base-url)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="with --api openai: the HTTP API's base URL")
    b.add_argument("--json", default=None, help="write the report here")
    b.set_defaults(func=cmd_bench)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def cmd_bench(args) -> int:
    spec = LoadSpec(
        num_requests=args.requests, concurrency=None if args.rate else (args.concurrency or 32), rate=args.rate,
        adapters=tuple(a for a in args.adapters.split(",")) if args.adapters else (), popularity=args.popularity,
        prompt_len=_range(args.prompt_len), output_len=_range(args.output_len), seed=args.seed,
    )
    before = scrape_adapter_cache(args.metrics_url)
    target = args.base_url if args.api == "openai" else args.server
    records, wall = asyncio.run(run_load(target, spec, token=args.token, api=args.api))
    report = summarize(records, wall, before, scrape_adapter_cache(args.metrics_url) if args.metrics_url else None)
    report["spec"] = asdict(spec)
    print(format_report("loramux", report))
    print(json.dumps(report["fairness"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
