"""Simulated cycles per wall second of the generated systolic array, Verilator vs Icarus.

Runs the same cocotb testbench (bitdet.sim.tb_array: random jobs checked against the
golden model) on each available simulator, side by side, after one warm-up run that
builds (and caches) the design. It reports the clock cycles simulated, the median wall
time of the test itself (cocotb's own figure from its results file) and of the whole run
(simulator start-up and Python imports included). cocotb's Python testbench is in the
loop on every cycle, so this measures simulator + cocotb, which is what the RTL tests and
the rtl backend pay.

    python bench/bench_rtl.py [--rows 4 --cols 4 --simd 32] [--jobs 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from amaranth.back import verilog

from bitdet.hw.array import SystolicArray
from bitdet.sim.runner import run_cocotb


def _test_seconds(results_xml: Path) -> float:
    """Wall seconds of the cocotb test itself, from cocotb's results file."""
    import xml.etree.ElementTree as ET
    return sum(float(case.get("time")) for case in ET.parse(results_xml).getroot().iter(
        "testcase"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--simd", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    acc_width = 12
    array = SystolicArray(rows=args.rows, cols=args.cols, simd=args.simd, acc_width=acc_width)
    source = verilog.convert(array, name="systolic_array")
    simulators = ["verilator"] + (["icarus"] if shutil.which("iverilog") else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for simulator in simulators:
            times, test_times, cycles = [], [], None
            for i in range(args.repeats + 1):            # run 0 builds and warms up
                report = Path(tmp) / f"{simulator}-{i}.json"
                env = {"BITDET_ROWS": str(args.rows), "BITDET_COLS": str(args.cols),
                       "BITDET_SIMD": str(args.simd), "BITDET_ACC_WIDTH": str(acc_width),
                       "BITDET_SEED": "7", "BITDET_JOBS": str(args.jobs),
                       "BITDET_REPORT": str(report)}
                start = time.perf_counter()
                run = run_cocotb(source, toplevel="systolic_array",
                                 test_module="bitdet.sim.tb_array", simulator=simulator,
                                 extra_env=env, test_dir=Path(tmp) / f"{simulator}-{i}")
                elapsed = time.perf_counter() - start
                if not run.passed:
                    print(f"{simulator}: RTL does not match the golden model: {run.messages}")
                    return 1
                cycles = json.loads(report.read_text())["cycles"]
                if i:
                    times.append(elapsed)
                    test_times.append(_test_seconds(run.results_xml))
            test_s = statistics.median(test_times)
            rows.append({"simulator": simulator, "cycles": cycles, "test_s": test_s,
                         "run_s": statistics.median(times), "cycles_per_s": cycles / test_s})
    print(f"systolic array {args.rows}×{args.cols}×{args.simd}, {args.jobs} random jobs, "
          f"median of {args.repeats} runs after a build (cached) and a warm-up run")
    print(f"{'simulator':10} {'cycles':>8} {'test s':>8} {'cycles/s':>10} {'whole run s':>12}")
    for row in rows:
        print(f"{row['simulator']:10} {row['cycles']:>8} {row['test_s']:>8.3f} "
              f"{row['cycles_per_s']:>10.0f} {row['run_s']:>12.2f}")
    if len(rows) == 2:
        print(f"verilator / icarus speed: {rows[0]['cycles_per_s'] / rows[1]['cycles_per_s']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
