# amaranth: UnusedElaboratable=no
"""Cycles of the layer controller in amaranth.sim against the cycle model.

Runs a fixed set of conv layers on the ``tiny`` and ``icebreaker`` presets, a mid-size
4×8×32 array and the ``ulx3s`` preset (8×8×64) through ``amaranth.sim`` of the
``LayerController`` with its activation buffer, weight and threshold memories, and prints
per layer the ``busy_cycles`` / ``stall_cycles`` the controller reports, the ideal cycles
(K-words fed to the array), the utilization ``ideal / busy`` and the prediction of
``bitdet.core.cycles.layer_cycles``, which must match exactly (exit status 1 otherwise).

    python bench/bench_cycles.py [--quick] [--csv FILE]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from dataclasses import dataclass

import amaranth
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.cycles import ideal_cycles, layer_cycles
from bitdet.hw.controller import LayerController
from bitdet.hw.harness import ControllerHarness
from bitdet.hw.window import WindowLayer

UTILIZATION_BAR = 0.9
"""The issue's bar for compute-bound layers (``kernel²·C ≥ 8·simd``, ``O % cols == 0``)."""


def configs() -> dict[str, AcceleratorConfig]:
    return {
        "tiny": load_config("tiny"),                     # 2×2×8
        "icebreaker": load_config("icebreaker"),         # 1×4×16
        "mid": AcceleratorConfig(name="mid", rows=4, cols=8, simd=32, weight_depth=4096,
                                 threshold_depth=256, activation_depth=4096,
                                 max_channels=256),      # 4×8×32
        "ulx3s": load_config("ulx3s"),                   # 8×8×64
    }


@dataclass(frozen=True)
class Shape:
    name: str
    config: str
    layer: WindowLayer        # in_h, in_w, C, kernel, stride, padding, pad_bit
    out_channels: int
    quick: bool = False       # part of --quick


SHAPES = [
    # tiny 2×2×8: jobs of K ≥ 2 words are gapless when a group's tiles·K ≥ rows + 4 = 6
    Shape("conv3x3", "tiny", WindowLayer(8, 8, 16, 3, 1, 1, 0), 16, quick=True),
    Shape("conv3x3-s2", "tiny", WindowLayer(10, 10, 16, 3, 2, 1, 1), 32),
    Shape("conv3x3-deep", "tiny", WindowLayer(6, 6, 64, 3, 1, 1, 0), 8),
    Shape("conv3x3-c3", "tiny", WindowLayer(9, 9, 3, 3, 1, 1, 1), 10),      # first-layer-like
    Shape("conv1x1", "tiny", WindowLayer(8, 8, 32, 1), 32, quick=True),      # K 4, 16 tiles
    # icebreaker 1×4×16: jobs of K < cols = 4 words are drain-bound
    Shape("conv3x3", "icebreaker", WindowLayer(16, 16, 32, 3, 1, 1, 0), 32),
    Shape("conv3x3-s2", "icebreaker", WindowLayer(16, 16, 32, 3, 2, 1, 0), 64),
    Shape("conv3x3-deep", "icebreaker", WindowLayer(4, 4, 64, 3, 1, 1, 0), 16, quick=True),
    Shape("conv3x3-odd", "icebreaker", WindowLayer(7, 9, 13, 3, 1, 1, 1), 10),
    Shape("conv3x3-nopad", "icebreaker", WindowLayer(12, 12, 16, 3, 1, 0, 0), 16),
    Shape("conv1x1-k8", "icebreaker", WindowLayer(8, 8, 128, 1), 32),         # K 8 = 8·simd
    Shape("conv1x1", "icebreaker", WindowLayer(8, 8, 64, 1), 64, quick=True),  # K 4 = cols
    Shape("conv1x1-c16", "icebreaker", WindowLayer(8, 8, 16, 1), 64),          # K 1 < cols
    # mid 4×8×32: rows + 4 = 8 = cols
    Shape("conv3x3", "mid", WindowLayer(16, 16, 64, 3, 1, 1, 0), 64),
    Shape("conv3x3-s2", "mid", WindowLayer(16, 16, 64, 3, 2, 1, 0), 128),
    Shape("conv1x1-k8", "mid", WindowLayer(8, 8, 256, 1), 64, quick=True),     # K 8
    Shape("conv1x1", "mid", WindowLayer(8, 8, 64, 1), 128),                    # K 2
    # ulx3s 8×8×64: rows + 4 = 12 > 8 words, but 8 tiles of 8 words per group
    Shape("conv3x3", "ulx3s", WindowLayer(8, 8, 128, 3, 1, 1, 0), 64),
    Shape("conv1x1-k8", "ulx3s", WindowLayer(8, 8, 512, 1), 64),               # K 8 = cols
]


def simulate(config: AcceleratorConfig, desc: dict) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` the controller reports after one layer."""
    dut = ControllerHarness(config)
    ctrl = dut.ctrl
    counters = []

    async def testbench(ctx):
        ctx.set(ctrl.layer, desc)
        ctx.set(ctrl.start, 1)
        await ctx.tick()
        ctx.set(ctrl.start, 0)
        await ctx.tick().until(ctrl.done)
        counters.extend((ctx.get(ctrl.busy_cycles), ctx.get(ctrl.stall_cycles)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return counters[0], counters[1]


def compute_bound(config: AcceleratorConfig, shape: Shape) -> bool:
    layer = shape.layer
    return (layer.kernel ** 2 * layer.channels >= 8 * config.simd
            and shape.out_channels % config.cols == 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the shapes marked quick (a few seconds)")
    parser.add_argument("--csv", metavar="FILE", help="also write the table here")
    args = parser.parse_args(argv)

    arrays = configs()
    shapes = [s for s in SHAPES if s.quick or not args.quick]
    print(f"bitdet cycle bench  {datetime.datetime.now(datetime.timezone.utc).isoformat()}"
          f"  python {platform.python_version()}, amaranth {amaranth.__version__}")
    print("busy/stall: the controller's counters in amaranth.sim; ideal: K-words fed to the "
          "array; util = ideal / busy; model: bitdet.core.cycles.layer_cycles")
    header = ("config", "array", "layer", "input", "C->O", "k/s/p", "K_words", "tiles",
              "jobs", "busy", "stall", "ideal", "util", "model busy", "model stall", "match",
              "compute-bound", "sim s")
    rows = []
    start = time.perf_counter()
    for shape in shapes:
        config = arrays[shape.config]
        layer = shape.layer
        desc = LayerController(config=config).descriptor(layer, shape.out_channels)
        t0 = time.perf_counter()
        busy, stall = simulate(config, desc)
        seconds = time.perf_counter() - t0
        model = layer_cycles(config, desc)
        ideal = ideal_cycles(config, desc)
        tiles = -(-shape.out_channels // config.cols)
        jobs = layer.groups(config.rows) * tiles
        bound = compute_bound(config, shape)
        rows.append({
            "config": shape.config,
            "array": f"{config.rows}x{config.cols}x{config.simd}",
            "layer": shape.name,
            "input": f"{layer.in_h}x{layer.in_w}",
            "C->O": f"{layer.channels}->{shape.out_channels}",
            "k/s/p": f"{layer.kernel}/{layer.stride}/{layer.padding}",
            "K_words": layer.k_words(config.simd),
            "jobs": jobs,
            "tiles": tiles,
            "busy": busy,
            "stall": stall,
            "ideal": ideal,
            "util": ideal / busy,
            "model busy": model[0],
            "model stall": model[1],
            "match": "yes" if model == (busy, stall) else "NO",
            "compute-bound": ("-" if not bound
                              else "ok" if ideal / busy >= UTILIZATION_BAR else "BELOW"),
            "sim s": round(seconds, 1),
        })
    cells = [{h: f"{r[h]:.1%}" if h == "util" else str(r[h]) for h in header} for r in rows]
    widths = {h: max(len(h), *(len(c[h]) for c in cells)) for h in header}
    print("  ".join(h.ljust(widths[h]) for h in header).rstrip())
    print("  ".join("-" * widths[h] for h in header))
    for r, c in zip(rows, cells, strict=True):
        print("  ".join(c[h].rjust(widths[h]) if isinstance(r[h], int | float)
                        else c[h].ljust(widths[h]) for h in header).rstrip())
    mismatches = [r for r in rows if r["match"] != "yes"]
    bound = [r for r in rows if r["compute-bound"] != "-"]
    below = [r for r in bound if r["compute-bound"] == "BELOW"]
    print(f"\n{len(rows)} layers in {time.perf_counter() - start:.0f} s; model exact for "
          f"{len(rows) - len(mismatches)}/{len(rows)}; compute-bound layers (kernel²·C ≥ "
          f"8·simd, O % cols = 0) at ≥ {UTILIZATION_BAR:.0%}: {len(bound) - len(below)}/"
          f"{len(bound)}")
    for r in below:
        config = arrays[r["config"]]
        k_words, tiles = r["K_words"], r["tiles"]
        job = max(k_words, config.cols, config.rows)          # thresholded: writer guard
        if tiles * job < config.rows + 4:
            why = (f"{tiles} tile(s) × {job} cycles < rows + 4 = {config.rows + 4}, the "
                   f"window generator's setup per group")
        elif k_words < config.cols and config.cols >= config.rows:
            why = f"K_words {k_words} < cols = {config.cols}, the array's drain per job"
        elif k_words < config.rows:
            why = f"K_words {k_words} < rows = {config.rows}, the output writer per job"
        else:
            why = (f"gapless, but the fixed {r['busy'] - r['ideal']} cycles weigh on "
                   f"{r['ideal']} ideal ones")
        print(f"below the bar: {r['config']} {r['layer']} ({r['util']:.1%}): {why}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(r | {"util": round(r["util"], 4)} for r in rows)
    if mismatches:
        print(f"error: the cycle model differs from the RTL for {len(mismatches)} layer(s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
