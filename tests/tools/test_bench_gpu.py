"""`bench/gpu.py --quick` end to end on a tiny model (on the CPU here): the report is well formed.
The real run, on a GPU, is `make bench-gpu`; its numbers live in BENCHMARKS.md."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_gpu_benchmark_writes_a_well_formed_report(tiny_llama, tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--quick", "--model", str(tiny_llama),
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    model = report["models"]["model"]
    assert list(model["batches"]) == ["1", "4"]
    for row in model["batches"].values():
        for key in ("base_tok_s", "mixed_tok_s", "peft_mixed_tok_s", "mixed/base", "loramux/PEFT"):
            assert row[key] > 0, key
    assert model["zipf"]["many_tok_s"] > 0 and model["zipf"]["eight_tok_s"] > 0
    assert model["zipf"]["adapters"] == 16
    assert report["quick"] is True and set(report["targets"]) == {
        "mixed/base at batch 32", "loramux/PEFT at batch 256", "1000/8 adapters"}
