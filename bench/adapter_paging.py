"""Adapter paging: 1000 registered adapters (ranks 8/16/32/64), device capacity 32, Zipf(1.0)
popularity and Poisson arrivals, next to the same workload over 8 adapters that are all resident.
Target: throughput ratio >= 0.95. Also prints time to first token of cold vs warm requests.

First, host-tier load time (disk to a host copy ready for pages, warm page cache) of a rank-16
q/v and a rank-16 all-projection adapter of the model, by this loader and by the loader of
BASELINE_REV (read from git history, side by side in this run). Target: >= 4x faster.

    python bench/adapter_paging.py [--adapters 1000] [--requests 192] [--rate 40] [--repeats 6] [--json out.json]
        [--ranks 8,16,32,64] [--max-device-adapters 32] [--max-host-adapters 128] [--decompose]

--decompose adds, to every round, the 1000 adapters with all those the requests use resident from
the start: how much of the loss is paging and how much the pages' bytes of more distinct adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.clients.stats import percentile, zipf_choices  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.ops.cpu_kernel import load_kernels  # noqa: E402
from loramux.server.requests import (
    GenerationRequest,  # noqa: E402
    SamplingParams,  # noqa: E402
)
from loramux.server.torch_threads import in_passing_thread, serial_openmp  # noqa: E402

from common import cpu_name, steal_seconds, write_adapter  # noqa: E402

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "v_proj")
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINE_REV = "67c9686"  # the loader before the one-pass conversion (issue #17)
REPO = Path(__file__).resolve().parent.parent


def baseline_loader(tmp: Path):
    """adapters/ of BASELINE_REV as a package of its own, or None without git history."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE_REV, "adapters"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    shutil.move(tmp / "adapters", tmp / "loramux_baseline_adapters")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("loramux_baseline_adapters.loader")


def host_load_ms(load, repeats: int = 40) -> float:
    """Median milliseconds of ``load()`` on a thread whose torch ops run serially, as on the
    server's adapter I/O thread (an OpenMP team left on this thread would slow what follows)."""
    def timed():
        serial_openmp()
        times = []
        for _ in range(repeats + 3):
            t = time.perf_counter()
            load()
            times.append(time.perf_counter() - t)
        return statistics.median(times[3:]) * 1e3
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(timed).result()


@in_passing_thread
def measure_host_loads(layout, dtype) -> dict:
    """Disk to a host copy ready for pages: this loader converting the PEFT file, the same from a
    converted file (--adapter-cache-dir), and the loader of BASELINE_REV."""
    from loramux.adapters import loader as current
    from loramux.adapters.converted_cache import ConvertedCache
    from loramux.adapters.files import ReadBuffer

    out = {}
    element_size = torch.empty(0, dtype=dtype).element_size()
    convert = getattr(load_kernels(), "convert_adapter", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = baseline_loader(tmp)
        paths = {name: write_adapter(tmp / name.replace("/", "").replace(" ", "-"), layout, 16, seed=0,
                                            targets=targets)
                 for name, targets in (("q/v", TARGETS), ("all projections", ALL_PROJ))}
        time.sleep(2.1)  # files older than loader.RACY_NS, as adapters are when a server loads them
        cache = ConvertedCache(tmp / "converted", layout)
        for name, path in paths.items():
            manifest = current.inspect_adapter(path, layout, 64, element_size)
            cache.write(manifest.content_hash, dtype,
                        current.load_adapter(path, layout, 64, dtype, manifest=manifest))
            # as the server's I/O thread loads: the C++ converter where it is built, and the file's
            # bytes and the converted values in buffers reused from load to load
            buffers = {"out": torch.empty(current.flat_numel(list(layout.modules.values()), 64, layout), dtype=dtype),
                       "read_buffer": ReadBuffer()}
            row = {
                "convert_ms": host_load_ms(partial(current.load_adapter, path, layout, 64, dtype, manifest=manifest,
                                                   convert=convert, **buffers)),
                **pages_load_ms(path, layout, dtype, manifest, buffers),
                "convert_torch_ms": host_load_ms(partial(current.load_adapter, path, layout, 64, dtype,
                                                         manifest=manifest, **buffers)),
                "converted_ms": host_load_ms(partial(cache.read, manifest.content_hash, dtype, out=buffers["out"])),
            }
            if old is not None:
                old_manifest = old.inspect_adapter(path, layout, 64, element_size)
                row["baseline_ms"] = host_load_ms(partial(old.load_adapter, path, layout, 64, dtype,
                                                          manifest=old_manifest))
            base = row.get("baseline_ms", float("nan"))
            out[name] = row
            print(f"  host load, rank 16 {name:15s}: at {BASELINE_REV} {base:6.2f} ms; now {row['convert_ms']:6.2f} ms "
                  f"converting the PEFT file ({base / row['convert_ms']:4.1f}x; {row['convert_torch_ms']:6.2f} ms by torch "
                  f"ops), {row['converted_ms']:5.2f} ms from "
                  f"--adapter-cache-dir ({base / row['converted_ms']:4.1f}x; target >= 4x)")
            if "pages_ms" in row:
                print(f"  into device pages, rank 16 {name:15s}: {row['via_host_ms']:6.2f} ms by a host copy, "
                      f"{row['pages_ms']:6.2f} ms converted straight into them "
                      f"({row['via_host_ms'] / row['pages_ms']:4.2f}x)")
    return out


def pages_load_ms(path: Path, layout, dtype, manifest, buffers) -> dict:
    """A CPU server's cold load, file to resident pages: converted into a host copy, then copied
    into the pages (DevicePool.fill), against converted straight into them (convert_into, what the
    server does without --adapter-cache-dir). {} without the C++ kernel."""
    from loramux.adapters import loader
    from loramux.adapters.device_pool import DevicePool

    kernels = load_kernels()
    if kernels is None or dtype == torch.float64:
        return {}
    # laid out as the server lays them out for the C++ op
    pool = DevicePool(layout, 2 * manifest.rank, dtype, "cpu", kernels.copy_rows, interleave=True)
    keys = iter(range(1 << 30))

    def via_host():
        weights = loader.load_adapter(path, layout, 64, dtype, manifest=manifest, convert=kernels.convert_adapter,
                                      **buffers)
        key = next(keys)
        pool.fill(key, pool.reserve(key, manifest.rank, evict=True), weights)

    def straight():
        decoded = loader.decode_adapter(path, layout, 64, manifest=manifest, read_buffer=buffers["read_buffer"])
        key = next(keys)
        pool.convert_into(key, pool.reserve(key, manifest.rank, evict=True), decoded, kernels.convert_to_pages)

    return {"via_host_ms": host_load_ms(via_host), "pages_ms": host_load_ms(straight)}


def make_adapters(root: Path, layout, n: int, ranks=RANKS) -> list[tuple[str, str]]:
    """Written once and reused: ``root`` keeps them between runs (a folder per set of ranks)."""
    if ranks != RANKS:
        root = root / ("ranks-" + "-".join(map(str, ranks)))
    out = []
    for i in range(n):
        path = root / f"adapter-{i:04d}"
        if not (path / "adapter_model.safetensors").exists():
            write_adapter(path, layout, ranks[i % len(ranks)], seed=i, targets=TARGETS, dtype=torch.float16)
        out.append((f"adapter-{i:04d}", str(path)))
    return out


async def run_open_loop(engine, requests, arrivals):
    async def one(req, at, t0):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return [ev async for ev in engine.submit(req)]

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(r, a, t0) for r, a in zip(requests, arrivals, strict=True)))
    return outs, time.perf_counter() - t0


def run(config, loaded, adapters, picks, prompts, arrivals, max_new, resident_first=False):
    """``resident_first``: every adapter the requests use is loaded onto the device before the
    timed run (config's tiers must hold them all), so it has no paging at all."""
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters)}), loaded)
    built.engine.start()
    try:
        if resident_first:
            used = sorted(set(picks))
            warm = [GenerationRequest(f"w{i}", (100,), SamplingParams(1, ignore_eos=True), adapters[a][0])
                    for i, a in enumerate(used)]
            asyncio.run(run_open_loop(built.engine, warm, [0.0] * len(warm)))
            assert all(built.manager.tier(built.manager.resolve(adapters[a][0]).key) == "device" for a in used)
        before, io_before = built.manager.tier_counters(), thread_cpu_seconds("adapter-io")  # not the warm-up's
        reqs = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new, ignore_eos=True), adapters[a][0])
                for i, (a, p) in enumerate(zip(picks, prompts, strict=True))]
        steal_before = steal_seconds()
        outs, wall = asyncio.run(run_open_loop(built.engine, reqs, arrivals))
        steal = steal_seconds() - steal_before
        counters = built.manager.tier_counters()
        io_cpu = thread_cpu_seconds("adapter-io") - io_before
    finally:
        built.engine.stop()
    last = [o[-1] for o in outs]
    cold = [e.timing.time_to_first_token_seconds for e in last if e.timing.adapter_load_seconds > 0]
    warm = [e.timing.time_to_first_token_seconds for e in last if e.timing.adapter_load_seconds == 0]
    return {
        "tokens_per_s": sum(len(o) for o in outs) / wall, "wall_s": wall,
        "ttft_cold_p50": percentile(cold, 50), "ttft_warm_p50": percentile(warm, 50),
        "ttft_cold_p90": percentile(cold, 90), "ttft_warm_p90": percentile(warm, 90),
        "cold_requests": len(cold), "device_evictions": counters["device"].evictions - before["device"].evictions,
        "host_misses": counters["host"].misses - before["host"].misses, "io_thread_cpu_s": io_cpu,
        "steal_s": steal,
    }


def thread_cpu_seconds(prefix: str) -> float:
    """CPU seconds so far of this process's threads whose names start with ``prefix`` (Linux; 0 elsewhere)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.native_id is not None:
            try:
                stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            except OSError:
                continue
            user, system = stat[stat.rindex(")") + 2 :].split()[11:13]
            total += (int(user) + int(system)) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--rate", type=float, default=40.0, help="Poisson arrival rate, requests/s (saturating)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "adapters")
    ap.add_argument("--repeats", type=int, default=6, help="alternated pairs of runs; the median ratio is reported")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)), help="adapter ranks, in turn (q/v adapters)")
    ap.add_argument("--max-device-adapters", type=int, default=32, help="the device tier, in adapters of --max-lora-rank 64")
    ap.add_argument("--max-host-adapters", type=int, default=128)
    ap.add_argument("--lora-dtype", default="auto", help="the server's --lora-dtype, for both sides of each pair")
    ap.add_argument("--decompose", action="store_true",
                    help="also run the many adapters with every one the requests use resident from the start, "
                         "in each round: the loss with paging and without it")
    args = ap.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))

    config = ServerConfig(model=args.model, max_batch_size=32, max_model_len=160, max_lora_rank=64,
                          default_max_new_tokens=args.new_tokens, max_device_adapters=args.max_device_adapters,
                          max_host_adapters=args.max_host_adapters, metrics_port=0, lora_dtype=args.lora_dtype)
    loaded = load_model(config)
    layout = lora_layout(loaded.hf_model.config)
    page_dtype = loaded.dtype if args.lora_dtype == "auto" else getattr(torch, args.lora_dtype)
    print(f"model {loaded.name}, {loaded.dtype}, adapter pages {page_dtype}; CPU: {cpu_name()}")
    loads = measure_host_loads(layout, page_dtype)  # loads convert into the pages' dtype
    t = time.perf_counter()
    adapters = make_adapters(args.cache, layout, args.adapters, ranks)
    print(f"{len(adapters)} adapters ready in {time.perf_counter() - t:.0f} s ({args.cache})")
    rng = random.Random(0)
    vocab = loaded.hf_model.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 64))] for _ in range(args.requests)]
    arrivals, at = [], 0.0
    for _ in range(args.requests):
        at += rng.expovariate(args.rate)
        arrivals.append(at)
    picks = zipf_choices(args.adapters, args.requests, 1.0, rng)
    # The same request sequence folded onto 8 adapters (the ranks in turn), all resident.
    few = [a for a in adapters[:8]]
    # Tiers that hold every adapter the requests use at once, for --decompose (pages: the sum of their ranks).
    pages = sum(ranks[a % len(ranks)] for a in set(picks))
    roomy = ServerConfig(**{**config.__dict__, "max_device_adapters": -(-pages // config.max_lora_rank),
                            "max_host_adapters": len(set(picks))})
    pairs, unpaged = [], []
    for i in range(args.repeats):  # adjacent pairs: the VM's speed drifts between runs of a minute or two
        many = partial(run, config, loaded, adapters, picks, prompts, arrivals, args.new_tokens)
        resident = partial(run, config, loaded, few, [p % 8 for p in picks], prompts, arrivals, args.new_tokens)
        # the order swapped each pair, so that a drift within a pair favours neither side
        done = {side: side() for side in ((many, resident) if i % 2 == 0 else (resident, many))}
        pairs.append((done[many], done[resident]))
        if args.decompose:
            unpaged.append(run(roomy, loaded, adapters, picks, prompts, arrivals, args.new_tokens, resident_first=True))
    ratios = [many["tokens_per_s"] / resident["tokens_per_s"] for many, resident in pairs]
    ratio = statistics.median(ratios)
    print(f"model {loaded.name}; {args.requests} requests, Poisson {args.rate}/s, Zipf(1.0), ranks {args.ranks}, "
          f"device tier {args.max_device_adapters} x rank 64, host tier {args.max_host_adapters}, "
          f"--lora-dtype {args.lora_dtype}")
    for many, resident in pairs:
        print(f"  {args.adapters} adapters: {many['tokens_per_s']:7.1f} tok/s ({many['cold_requests']} cold requests, "
              f"{many['device_evictions']} device evictions, {many['host_misses']} disk reads, adapter I/O thread "
              f"{many['io_thread_cpu_s']:.1f} s CPU); 8 resident: "
              f"{resident['tokens_per_s']:7.1f} tok/s; ratio {many['tokens_per_s'] / resident['tokens_per_s']:.3f}; "
              f"CPU time stolen by the VM's host {many['steal_s']:.2f} / {resident['steal_s']:.2f} s")
        print(f"    TTFT p50 cold {many['ttft_cold_p50']:.3f} s vs warm {many['ttft_warm_p50']:.3f} s; "
              f"p90 cold {many['ttft_cold_p90']:.3f} s vs warm {many['ttft_warm_p90']:.3f} s")
    print(f"  ratio, median of {len(pairs)} alternated pairs: {ratio:.3f} (target >= 0.95)")
    decomposed = {}
    if unpaged:  # each round's unpaged run against the same round's two
        no_paging = statistics.median(u["tokens_per_s"] / r["tokens_per_s"] for u, (_, r) in zip(unpaged, pairs, strict=True))
        paging = statistics.median(m["tokens_per_s"] / u["tokens_per_s"] for u, (m, _) in zip(unpaged, pairs, strict=True))
        decomposed = {"unpaged": unpaged, "unpaged_over_resident": no_paging, "paged_over_unpaged": paging}
        print(f"  the same {args.adapters} adapters with all {len(set(picks))} the requests use resident from the "
              f"start (device tier {roomy.max_device_adapters} x rank {config.max_lora_rank}): "
              + ", ".join(f"{u['tokens_per_s']:.1f}" for u in unpaged) + " tok/s")
        print(f"    unpaged / 8 resident {no_paging:.3f}: the cost of more distinct adapters a step (their pages' bytes)")
        print(f"    paged / unpaged {paging:.3f}: the cost of paging (loads, evictions, cold requests' waits)")
    if args.json:
        args.json.write_text(json.dumps({"runs": [{"many": m, "resident": r} for m, r in pairs], "ratio": ratio,
                                         "ratios": ratios, "host_loads": loads, **decomposed, "adapters": args.adapters,
                                         "lora_dtype": args.lora_dtype,
                                         "requests": args.requests, "ranks": ranks,
                                         "max_device_adapters": args.max_device_adapters,
                                         "max_host_adapters": args.max_host_adapters}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
