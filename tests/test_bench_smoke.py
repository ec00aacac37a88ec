"""The benchmark script runs and its exactness checks pass (timings are not asserted)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_foundation_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_foundation.py"), "--quick", "--threads", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data, "the bench wrote no results"


def test_cycles_bench_quick(tmp_path):
    """The cycle bench runs its quick set in amaranth.sim and the model matches every row."""
    pytest.importorskip("amaranth")
    out = tmp_path / "cycles.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_cycles.py"), "--quick", "--csv", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) >= 4
    for row in rows:
        assert row["match"] == "yes", row
        assert int(row["busy"]) - int(row["stall"]) == int(row["ideal"]), row
