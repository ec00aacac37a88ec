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



def test_levels_bench_quick(tmp_path):
    """The n-bit layer bench on one tiny layer, one sample: the golden rows for in_bits
    1 … 4 (and the 1-bit popcount path and the shortcut case) agree, and the contract-2
    emulator's output and counters equal the golden model's and the cycle model's."""
    out = tmp_path / "levels.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_levels.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    golden = data["golden"]
    assert [(r["path"], r["in_bits"], r["shortcut_bits"]) for r in golden] == [
        ("popcount_conv2d", 1, 0), *(("level_conv2d", n, 0) for n in (1, 2, 3, 4)),
        ("level_conv2d", 2, 2)]
    assert all(r["exact"] and r["median_s"] > 0 for r in golden)
    assert data["emulator_skipped"] is None, data["emulator_skipped"]
    emulator = data["emulator"]
    assert [(r["in_bits"], r["shortcut_bits"]) for r in emulator] == [(1, 0), (2, 0), (3, 0),
                                                                      (4, 0), (2, 2)]
    assert all(r["exact"] and r["busy_cycles"] > 0 for r in emulator)
    assert emulator[0]["run_ratio"] == 1.0
    again = subprocess.run(                    # an existing output is kept, before any run
        [sys.executable, str(ROOT / "bench" / "bench_levels.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads(out.read_text()) == data


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


def test_make_default_writes_a_record_the_shipped_checks_accept(tmp_path, monkeypatch):
    """bench/make_default.py on a tiny run (recipe shrunk to it): the record matches the
    bundle (size, sha256, method/seed/epoch), the bundle fits the iCEBreaker preset, checkpoint
    and bundle score alike, and a checkpoint of another epoch count is refused."""
    import hashlib
    import importlib.util

    from bitdet.core.bundle import load
    from bitdet.sw.train import train
    spec = importlib.util.spec_from_file_location("make_default",
                                                  ROOT / "bench" / "make_default.py")
    make_default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_default)
    run = train("plain", epochs=1, seed=3, batch_size=16, train_count=32, val_count=8,
                progress=False, threads=1, out_dir=tmp_path / "run")
    monkeypatch.setitem(make_default.RECIPE, "epochs", 1)
    monkeypatch.setitem(make_default.TEST, "images", 24)
    monkeypatch.setattr(make_default, "SUBSET_IMAGES", 8)
    assets = tmp_path / "assets"
    assert make_default.main(["--run", str(run.checkpoint.parent), "--assets", str(assets),
                              "--seed", "3", "--wall-seconds", "12.5"]) == 0
    record = json.loads((assets / "default.json").read_text())
    data = (assets / "default.bitdet").read_bytes()
    assert record["bundle_bytes"] == len(data)
    assert record["bundle_sha256"] == hashlib.sha256(data).hexdigest()
    assert load(assets / "default.bitdet").model["training"] == {"method": "plain", "seed": 3,
                                                                 "epoch": 1}
    assert record["train_wall_seconds"] == 12.5 and len(record["val_history"]) == 1
    assert "--seed 3 --threads 2" in record["commands"][0]
    assert record["commands"][-1].endswith("--wall-seconds 12.5")
    assert record["fits"]["result"] == "fits, every layer resident on chip"
    for part in ("test", "test_subset"):
        assert record[part]["checkpoint"] == record[part]["bundle"]
    assert record["test"]["images"] == 24 and record["test_subset"]["images"] == 8
    monkeypatch.setitem(make_default.RECIPE, "epochs", 16)
    with pytest.raises(SystemExit, match="not the recipe's plain epoch 16"):
        make_default.main(["--run", str(run.checkpoint.parent), "--assets", str(assets),
                           "--wall-seconds", "1"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    assert make_default.main(["--run", str(tmp_path / "bad"), "--assets", str(assets),
                              "--wall-seconds", "1"]) == 2
