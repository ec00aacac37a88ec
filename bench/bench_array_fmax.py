"""Post-route fmax of the systolic array alone, in a register harness (yosys + nextpnr).

The board builds (``bitdet hw build``) report the fmax of the whole accelerator, whose
critical paths are in the control logic and the memories (docs/fpga.md). This bench
measures the array's own paths: the XNOR-popcount tree, the accumulator and the drain.
The harness is:

* a chain of flip-flops fed from one input pin (each stage takes the XOR of its own bit
  and the previous stage's, so that no stage is a delayed copy of another and yosys
  keeps the array's skew and hop registers). It drives every operand bit of the array
  (``activations``, ``weights``, ``first``, ``last``, ``valid``), so every array input
  comes straight from a flip-flop;
* a pipelined XOR reduction of every array output (``results`` and ``operands.ready``),
  with a register after each level of 4-input XORs, into one output pin.

Neither adds more than one LUT between two flip-flops, so the critical path nextpnr
reports lies inside the array (or is the path from the array's last register to the
first XOR level). The clock comes from a pin, and nothing is reset (the harness measures
timing, not function). The synthesis options are those of ``bitdet hw build``
(``synth_ecp5 -nowidelut``, ``synth_ice40 -dsp``).

Needs the fpga extra (``pip install -e .[fpga]``). Run from the repository root::

    python bench/bench_array_fmax.py                   # ulx3s array on ECP5-85F, icebreaker on UP5K
    python bench/bench_array_fmax.py --family ice40 --array 2x4x16
    python bench/bench_array_fmax.py --json array_fmax.json --keep /tmp/array_fmax

The ECP5 run of the 8×8×64 array takes several minutes; the iCE40 one seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from amaranth.back import rtlil
from amaranth.hdl import Cat, ClockDomain, Elaboratable, Module, Signal

from bitdet.core.config import load_config
from bitdet.hw.array import SystolicArray
from bitdet.hw.build import (
    BuildError,
    fpga_environment,
    parse_nextpnr_fmax,
    parse_nextpnr_utilisation,
    parse_yosys_stat,
)


@dataclass(frozen=True)
class Family:
    """One FPGA family: its synthesis command, nextpnr and the device options."""

    synth: str
    nextpnr: str                 # the fpga_environment() variable naming the tool
    device: tuple[str, ...]
    unconstrained: str           # nextpnr's option to place unconstrained I/O itself
    preset: str                  # the accelerator preset whose array is measured by default
    target_mhz: float            # issue 7's goal for the family


FAMILIES = {
    "ecp5": Family(synth="synth_ecp5 -nowidelut", nextpnr="NEXTPNR_ECP5",
                   device=("--85k", "--package", "CABGA381", "--speed", "6"),
                   unconstrained="--lpf-allow-unconstrained", preset="ulx3s",
                   target_mhz=100.0),
    "ice40": Family(synth="synth_ice40 -dsp", nextpnr="NEXTPNR_ICE40",
                    device=("--up5k", "--package", "sg48"),
                    unconstrained="--pcf-allow-unconstrained", preset="icebreaker",
                    target_mhz=40.0),
}


class ArrayHarness(Elaboratable):
    """The array between an input flip-flop chain and a pipelined XOR reduction.

    Ports: ``clk`` (the ``sync`` clock, no reset), ``din`` (one bit into the shift
    register), ``dout`` (the parity of every array output, ``levels`` cycles later).
    """

    def __init__(self, array: SystolicArray):
        self.array = array
        self.clk = Signal()
        self.din = Signal()
        self.dout = Signal()

    def elaborate(self, platform):
        m = Module()
        sync = m.domains.sync = ClockDomain("sync", reset_less=True)
        m.d.comb += sync.clk.eq(self.clk)
        array = m.submodules.array = self.array

        operands = array.operands
        inputs = Cat(operands.payload.as_value(), operands.valid)
        # each stage XORs its own bit with the previous stage's: no input bit is a delayed
        # copy of another, so yosys cannot merge the array's skew and hop registers with
        # the chain (a plain shift register would make them duplicates of chain stages)
        chain = Signal(len(inputs))
        m.d.sync += chain.eq(Cat(self.din, chain[:-1]) ^ chain)
        m.d.comb += inputs.eq(chain)

        level = list(Cat(array.results.payload.as_value(), array.results.valid,
                         operands.ready))
        depth = 0
        while len(level) > 1:
            reduced = []
            for i in range(0, len(level), 4):
                bit = Signal(name=f"xor{depth}_{i // 4}")
                group = level[i:i + 4]
                value = group[0]
                for other in group[1:]:
                    value = value ^ other
                m.d.sync += bit.eq(value)
                reduced.append(bit)
            level = reduced
            depth += 1
        m.d.comb += self.dout.eq(level[0])
        return m


def parse_array(text: str) -> tuple[int, int, int]:
    """``"8x8x64"`` → ``(8, 8, 64)``."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not match:
        raise ValueError(f"array must be ROWSxCOLSxSIMD (e.g. 8x8x64), not {text!r}")
    rows, cols, simd = (int(g) for g in match.groups())
    if min(rows, cols, simd) < 1:
        raise ValueError(f"array dimensions must be positive, not {text!r}")
    return rows, cols, simd


def run_tool(command: list[str], cwd: Path, env: dict, log: Path) -> str:
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    text = run.stdout + run.stderr
    log.write_text(text)
    if run.returncode != 0:
        raise BuildError(f"{Path(command[0]).name} failed (log {log}):\n{text[-2000:]}")
    return text


def measure(family_name: str, rows: int, cols: int, simd: int, acc_width: int, *,
            workdir: Path, seed: int = 1, env: dict | None = None) -> dict:
    """Synthesise, place and route the harnessed array; return its resources and fmax."""
    family = FAMILIES[family_name]
    env = fpga_environment() if env is None else env
    array = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=acc_width)
    harness = ArrayHarness(array)
    name = f"array_{rows}x{cols}x{simd}_{family_name}"
    (workdir / f"{name}.il").write_text(
        rtlil.convert(harness, name="top", ports=[harness.clk, harness.din, harness.dout]))
    start = time.perf_counter()
    run_tool([env["YOSYS"], "-p",
                          f"read_rtlil {name}.il; {family.synth} -top top -json {name}.json; "
                          f"tee -o {name}.stat stat"],
                         workdir, env, workdir / f"{name}.yosys.log")
    synth_s = time.perf_counter() - start
    stat = parse_yosys_stat((workdir / f"{name}.stat").read_text())
    start = time.perf_counter()
    pnr_log = run_tool([env[family.nextpnr], *family.device, "--json", f"{name}.json",
                        "--freq", f"{family.target_mhz:g}", family.unconstrained,
                        "--seed", str(seed), "--timing-allow-fail"],
                       workdir, env, workdir / f"{name}.nextpnr.log")
    pnr_s = time.perf_counter() - start
    fmax = parse_nextpnr_fmax(pnr_log)
    clock = next((c for c in fmax if "clk" in c), next(iter(fmax)))
    util = parse_nextpnr_utilisation(pnr_log)
    bits = rows * cols * simd
    lut4 = util["TRELLIS_COMB"][0] if family_name == "ecp5" else stat.get("SB_LUT4", 0)
    # the clock's own register-to-register path (not the cross-domain ones to the pins)
    critical = re.findall(r"^Info: Critical path report for clock .*?ns routing$", pnr_log,
                          re.S | re.M)
    return {
        "family": family_name, "rows": rows, "cols": cols, "simd": simd,
        "acc_width": acc_width, "seed": seed, "bits": bits,
        "lut4": lut4, "ff": sum(n for c, n in stat.items() if "FF" in c),
        "carry": stat.get("CCU2C", 0) + stat.get("SB_CARRY", 0),
        "placed_cells": {cell: used for cell, (used, _) in util.items()},
        # docs/fpga.md's count: nextpnr's TRELLIS_COMB on ECP5 (LUT4s and the halves of
        # carry cells), yosys' SB_LUT4 on iCE40
        "lut4_per_bit": lut4 / bits,
        "fmax_mhz": fmax[clock]["fmax_mhz"], "target_mhz": family.target_mhz,
        "meets_target": fmax[clock]["fmax_mhz"] >= family.target_mhz,
        "synth_s": synth_s, "pnr_s": pnr_s,
        "critical_path": critical[-1].splitlines() if critical else [],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both",
                        help="ecp5 (LFE5U-85F, as the ULX3S), ice40 (UP5K, as the "
                             "iCEBreaker) or both (default)")
    parser.add_argument("--array", help="ROWSxCOLSxSIMD instead of the preset's array "
                                        "(ulx3s for ecp5, icebreaker for ice40)")
    parser.add_argument("--acc-width", type=int,
                        help="accumulator bits (default: the preset's)")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--keep", type=Path,
                        help="keep the netlists and logs in this folder")
    args = parser.parse_args(argv)
    if args.acc_width is not None and args.acc_width < 1:
        parser.error(f"--acc-width must be at least 1, not {args.acc_width}")

    families = list(FAMILIES) if args.family == "both" else [args.family]
    points = []
    for name in families:
        preset = load_config(FAMILIES[name].preset)
        if args.array:
            try:
                rows, cols, simd = parse_array(args.array)
            except ValueError as err:
                parser.error(str(err))
        else:
            rows, cols, simd = preset.rows, preset.cols, preset.simd
        acc_width = preset.acc_width if args.acc_width is None else args.acc_width
        points.append((name, rows, cols, simd, acc_width))
    try:
        env = fpga_environment()
    except BuildError as err:
        print(f"bench_array_fmax: {err}", file=sys.stderr)
        return 2

    print(f"bitdet array fmax bench  {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
          f"  python {platform.python_version()}")
    print("the array alone between an input flip-flop chain and a pipelined XOR "
          "(nextpnr post-route fmax, one seed)")
    header = (f"{'family':7} {'array':9} {'acc':>3} {'LUT4':>6} {'FF':>6} {'carry':>6} "
              f"{'LUT4/bit':>8} {'fmax MHz':>8} {'target':>6} {'met':>4} {'synth s':>7} "
              f"{'pnr s':>6}")
    print(header)
    print("-" * len(header))
    records = []
    with tempfile.TemporaryDirectory(prefix="bitdet-array-fmax-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, rows, cols, simd, acc_width in points:
            try:
                record = measure(name, rows, cols, simd, acc_width, workdir=workdir,
                                 seed=args.seed, env=env)
            except BuildError as err:
                print(f"bench_array_fmax: {err}", file=sys.stderr)
                return 1
            records.append(record)
            print(f"{name:7} {rows}x{cols}x{simd:<5} {acc_width:3d} {record['lut4']:6d} "
                  f"{record['ff']:6d} {record['carry']:6d} "
                  f"{record['lut4_per_bit']:8.2f} {record['fmax_mhz']:8.2f} "
                  f"{record['target_mhz']:6.0f} {'yes' if record['meets_target'] else 'no':>4} "
                  f"{record['synth_s']:7.1f} {record['pnr_s']:6.1f}", flush=True)
        for record in records:
            print(f"\ncritical path, {record['family']} "
                  f"{record['rows']}x{record['cols']}x{record['simd']}:")
            print("\n".join(record["critical_path"]))
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(),
                                         "results": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
