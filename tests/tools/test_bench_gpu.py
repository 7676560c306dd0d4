"""`make gpu-check` end to end on the CPU (`--quick`, tiny model): every stage runs and reports,
and the GPU benchmark's report is well formed. The real run is on a GPU; its numbers live in
BENCHMARKS.md."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text()[-chars:] if path.exists() else "(none)"


def _unpack(out: Path) -> Path:
    """The check's two files under ``out`` (the device tool returns few), the archive unpacked."""
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tgz", "report.json"]
    with tarfile.open(out / "gpu-check.tgz") as tar:
        tar.extractall(out / "files", filter="data")
    files = out / "files"
    assert (files / "report.json").read_text() == (out / "report.json").read_text()
    return files


def test_quick_gpu_check_runs_every_stage_and_writes_its_reports(tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--model", str(tiny_llama),
                           "--out", str(out)], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "LORAMUX_NO_CPU_KERNEL": "1"})
    files = _unpack(out)
    report = json.loads((out / "report.json").read_text())
    failed = [n for n, s in report["stages"].items() if not s["ok"] or s.get("returncode", 0) != 0]
    assert proc.returncode == 0 and not failed, proc.stdout[-3000:] + proc.stderr[-3000:] + "".join(
        f"\n--- {n}.stage.log\n" + _tail(files / f"{n}.stage.log") + f"\n--- {n}.log\n" + _tail(files / f"{n}.log")
        for n in failed)
    assert list(report["stages"]) == ["env", "ops", "parity", "bench", "profile"]
    assert all(stage["ok"] for stage in report["stages"].values())
    assert not (files / "work").exists()  # the models and adapters it built stay behind
    env = json.loads((files / "env.json").read_text())
    assert env["torch"] and env["stubs"] == "import"
    assert "passed" in (files / "ops.log").read_text() and "passed" in (files / "parity.log").read_text()
    profile = (files / "profile.txt").read_text()
    assert "one decode step at batch 4" in profile and "aten::" in profile
    bench = json.loads((files / "bench-model.json").read_text())
    model = bench["models"]["model"]
    assert list(model["batches"]) == ["1", "4"]
    for row in model["batches"].values():
        for key in ("base_tok_s", "mixed_tok_s", "peft_mixed_tok_s", "mixed/base", "loramux/PEFT"):
            assert row[key] > 0, key
    assert model["zipf"]["many_tok_s"] > 0 and model["zipf"]["eight_tok_s"] > 0
    # --quick asks for --cuda-graphs on: on a CPU the static path (no graph captured), and eager beside it
    assert model["cuda_graphs"] == 0 and model["eager"]["batch"] == 4 and model["eager"]["mixed/base"] > 0
    assert bench["quick"] is True and set(bench["targets"]) == {
        "mixed/base at batch 32", "loramux/PEFT at batch 256", "1000/8 adapters"}


def test_the_gpu_benchmark_imports_no_grpc():
    code = ("import sys; sys.path.insert(0, 'bench'); import gpu, common; "
            "bad = {'grpc', 'loramux.v1.loramux_pb2'} & set(sys.modules); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_stage_past_its_budget_is_recorded_with_every_threads_stack(tiny_llama, tmp_path):
    """A hung stage must not hang the check (a GPU is lent for minutes): it is stopped at its
    budget, its stacks are kept, and the report says so. One second is too short for any stage
    that imports torch."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--model", str(tiny_llama),
                           "--stage", "profile", "--stage-budget", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stage = json.loads((out / "report.json").read_text())["stages"]["profile"]
    assert stage["ok"] is False and "budget 1 s" in stage["error"] and "profile.stage.log" in stage["error"]
    log = (_unpack(out) / "profile.stage.log").read_text()
    assert "Timeout (0:00:01)!" in log and "most recent call first" in log


def test_a_check_ended_by_sigterm_streams_its_progress_and_publishes_the_stage_so_far(tiny_llama, tmp_path):
    """A device call that runs past its limit is ended by SIGTERM: what the running stage printed
    must already be on stdout (the tool returns its tail) and in the published archive, and no
    process of the check may outlive it."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--model", str(tiny_llama),
                             "--stage", "bench", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "LORAMUX_NO_CPU_KERNEL": "1"})
    seen = []
    try:
        for line in proc.stdout:  # bench/gpu.py names its model before it builds an engine
            seen.append(line)
            if line.startswith("[bench.stage] [bench-model] model:"):
                break
        else:
            raise AssertionError("the benchmark's progress never reached stdout:\n" + "".join(seen)[-3000:])
        proc.terminate()
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    stage = json.loads((out / "report.json").read_text())["stages"]["bench"]
    assert stage["ok"] is False and "stopped by SIGTERM" in stage["error"]
    assert "[bench-model] model:" in (_unpack(out) / "bench.stage.log").read_text()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps and str(tiny_llama) not in ps  # the stage and the benchmark went with it


def test_stages_past_the_total_budget_are_not_started(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--stage", "env,ops", "--total-s", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages == {name: {"ok": False, "error": "not run: --total-s 20 spent"} for name in ("env", "ops")}
