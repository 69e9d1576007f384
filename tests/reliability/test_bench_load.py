"""``benchmarks/bench_load.py`` keeps working (a few thousand rows here; the 1,000,000-row numbers are in
docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_load.py"


def test_bench_load_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH), "--rows", "3000", "--per-device", "2", "--accumulation", "4",
                          "--json", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["rows"] == out["index"]["rows"] == out["check"]["rows"] == out["order"]["rows"] == 3000
    assert (out["check"]["errors"], out["check"]["usable"], out["check"]["exit_code"]) == (3, 2997, 1)
    assert out["check"]["error_lines"] == [1000, 2000, 3000]
    assert (out["order"]["steps"], out["order"]["micro_batches"], out["order"]["pairs"]) == (375, 1500, 3000)
    assert list(tmp_path.iterdir()) == []  # the generated data is removed
