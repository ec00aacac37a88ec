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


def test_detect_bench_quick(tmp_path):
    """The detection bench runs its quick set: every preset gets model cycles and an
    estimated frame rate; where the bundle fits, the emulator's reported cycles equal the
    model's (exit status 0) and link bytes are measured."""
    if not (ROOT / "sw" / "assets" / "default.bitdet").exists():
        pytest.skip("sw/assets/default.bitdet is not shipped yet")
    out = tmp_path / "detect.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_detect.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["tiny", "icebreaker", "ulx3s"]
    assert all(r["busy_cycles"] > 0 and r["estimated_fps"] > 0 for r in rows)
    fitting = [r for r in rows if r["fits"]]
    assert fitting, "the default bundle fits no preset"
    for r in fitting:
        assert r["bytes_out"] > 0 and r["bytes_in"] > 0 and r["emulator_fps"] > 0
        assert r["link_limited_fps"] == pytest.approx(r["baud"] / 10 / (r["bytes_out"]
                                                                        + r["bytes_in"]))


def test_array_fmax_bench_ice40(tmp_path):
    """The array-fmax harness places and routes a small array on the UP5K: the report has
    a post-route fmax, resources of the right order and the clock's critical path."""
    pytest.importorskip("amaranth")
    from bitdet.hw.build import BuildError, fpga_environment
    try:
        fpga_environment()
    except BuildError as err:
        pytest.skip(str(err))
    out = tmp_path / "fmax.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_array_fmax.py"), "--family", "ice40",
         "--array", "1x2x4", "--acc-width", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [record] = json.loads(out.read_text())["results"]
    assert (record["rows"], record["cols"], record["simd"], record["bits"]) == (1, 2, 4, 8)
    assert record["fmax_mhz"] > 0
    assert record["meets_target"] == (record["fmax_mhz"] >= record["target_mhz"] == 40.0)
    # two PEs with 4-bit accumulators, the harness's shift register and XOR levels
    assert 8 <= record["lut4"] < 400 and record["ff"] >= 2 * 4
    assert record["critical_path"][0].startswith("Info: Critical path report for clock")
    assert "ns routing" in record["critical_path"][-1]


@pytest.mark.parametrize(("args", "message"), [
    (["--array", "8x8"], "ROWSxCOLSxSIMD"),
    (["--array", "0x1x1"], "must be positive"),
    (["--acc-width", "0"], "--acc-width must be at least 1"),
])
def test_array_fmax_bench_rejects_bad_arguments(args, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_array_fmax.py"), "--family", "ice40",
         *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
