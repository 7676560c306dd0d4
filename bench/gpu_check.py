"""`make gpu-check`: everything a first GPU session needs to learn, as one script in stages.

A GPU is lent rarely and briefly, so this runs on the GPU machine's own Python (no registry, no
network: `make gpu-check` installs the project with --no-deps), in stages of a few minutes each on
one H200. After every stage it writes under --out (the device tool's $OUT, which returns at most 8
files) two files: report.json, and gpu-check.tgz with every log and report below (not the models
and adapters it builds), so a call stopped part-way still brings back what the stages before learnt
(a SIGTERM publishes the running stage's log so far too). Every log line is also echoed to stdout,
tagged with its log's name: do not pipe the call through ``tail``, whose output a killed call loses:

  env      versions, the GPU, what imports (env.json)
  ops      the native op tests: Triton's LoRA and attention kernels against the references (ops.log)
  parity   the engine's token-exact PEFT parity tests on CUDA (parity.log)
  bench    bench/gpu.py on the SmolLM2-shaped and 1B-shaped models (bench-*.json, bench-*.log)
  profile  a torch profiler summary of one decode step at batch 32 (profile.txt)

Each stage runs in a process of its own, within a time budget (STAGE_S; QUICK_STAGE_S with
--quick; --stage-budget S for all): a failed or hung stage is recorded, with every thread's stack
for a hang, and the next one still runs. --stage NAME[,NAME...] runs those. --quick runs every stage in a
tiny form anywhere (the CPU test of this script).

    python bench/gpu_check.py [--stage all|env,ops,parity,bench,profile] [--out DIR] [--stage-budget S]
                              [--total-s S] [--quick --model DIR]
    python bench/gpu_check.py --export-tokenizer bench/gpu-assets/tokenizer   # on the CPU side, once
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "ops", "parity", "bench", "profile")
ASSETS = ROOT / "bench" / "gpu-assets"
# Caps, not estimates. The first H200 run (session 49) took env 21 s, ops 36 s; parity's 335 tests
# (session 54 added each family's staggered test once, through CUDA graphs; session 55 sixteen
# architectures and the host-sync test; never yet run on a GPU, so the cap may cut it) run on 4 workers
# (tests/conftest.py sizes each engine's KV pool at 5% of the free GPU memory; in session 49, at 80%,
# four workers starved each other), and bench's two models may take most of a device call: run
# STAGE=env,ops,parity,profile and STAGE=bench as two calls.
STAGE_S = {"env": 60, "ops": 120, "parity": 300, "bench": 540, "profile": 120}
QUICK_STAGE_S = 90  # each stage with --quick; all five take 20-40 s on a 2-core CPU


def stage_env(args, out: Path) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), capability=list(torch.cuda.get_device_capability()))
    for module in ("triton", "transformers", "peft", "grpc", "google.protobuf", "prometheus_client", "re2",
                   "fastapi", "uvicorn", "pytest", "hypothesis", "llguidance"):
        try:
            imported = __import__(module, fromlist=["__version__"])
            info[module] = getattr(imported, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            info[module] = f"missing: {type(e).__name__}: {e}"
    try:  # the generated stubs carry version guards for grpcio and protobuf
        from loramux.v1 import loramux_pb2, loramux_pb2_grpc  # noqa: F401

        info["stubs"] = "import"
    except Exception as e:  # noqa: BLE001
        info["stubs"] = f"fail: {type(e).__name__}: {e}"
    (out / "env.json").write_text(json.dumps(info, indent=2))
    return info


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` with a time limit; (its return code or None on a timeout, its stdout). Its
    output goes to ``log`` line by line as it comes, and to this process's stdout tagged with the
    log's name, so that a device call stopped part-way still shows how far it got (the device tool
    returns the output's tail). A Python child out of time is sent SIGABRT first, so that its log
    ends with every thread's stack (PYTHONFAULTHANDLER)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"})
    stdout: list[str] = []
    lock = threading.Lock()
    with log.open("w") as sink:
        def pump(stream, keep: list[str] | None) -> None:
            for line in stream:
                with lock:
                    sink.write(line)
                    sink.flush()
                    print(f"[{log.stem}] {line}", end="", flush=True)
                if keep is not None:
                    keep.append(line)

        pumps = [threading.Thread(target=pump, args=(proc.stdout, stdout), daemon=True),
                 threading.Thread(target=pump, args=(proc.stderr, None), daemon=True)]
        for t in pumps:
            t.start()
        code = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGABRT)
        except BaseException:  # SIGTERM (sys.exit) or ^C here: the child goes too, passing it on to its own
            _stop(proc, signal.SIGTERM)
            raise
        finally:
            for t in pumps:  # a grandchild still holding the pipes must not hold this up
                t.join(timeout=5)
        if code is None:
            sink.write(f"\n[stopped after {timeout:.0f} s]\n")
    return code, "".join(stdout)


def _stop(proc: subprocess.Popen, sig: int) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pytest(args, out: Path, name: str, targets: list[str], quick_filter: str, workers: int = 1,
            select: str | None = None) -> dict:
    """``select``: a -k expression for the full run (--quick runs ``quick_filter`` instead)."""
    # pytest-timeout prints every thread's stack for a test that hangs, before the stage runs out
    # -v: each test's outcome on a line as it ends, so a stage cut short still names its failures
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *targets,
           "--timeout", str(max(1, int(args.budget - 20))), "--junitxml", str(out / f"{name}.xml")]
    if args.quick:
        cmd += ["-k", quick_filter]
    elif select:
        cmd += ["-k", select]
    if not args.quick and workers > 1:  # sharing the one GPU (tests/conftest.py keeps each engine's KV pool small)
        cmd += ["-n", str(workers)]
    code, stdout = _run(cmd, out / f"{name}.log", max(1.0, args.budget - 10))
    return {"returncode": code, "summary": (stdout.strip().splitlines() or [""])[-1]}


def stage_ops(args, out: Path) -> dict:
    # the LoRA kernels, and the attention kernels (Triton's decode and prefill) against the oracle
    return _pytest(args, out, "ops", ["tests/unit/test_ops.py", "tests/unit/test_attention.py",
                                      # the sampler's one wait for the device, by CUDA's sync debug mode
                                      "tests/unit/test_sampling.py::test_sampling_on_a_gpu_synchronises_once"],
                   "bgmv_matches_reference and dtype0 and torch", workers=4)


def stage_parity(args, out: Path) -> dict:
    # most telling first (xdist hands tests out in this order, so a stage cut short by its budget has
    # run these): the static decode path and its host waits, mixed-adapter parity, every family
    # through CUDA graphs and the Triton attention kernels, then each feature in every family
    return _pytest(args, out, "parity", ["tests/engine/test_decode_graphs.py",
                                         "tests/engine/test_host_syncs.py",  # one wait for the device a step
                                         "tests/engine/test_parity.py",
                                         "tests/engine/test_families.py::test_family_matches_peft_with_staggered_joins",
                                         "tests/engine/test_speculative.py", "tests/engine/test_dora.py",
                                         "tests/engine/test_lm_head.py", "tests/engine/test_embedding_lora.py",
                                         "tests/engine/test_trainable_tokens.py", "tests/engine/test_quantization.py",
                                         "tests/engine/test_saved_modules.py", "tests/engine/test_added_tokens.py",
                                         # hybrids' states, prefix caching and drafts (never yet run on a GPU)
                                         "tests/engine/test_recurrent.py"],
                   # --quick (the CPU smoke test): one parity test shows the stage runs; make test runs the rest
                   "staggered_mixed_adapters and torch and not float16",
                   workers=4,  # each engine's KV pool takes 5% of the free GPU memory in tests (conftest.py)
                   # one run a family: on CUDA both of its variants capture graphs (auto); the one without caching
                   select="not staggered_joins or graphs")


def stage_bench(args, out: Path) -> dict:
    # --quick: on a CPU, --cuda-graphs on runs the static decode path (and the eager rows beside it)
    runs = [("model", ["--quick", "--model", str(args.model), "--cuda-graphs", "on"])] if args.quick else \
        [(m, ["--models", m]) for m in ("llama-1b", "default")]  # one base model per process; the targets' first
    results, deadline = {}, time.monotonic() + args.budget - 10
    for name, extra in runs:
        tokenizer = ["--tokenizer", str(ASSETS / "tokenizer")] if (ASSETS / "tokenizer").exists() else []
        cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), *extra, *tokenizer, "--json",
               str(out / f"bench-{name}.json"), "--work", str(out / "work")]
        code, stdout = _run(cmd, out / f"bench-{name}.log", max(1.0, deadline - time.monotonic()))
        results[name] = {"returncode": code, "tail": stdout.strip().splitlines()[-6:]}
    codes = [r["returncode"] for r in results.values()]
    return {"runs": results, "returncode": None if None in codes else max(codes)}


def stage_profile(args, out: Path) -> dict:
    """One decode step at batch 32 (4 in --quick) over distinct adapters, under the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(ROOT / "bench"))
    from loramux.server.builder import build_engine
    from loramux.server.config import ServerConfig
    from loramux.server.models import lora_layout
    from loramux.server.requests import GenerationRequest, SamplingParams

    from common import StepRecorder, random_prompts
    from gpu import RANK, SHAPES, build_random_llama, device_dtype, load_tokenizer, write_adapters

    batch = 4 if args.quick else 32
    if args.quick:
        model = str(args.model)
    else:
        tokenizer = load_tokenizer(ASSETS / "tokenizer" if (ASSETS / "tokenizer").exists() else None)
        model = str(build_random_llama(out / "work" / "default", SHAPES["default"], tokenizer, *device_dtype("auto")))
    config = ServerConfig(model=model, max_batch_size=batch, max_tokens_per_step=max(512, batch), max_model_len=128,
                          default_max_new_tokens=8, max_lora_rank=RANK, max_device_adapters=batch,
                          max_host_adapters=2 * batch, metrics_port=0)
    from loramux.server.model_loader import load_model

    loaded = load_model(config)
    adapters = write_adapters(out / "work" / "profile-adapters", lora_layout(loaded.hf_model.config), 4, batch)
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters)}), loaded)
    engine = built.engine  # never started: this thread runs its steps, so the profiler sees them
    prompts = random_prompts(loaded.hf_model.config.vocab_size, batch, 16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    async def drain(stream):
        async for _ in stream:
            pass

    async def run():
        streams = [engine.submit(GenerationRequest(f"p{i}", tuple(p), SamplingParams(64, ignore_eos=True), a))
                   for i, (p, (a, _)) in enumerate(zip(prompts, adapters, strict=True))]
        readers = [asyncio.create_task(drain(s)) for s in streams]
        deadline, steps = time.monotonic() + args.budget / 2, StepRecorder()
        engine.observers.append(steps)
        while sum(1 for st in steps.steps if st.num_decode_tokens == batch) < 2:
            stepped, _ = engine.run_once()  # adapter loads, prefill, and two full decode steps to warm everything
            # idle, wait as the engine's own loop does: a thread that spins here takes the GIL back
            # each time the I/O thread would get it, and an adapter read can starve for minutes
            await asyncio.sleep(0 if stepped else 0.005)
            failed = next((r for r in readers if r.done() and r.exception() is not None), None)
            if failed is not None:  # a failed request never decodes: say why now, not at the deadline
                raise failed.exception()
            assert time.monotonic() < deadline, "the profiled batch never started decoding"
        engine.observers.remove(steps)
        with profile(activities=activities) as prof:
            engine.run_once()  # the one decode step at this batch size
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        for stream in streams:
            stream.cancel()
        engine.run_once()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        return prof

    try:
        with torch.inference_mode():
            prof = asyncio.run(run())
    finally:
        engine.stop()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    (out / "profile.txt").write_text(f"one decode step at batch {batch}\n{table}\n")
    return {"batch": batch, "rows": table.count("\n")}


def export_tokenizer(dest: Path) -> None:
    """The default model's tokenizer (a few MiB) for the GPU machine, which has no model package."""
    from transformers import AutoTokenizer

    from loramux.server.config import ServerConfig
    from loramux.server.model_loader import resolve_model_dir

    AutoTokenizer.from_pretrained(resolve_model_dir(ServerConfig())[0]).save_pretrained(dest)
    print(f"tokenizer in {dest}")


def run_stage(name: str, args, files: Path, left: float | None = None) -> dict:
    """One stage in a child process that writes into ``files``, within its budget (no more than
    ``left`` seconds, if given); its result, or why there is none."""
    budget = args.stage_budget or (QUICK_STAGE_S if args.quick else STAGE_S[name])
    if left is not None:
        budget = min(budget, left)
    cmd = [sys.executable, __file__, "--stage", name, "--out", str(files), "--in-process", "--budget", str(budget)]
    if args.quick:
        cmd += ["--quick", "--model", str(args.model)]
    result_file = files / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    code, _ = _run(cmd, files / f"{name}.stage.log", budget + 10)
    if result_file.exists():
        return json.loads(result_file.read_text())
    how = "was killed" if code is None else f"exited with {code}"
    return {"ok": False, "error": f"no result: the stage's process {how} (budget {budget:g} s); "
                                  f"its output, and every thread's stack if it ran out of time, in {name}.stage.log"}


def run_in_process(name: str, args) -> None:
    """The child's side: run the stage; a stage that outlives its budget prints every thread's
    stack and exits, so a hang says where it is."""
    faulthandler.dump_traceback_later(args.budget, exit=True)
    try:
        result = {"ok": True, **globals()[f"stage_{name}"](args, args.out)}
    except Exception as e:  # noqa: BLE001 - record it and go on: the device time is precious
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    (args.out / f"{name}.result.json").write_text(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", help=f"all, or some of {','.join(STAGES)} (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu-check"))
    ap.add_argument("--quick", action="store_true", help="every stage in a tiny form, anywhere (needs --model)")
    ap.add_argument("--model", type=Path, default=None, help="with --quick: a small model folder")
    ap.add_argument("--export-tokenizer", type=Path, default=None, help="write the default tokenizer here and exit")
    ap.add_argument("--stage-budget", type=float, default=None,
                    help="seconds each stage may take (default: STAGE_S, or QUICK_STAGE_S with --quick)")
    ap.add_argument("--total-s", type=float, default=None,
                    help="seconds for the whole run: each stage's budget shrinks to what is left, so the run "
                         "ends and publishes before the device call's own limit")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # a stage's own process
    ap.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return 0
    if args.quick and args.model is None:
        ap.error("--quick needs --model")
    args.out.mkdir(parents=True, exist_ok=True)
    # A device call that runs out of time ends with SIGTERM: each process passes it on to its child
    # (_run), and the stage under way still publishes its log so far.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.in_process:
        run_in_process(args.stage, args)
        return 0
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    if unknown := set(stages) - set(STAGES):
        ap.error(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGES)}")
    files = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # the stages' logs, reports and built models
    report, started = {"quick": args.quick, "stages": {}}, time.perf_counter()
    for name in stages:
        t0 = time.perf_counter()
        left = None if args.total_s is None else args.total_s - (time.perf_counter() - started) - 15
        if left is not None and left < 20:
            report["stages"][name] = {"ok": False, "error": f"not run: --total-s {args.total_s:g} spent"}
            report["seconds"] = round(time.perf_counter() - started, 1)
            publish(report, files, args.out)
            continue
        try:
            result = run_stage(name, args, files, left)
        except SystemExit:
            report["stages"][name] = {"ok": False, "error": f"stopped by SIGTERM after {time.perf_counter() - t0:.0f} s; "
                                                            f"its log so far in {name}.stage.log"}
            publish(report, files, args.out)
            raise
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["stages"][name] = result
        print(f"[{name}] {result['seconds']} s: {json.dumps(result)[:400]}", flush=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        publish(report, files, args.out)
    failed = [n for n, r in report["stages"].items() if not r["ok"] or r.get("returncode", 0) != 0]
    print(f"gpu-check: {len(stages) - len(failed)}/{len(stages)} stages passed in {report['seconds']} s; "
          f"{args.out / 'report.json'}, and every log in {args.out / 'gpu-check.tgz'}")
    shutil.rmtree(files, ignore_errors=True)
    return 1 if failed else 0


def publish(report: dict, files: Path, out: Path) -> None:
    """report.json, and gpu-check.tgz of ``files`` but the built models (work/), into ``out``;
    each replaced whole, so a call stopped mid-write still returns the last complete ones."""
    (files / "report.json").write_text(json.dumps(report, indent=2))
    tmp = out / "gpu-check.tgz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(files.iterdir()):
            if path.name != "work":
                tar.add(path, arcname=path.name)
    tmp.replace(out / "gpu-check.tgz")
    shutil.copyfile(files / "report.json", out / "report.json.part")
    (out / "report.json.part").replace(out / "report.json")


if __name__ == "__main__":
    sys.exit(main())
