"""Benchmarks end to end on a tiny model (`make bench --quick`, `bench/scale_steps.py`): each runs and
reports in the expected form.
No timing is asserted: speed lives in BENCHMARKS.md, measured by the full run."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_a_well_formed_report(tiny_llama, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare.py"), "--quick", "--model", str(tiny_llama),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [name.split()[0] for name in rows] == ["1", "2", "8", "3", "4", "5", "6", "7", "7", "7"]
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0, name
        assert row["errors"] in ({}, 0), name
    assert [s["adapters"] for s in report["scaling"]] == [1, 8, 64]
    assert len(report["ratios"]) == 8 and all(v > 0 for v in report["ratios"].values())
    assert len(report["pass_ratios"]) == 1  # --quick: one pass of rows 1 and 2
    assert any(k.startswith("row1/row2, median of 1 ") for k in report["ratios"])
    assert len(report["scale_ratios"]) == 1  # --quick: row 7's one pass, no repeated pairs
    assert len(report["http_ratios"]) == 1  # --quick: one gRPC/HTTP pair
    assert any(k.startswith("row8/row1, HTTP/gRPC, median of 1 ") for k in report["ratios"])
    assert report["quick"] is True and report["machine"]["cores"] >= 1
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "row1/row2" in proc.stdout


def test_row_seven_step_split_runs_on_a_tiny_model(tiny_llama, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/scale_steps.py"), "--pairs", "1", "--many", "40",
                           "--model", str(tiny_llama), "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [line.split() for line in proc.stdout.splitlines() if "adapters:" in line]
    assert sorted(int(r[0]) for r in runs) == [8, 40]
    assert all(float(r[2]) > 0 and r[3] == "tok/s," for r in runs)
    assert re.search(r"40/8 median \d+\.\d+; decode steps [+-]\d+\.\d ms for -?\d+\.\d more", proc.stdout), proc.stdout


def test_structured_output_cost_runs_on_a_tiny_model(tiny_llama):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/structured_output.py"), "--rounds", "1", "--requests", "4",
                           "--new-tokens", "6", "--model", str(tiny_llama)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("free", "json_schema", "regex"):
        assert re.search(rf"{name} +decode step +\d+\.\d ms .* over free text: \d+\.\d{{3}}", proc.stdout), proc.stdout


def test_dora_cost_runs_on_a_tiny_model(tiny_llama):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/dora.py"), "--rounds", "1", "--requests", "4",
                           "--adapters", "2", "--prompt", "8", "--new-tokens", "6", "--model", str(tiny_llama)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("base", "lora", "dora"):
        assert re.search(rf"{name} +decode step +\d+\.\d ms .* prefill +\d+ tok/s", proc.stdout), proc.stdout
    assert re.search(r"DoRA decode step over LoRA's: \d+\.\d{3}; DoRA adds -?\d+\.\d% .* prefill over LoRA's: "
                     r"\d+\.\d{3}", proc.stdout), proc.stdout


def test_bench_decode_runs_on_the_small_model():
    """`make bench-decode`'s paired runs swap the engine's LoRA op for stand-ins with its signature:
    a change to that signature must fail here, not in a benchmark run."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/engine_decode.py"), "--models", "small", "--requests", "4",
                           "--new-tokens", "6", "--rounds", "1", "--prefill-len", "16", "--prompt-len", "8",
                           "--lm-head"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 16 on all 7 projections and lm_head:" in proc.stdout, proc.stdout
    assert re.search(r"LoRA overhead +-?\d+\.\d ms against a floor of +\d+\.\d ms", proc.stdout), proc.stdout
    assert re.search(r"the same pages read \(a sum\) in the LoRA op's place", proc.stdout), proc.stdout


def test_step_breakdown_runs_on_the_small_model():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/step_breakdown.py"), "--models", "small", "--requests", "4",
                           "--new-tokens", "4", "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^  (074fd0b|now) +(\d+\.\d) +(\d+\.\d) +\d+\.\d\d", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["074fd0b", "now"] and all(float(r[2]) > 0 for r in rows), proc.stdout


def test_int8_comparison_runs_on_a_tiny_model(tiny_llama, tmp_path):
    """bench/quantized.py on the tiny model: both engines' rows, the prefill, bytes and rounding lines,
    and its JSON report (the projections a quarter of their float32 bytes, plus the scales)."""
    report = tmp_path / "quantized.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/quantized.py"), "--rounds", "1", "--batches", "1", "4",
                           "--new-tokens", "4", "--prompt-len", "8", "--prefill", "2x40", "--rank", "4",
                           "--text-tokens", "64", "--model", str(tiny_llama), "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for batch in (1, 4):
        for kind in ("base", "mixed"):
            assert re.search(rf"batch +{batch} {kind} *: float32 +\d+\.\d, int8 +\d+\.\d, int8/float32 \d\.\d\d",
                             proc.stdout), proc.stdout
    assert re.search(r"prefill tokens/s \(2 prompts of 40, base model\): float32 \d+\.\d", proc.stdout), proc.stdout
    assert re.search(r"perplexity float32 \d+\.\d{3}, int8 \d+\.\d{3}; next-token argmax agrees", proc.stdout)
    data = json.loads(report.read_text())
    sizes = data["projection_bytes"]
    assert sizes["none"] / 4 < sizes["int8"] < sizes["none"] / 3 and len(data["decode"]) == 4


def test_saved_modules_cost_runs_on_a_tiny_model(tiny_llama, tmp_path):
    """bench/saved_modules.py on the tiny model: the floor line, a row per distinct count, and its
    JSON report."""
    report = tmp_path / "saved.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/saved_modules.py"), "--rounds", "1", "--batch", "4",
                           "--distinct", "1", "2", "--new-tokens", "4", "--prompt-len", "8", "--model", str(tiny_llama),
                           "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"lm_head 0 MiB, read once in \d+\.\d ms", proc.stdout), proc.stdout
    for k in (1, 2):
        assert re.search(rf"{k} distinct: base \d+\.\d, q/v LoRA \d+\.\d, \+ trained lm_head \d+\.\d \([+-]\d+\.\d = "
                         rf"-?\d+\.\d\dx {k} reads of it\), \+ trained embedding \d+\.\d \([+-]\d+\.\d\), added "
                         r"tokens \(both, resized\) \d+\.\d", proc.stdout), proc.stdout
    assert re.search(r"ragged step's -inf fill of \[4, 388\] logits: \d+\.\d\d ms", proc.stdout), proc.stdout
    assert [row["distinct"] for row in json.loads(report.read_text())["rows"]] == [1, 2]
