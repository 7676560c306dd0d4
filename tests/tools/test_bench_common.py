"""The benchmarks' shared helpers that read the machine's state."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import steal_seconds  # noqa: E402


def test_steal_is_the_aggregate_lines_eighth_value_in_seconds(tmp_path):
    stat = tmp_path / "stat"
    tck = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  10 0 5 900 1 0 2 {3 * tck} 0 0\ncpu0 5 0 2 450 0 0 1 {tck} 0 0\nintr 1\n")
    assert steal_seconds(stat) == 3.0


def test_steal_is_zero_where_the_kernel_does_not_report_it(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 5 900\n")  # a kernel before steal time
    assert steal_seconds(stat) == 0.0
    assert steal_seconds(tmp_path / "missing") == 0.0
